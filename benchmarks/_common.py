"""Helpers shared by the inference, task-switch and memory benchmarks (not a benchmark itself).

Timing conventions follow ``bench_train_step.py``: random-init timm models (``pretrained=False``, nothing is
downloaded), interleaved rounds with a rotating order, medians, p25-p75 and ratios of medians measured side by side.
"""

from __future__ import annotations

import contextlib
import os
import platform
import random
import statistics
import sys
import time
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
for _p in (_ROOT, _HERE):  # the repository (taps_peft from a checkout) and this folder (bench_train_step)
    if _p not in sys.path:
        sys.path.insert(0, _p)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded

from bench_train_step import (  # noqa: E402,F401  (re-exported)
    _quantile,
    _version,
    build_base,
    env_info,
    make_batch,
    write_json,
)


# ----------------------------------------------------------------------------------------------------------------
# Arguments shared by every script
# ----------------------------------------------------------------------------------------------------------------


def add_common_args(p, *, batch: int, img_size: int = 64) -> None:
    p.add_argument("--model", default="vit_tiny_patch16_224", help="timm model name (pretrained=False)")
    p.add_argument("--img-size", type=int, default=img_size, help="input resolution (passed to timm as img_size)")
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 = torch.autocast(bfloat16)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="few rounds: a functional check, not a measurement")
    p.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON to PATH")


def check_common_args(p, args) -> None:
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if args.batch < 1:
        p.error("--batch must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)


def autocast(args):
    if args.dtype == "bf16":
        return torch.autocast(device_type=args.device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------------------------
# TAPS adapters with a chosen active set
# ----------------------------------------------------------------------------------------------------------------


def taps_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The TAPS layers (found by the tuner without walking into each adapter's head/norm copies, so the number of
    adapters loaded stays out of the timed switches); none for a plain model."""
    tuner = getattr(model, "base_model", None)
    return tuner.taps_layers() if hasattr(tuner, "taps_layers") else []


def choose_active(n_layers: int, frac: float, rng: random.Random) -> set[int]:
    """A random set of round(frac * n_layers) layer indices (at least 1 when frac > 0)."""
    k = min(n_layers, max(1 if frac > 0 else 0, round(frac * n_layers)))
    return set(rng.sample(range(n_layers), k))


@torch.no_grad()
def shape_adapter(model: nn.Module, adapter: str, active: set[int], seed: int, scale: float = 0.02) -> None:
    """Give ``adapter`` what a trained adapter has: scores 0.15 (>= tau = 0.1) on the ``active`` layers and 0.05 on
    the others, non-zero deltas on the active layers (inactive deltas are neither used nor saved: left as they are),
    and perturbed task-specific modules (head, norms)."""
    from peft.utils.other import ModulesToSaveWrapper

    g = torch.Generator().manual_seed(seed)
    for i, (_, layer) in enumerate(taps_layers(model)):
        layer.taps_scores[adapter].fill_(0.15 if i in active else 0.05)
        if i in active:
            delta = layer.taps_delta[adapter]
            std = _weight_std(layer)
            noise = torch.randn(delta.shape, generator=g, dtype=torch.float32).mul_(scale * std)
            delta.copy_(noise.to(device=delta.device, dtype=delta.dtype))
    for m in model.modules():
        if isinstance(m, ModulesToSaveWrapper) and adapter in m.modules_to_save:
            for p in m.modules_to_save[adapter].parameters():
                p.add_(torch.randn(p.shape, generator=g).to(p) * 0.01)


def _weight_std(layer: nn.Module) -> float:
    """The base weight's std, computed once per layer (the base weight never changes in these benchmarks)."""
    weight = layer.get_base_layer().weight
    key = (weight.data_ptr(), weight._version)
    cached = layer.__dict__.get("_bench_std")
    if cached is None or cached[0] != key:
        cached = (key, float(weight.detach().float().std()) or 1.0)
        layer.__dict__["_bench_std"] = cached
    return cached[1]


def active_indices(model: nn.Module, adapter: str) -> set[int]:
    return {i for i, (_, m) in enumerate(taps_layers(model)) if adapter in m.taps_scores and m.is_active(adapter)}


# ----------------------------------------------------------------------------------------------------------------
# Bytes
# ----------------------------------------------------------------------------------------------------------------


def storage_bytes(tensors: Iterable[Optional[torch.Tensor]], device_type: Optional[str] = None) -> int:
    """Bytes of the distinct storages behind ``tensors`` (shared storages counted once)."""
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        if t is None or not torch.is_tensor(t) or t.device.type == "meta":
            continue
        if device_type is not None and t.device.type != device_type:
            continue
        st = t.untyped_storage()
        seen[(t.device.type, st.data_ptr())] = st.nbytes()
    return sum(seen.values())


def held_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Every tensor a model holds between calls: parameters, buffers, and the base weights a merge set aside (a
    plain attribute, invisible to ``parameters()``)."""
    out = list(model.parameters()) + list(model.buffers())
    out += [getattr(layer, "_unmerged_weight", None) for _, layer in taps_layers(model)]
    return [t for t in out if t is not None]


def state_dict_bytes(model: nn.Module) -> int:
    return sum(t.nbytes for t in model.state_dict().values() if torch.is_tensor(t))


# ----------------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------------


class Timer:
    """Wall time of a block: perf_counter on CPU; CUDA events (with a sync before and after) on a GPU."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.ms = 0.0

    def __enter__(self) -> "Timer":
        if self.device == "cuda":
            torch.cuda.synchronize()
            self._start, self._end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.device == "cuda":
            self._end.record()
            torch.cuda.synchronize()
            self.ms = self._start.elapsed_time(self._end)
        else:
            self.ms = (time.perf_counter() - self._t0) * 1e3


def stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"median": float("nan"), "p25": float("nan"), "p75": float("nan"), "min": float("nan"), "n": 0}
    return {
        "median": statistics.median(values),
        "p25": _quantile(values, 0.25),
        "p75": _quantile(values, 0.75),
        "min": min(values),
        "mean": statistics.fmean(values),
        "n": len(values),
    }


@contextlib.contextmanager
def no_gc():
    """No collector pauses inside timed blocks."""
    import gc

    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def rotate(items: list, r: int) -> list:
    n = len(items)
    return items[r % n :] + items[: r % n] if n else items


def mib(n: Optional[float]) -> str:
    return "-" if n is None else f"{n / 2**20:.2f}"


def emit(res: dict[str, Any], args, printer: Callable[[dict[str, Any]], None]) -> None:
    printer(res)
    if args.json:
        write_json(args.json, res)
        print(f"wrote {args.json}")
