#!/usr/bin/env python
"""Time one training step of TAPS against full fine-tuning of the same model, in the same run.

A training step is ``zero_grad -> forward -> loss -> backward -> optimizer.step()`` (for TAPS the step includes the
penalty and the scores' Adam step, which TAPS applies itself before the optimizer's step).
Every strategy starts from the same random-init timm model (deep copies), sees the same batch and runs in the same
precision. Steps are interleaved in rounds (one step of each strategy per round, the order rotated every round), so
machine noise hits every strategy alike; the table reports medians and the ratio of each strategy to full fine-tuning.

TAPS runs as after ``get_peft_model``: every gate active (score_init > tau), head and norms trainable, the optimizer
over every trainable parameter. ``--lora`` adds PEFT LoRA r=16 on the layers TAPS gates that LoRA can hold (a
ViT's qkv, proj, fc1, fc2; not depthwise convs) with the head in ``modules_to_save``; ``--lowrank`` adds TAPS with
rank-16 deltas on exactly those layers and reports its step against LoRA's (goal <= 1.05). ``TAPS frozen`` (on by default, ``--no-frozen``
to skip) times the end of training after ``model.freeze_gates()`` with ``--active-frac`` (0.3) of the gated layers
open: a seeded random 70% of the scores at 0.05 < tau, so those layers compute like their base layer, with no delta
and no weight gradient.

Examples:
    python benchmarks/bench_train_step.py                       # CPU defaults (224 px, batch 16), ~40 s on 2 cores
    python benchmarks/bench_train_step.py --img-size 64 --batch 32 --steps 40   # weight-bound: 17 tokens/image
    python benchmarks/bench_train_step.py --lora --json out.json
    python benchmarks/bench_train_step.py --model tf_efficientnet_lite0 --img-size 64 --batch 32 --faster-depthwise
    python benchmarks/bench_train_step.py --device cuda --dtype bf16 --model vit_base_patch16_224 \\
        --img-size 224 --batch 128 --steps 30 --warmup 8

Goals: TAPS step / full-FT step <= 1.05 on CPU, <= 1.00 on GPU; TAPS with frozen gates (30% open) / full-FT step
<= 0.8. The script prints whether they are met; it never fails because of them (exit code 0).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

# Run from a checkout without installing: make the repository root importable.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import taps_peft  # noqa: E402,F401  (registers TAPS with PEFT)

GOAL = {"cpu": 1.05, "cuda": 1.00}
GOAL_FROZEN = 0.8  # TAPS after freeze_gates() with 30% of the layers open, / full fine-tuning (the goal)
GOAL_LOWRANK = 1.05  # TAPS with rank-16 deltas / LoRA r=16 on the same layers (issue 19)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="vit_tiny_patch16_224", help="timm model name (pretrained=False)")
    p.add_argument("--img-size", type=int, default=224,
                   help="input resolution (passed to timm as img_size); 64 = a weight-bound stress case")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--steps", type=int, default=None, help="timed rounds (default: 40 on cpu, 30 on cuda)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default: 5 on cpu, 8 on cuda)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 = torch.autocast(bfloat16)")
    p.add_argument("--optim", choices=["sgd", "adamw"], default="sgd", help="sgd = SGD momentum 0.9 (paper)")
    p.add_argument("--lr", type=float, default=None, help="default: 0.01 for sgd, 1e-4 for adamw")
    p.add_argument("--lam", type=float, default=0.5, help="TAPS lam")
    p.add_argument("--lora", action="store_true", help="also time PEFT LoRA r=16 on qkv, proj, fc1, fc2")
    p.add_argument("--lowrank", action="store_true", help="also time TAPS with rank-16 deltas against LoRA r=16 on the "
                   "same layers (implies --lora)")
    p.add_argument("--no-frozen", dest="frozen", action="store_false",
                   help="skip 'TAPS frozen' (after freeze_gates(), --active-frac of the layers open)")
    p.add_argument("--active-frac", type=float, default=0.3, help="open layers in 'TAPS frozen' (default 0.3)")
    p.add_argument("--faster-depthwise", action="store_true", help="also time full FT and TAPS with "
                   "taps_peft.training.faster_depthwise_convs (the main job's depthwise weight gradient); every "
                   "strategy channels-last, as in the main job")
    p.add_argument("--compile", action="store_true", help="torch.compile every strategy's model (compiled ratio)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (cpu)")
    p.add_argument("--sync-check", action="store_true",
                   help="cuda: first run one TAPS step under torch.cuda.set_sync_debug_mode('error') (no host sync)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON to PATH")
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 20 if args.device == "cpu" else 30
    if args.warmup is None:
        args.warmup = 5 if args.device == "cpu" else 8
    if args.lr is None:
        args.lr = 0.01 if args.optim == "sgd" else 1e-4
    if args.steps < 1 or args.warmup < 0 or args.batch < 1:
        p.error("--steps must be >= 1, --warmup >= 0, --batch >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if args.faster_depthwise and (args.compile or args.device != "cpu" or args.dtype != "fp32"):
        p.error("--faster-depthwise times the eager fp32 CPU path (elsewhere torch's own conv runs): drop --compile, "
                "--device cuda and --dtype bf16")
    return args


# ----------------------------------------------------------------------------------------------------------------
# Strategies
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Strategy:
    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    times_ms: list[float] = field(default_factory=list)
    peak_bytes: list[int] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


def _optimizer_cls(args: argparse.Namespace) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    if args.optim == "sgd":
        return torch.optim.SGD, {"momentum": 0.9}
    return torch.optim.AdamW, {}


def _param_info(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    opt_params = [p for g in optimizer.param_groups for p in g["params"]]
    return {
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "all_params": sum(p.numel() for p in model.parameters()),
        "optimizer_tensors": len(opt_params),
    }


def build_base(args: argparse.Namespace) -> nn.Module:
    import timm

    torch.manual_seed(args.seed)
    kwargs: dict[str, Any] = {"pretrained": False, "num_classes": args.num_classes}
    try:
        model = timm.create_model(args.model, img_size=args.img_size, **kwargs)
    except TypeError:  # models without an img_size argument (CNNs) take any resolution
        model = timm.create_model(args.model, **kwargs)
    model = model.to(BASE_DTYPES[getattr(args, "base_dtype", "fp32")])
    return model.to(memory_format=torch.channels_last) if getattr(args, "faster_depthwise", False) else model


BASE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_batch(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """The seeded random batch every strategy (and every script) runs on: images and labels, on ``args.device``."""
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=g)
    y = torch.randint(0, args.num_classes, (args.batch,), generator=g)
    return x.to(args.device, BASE_DTYPES[getattr(args, "base_dtype", "fp32")]), y.to(args.device)


def make_full(base: nn.Module, args: argparse.Namespace, name: str = "full FT") -> Strategy:
    model = copy.deepcopy(base).to(args.device).train()
    model.requires_grad_(True)
    cls, kw = _optimizer_cls(args)
    opt = cls([p for p in model.parameters() if p.requires_grad], lr=args.lr, **kw)
    return Strategy(name, model, opt, info=_param_info(model, opt))


def make_taps(base: nn.Module, args: argparse.Namespace, autocast_adapter_dtype: bool = True,
              name: str = "TAPS") -> Strategy:
    """TAPS with every gate open; ``autocast_adapter_dtype`` is PEFT's flag (True: fp32 deltas on a 16-bit base)."""
    import taps_peft
    from peft import get_peft_model

    model = get_peft_model(copy.deepcopy(base), taps_peft.TAPSConfig(lam=args.lam),
                           autocast_adapter_dtype=autocast_adapter_dtype).to(args.device).train()
    cls, kw = _optimizer_cls(args)
    opt = cls([p for p in model.parameters() if p.requires_grad], lr=args.lr, **kw)  # TAPS steps the scores itself
    summary = taps_peft.taps_summary(model)
    info = _param_info(model, opt)
    info["active_layers"] = f"{summary['active_layers']}/{summary['total_layers']}"
    return Strategy(name, model, opt, info=info)


def make_taps_frozen(base: nn.Module, args: argparse.Namespace) -> Strategy:
    """TAPS in the end-of-training phase: optimizer made as usual, then ``freeze_gates()`` with a seeded random
    ``args.active_frac`` of the gated layers open (score 0.15) and the others closed (0.05 < tau)."""
    import random

    import taps_peft
    from peft import get_peft_model

    model = get_peft_model(copy.deepcopy(base), taps_peft.TAPSConfig(lam=args.lam)).to(args.device).train()
    cls, kw = _optimizer_cls(args)
    opt = cls([p for p in model.parameters() if p.requires_grad], lr=args.lr, **kw)  # TAPS steps the scores itself
    layers = [layer for _, layer in model.base_model.taps_layers()]
    open_layers = set(random.Random(args.seed).sample(range(len(layers)), round(args.active_frac * len(layers))))
    with torch.no_grad():
        for i, layer in enumerate(layers):
            layer.taps_scores["default"].fill_(0.15 if i in open_layers else 0.05)
    model.freeze_gates()
    summary = taps_peft.taps_summary(model)
    info = _param_info(model, opt)
    info["active_layers"] = f"{summary['active_layers']}/{summary['total_layers']}"
    return Strategy("TAPS frozen", model, opt, info=info)


def lora_targets(base: nn.Module) -> list[str]:
    """The layers TAPS gates by default that LoRA can hold (not grouped or depthwise convs): both low-rank methods get
    exactly these."""
    from taps_peft.tuner.targets import default_targets, find_head

    return [n for n in default_targets(base, find_head(base)) if getattr(base.get_submodule(n), "groups", 1) == 1]


def make_lora(base: nn.Module, args: argparse.Namespace) -> Strategy:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=16, lora_alpha=16, target_modules=lora_targets(base), modules_to_save=[_head(base)])
    model = get_peft_model(copy.deepcopy(base), config).to(args.device).train()
    cls, kw = _optimizer_cls(args)
    opt = cls([p for p in model.parameters() if p.requires_grad], lr=args.lr, **kw)
    return Strategy("LoRA r=16", model, opt, info=_param_info(model, opt))


def make_taps_lowrank(base: nn.Module, args: argparse.Namespace) -> Strategy:
    """TAPS with rank-16 deltas (scaling 1) on LoRA's layers, every gate open: the same rank, layers and head."""
    import taps_peft
    from peft import get_peft_model

    config = taps_peft.TAPSConfig(lam=args.lam, r=16, target_modules=lora_targets(base), train_norms=False)
    model = get_peft_model(copy.deepcopy(base), config).to(args.device).train()
    cls, kw = _optimizer_cls(args)
    opt = cls([p for p in model.parameters() if p.requires_grad], lr=args.lr, **kw)  # TAPS steps the scores itself
    return Strategy("TAPS r=16", model, opt, info=_param_info(model, opt))


def _head(base: nn.Module) -> str:
    from taps_peft.tuner.targets import find_head

    return find_head(base)


# ----------------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------------


def _autocast(args: argparse.Namespace):
    if args.dtype == "bf16":
        return torch.autocast(device_type=args.device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(s: Strategy, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace) -> None:
    s.optimizer.zero_grad(set_to_none=True)
    with _autocast(args):
        loss = F.cross_entropy(s.model(x), y)
        if hasattr(s.model, "taps_penalty"):  # the user's loop: the penalty in the loss
            loss = loss + s.model.taps_penalty()
    loss.backward()
    s.optimizer.step()


def _static_bytes(s: Strategy) -> int:
    """Bytes this strategy keeps between steps: parameters, buffers, optimizer state (grads are None then)."""
    seen: dict[int, int] = {}
    tensors = list(s.model.parameters()) + list(s.model.buffers())
    for state in s.optimizer.state.values():
        tensors += [v for v in state.values() if torch.is_tensor(v)]
    for t in tensors:
        if t.device.type == "cuda":
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def timed_step(s: Strategy, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace, record: bool) -> None:
    if args.device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        train_step(s, x, y, args)
        end.record()
        torch.cuda.synchronize()
        if record:
            s.times_ms.append(start.elapsed_time(end))
            # Peak as if this strategy were alone on the device: subtract what the other strategies hold.
            others = before - _static_bytes(s)
            s.peak_bytes.append(torch.cuda.max_memory_allocated() - others)
    else:
        t0 = time.perf_counter()
        train_step(s, x, y, args)
        elapsed = time.perf_counter() - t0
        if record:
            s.times_ms.append(elapsed * 1e3)
    s.optimizer.zero_grad(set_to_none=True)  # hold no grads while the other strategies step


def run_rounds(strategies: list[Strategy], x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace) -> None:
    n = len(strategies)
    for r in range(args.warmup + args.steps):
        record = r >= args.warmup
        order = strategies[r % n :] + strategies[: r % n]  # rotate, so no strategy always runs first
        for s in order:
            timed_step(s, x, y, args, record)


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------


def _quantile(values: list[float], q: float) -> float:
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo, hi = int(pos), min(int(pos) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def summarize(strategies: list[Strategy], args: argparse.Namespace) -> dict[str, Any]:
    full = strategies[0]
    full_med = statistics.median(full.times_ms)
    rows = []
    for s in strategies:
        med = statistics.median(s.times_ms)
        paired = [a / b for a, b in zip(s.times_ms, full.times_ms)]
        row = {
            "strategy": s.name,
            "median_ms": med,
            "mean_ms": statistics.fmean(s.times_ms),
            "min_ms": min(s.times_ms),
            "p25_ms": _quantile(s.times_ms, 0.25),
            "p75_ms": _quantile(s.times_ms, 0.75),
            "ratio_vs_full": med / full_med,
            "paired_ratio_median": statistics.median(paired),
            "peak_mem_bytes": max(s.peak_bytes) if s.peak_bytes else None,
            "times_ms": s.times_ms,
            **s.info,
        }
        rows.append(row)
    taps = next(r for r in rows if r["strategy"] == "TAPS")
    frozen = next((r for r in rows if r["strategy"] == "TAPS frozen"), None)
    lora = next((r for r in rows if r["strategy"] == "LoRA r=16"), None)
    lowrank = next((r for r in rows if r["strategy"] == "TAPS r=16"), None)
    medians = {r["strategy"]: r["median_ms"] for r in rows}
    lowrank_paired = lowrank and statistics.median(
        [a / b for a, b in zip(lowrank["times_ms"], lora["times_ms"])])
    goal = GOAL[args.device]
    full_peak = rows[0]["peak_mem_bytes"]
    return {
        "benchmark": "train_step",
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "env": env_info(args),
        "results": rows,
        "taps_over_full": taps["ratio_vs_full"],
        "taps_over_full_paired": taps["paired_ratio_median"],
        "taps_peak_mem_over_full": (taps["peak_mem_bytes"] / full_peak) if full_peak else None,
        "goal": goal,
        "goal_met": taps["ratio_vs_full"] <= goal,
        "frozen_over_full": frozen and frozen["ratio_vs_full"],
        "frozen_over_full_paired": frozen and frozen["paired_ratio_median"],
        "frozen_active_layers": frozen and frozen["active_layers"],
        "frozen_goal": GOAL_FROZEN,
        "frozen_goal_met": frozen and frozen["ratio_vs_full"] <= GOAL_FROZEN,
        "lowrank_over_lora": lowrank and lowrank["median_ms"] / lora["median_ms"],
        "lowrank_over_lora_paired": lowrank_paired,
        "lowrank_params_over_lora": lowrank and lowrank["trainable_params"] / lora["trainable_params"],
        "lowrank_goal": GOAL_LOWRANK,
        "lowrank_goal_met": lowrank and lowrank["median_ms"] / lora["median_ms"] <= GOAL_LOWRANK,
        # --faster-depthwise: torch's own step / the windowed depthwise weight gradient's (above 1: faster)
        "windowed_speedup": {name: medians[name] / medians[f"{name}, windowed"] for name in ("full FT", "TAPS")}
        if "TAPS, windowed" in medians else None,
    }


def env_info(args: argparse.Namespace) -> dict[str, Any]:
    """Versions and machine facts recorded with every benchmark result."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "peft": _version("peft"),
        "timm": _version("timm"),
        "taps_peft": _version("taps_peft"),
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def _version(pkg: str) -> Optional[str]:
    try:
        mod = __import__(pkg)
        return getattr(mod, "__version__", None)
    except Exception:
        return None


def print_table(res: dict[str, Any]) -> None:
    cfg = res["config"]
    env = res["env"]
    print(
        f"\n{cfg['model']} img {cfg['img_size']} batch {cfg['batch']} | {cfg['device']} {cfg['dtype']} | "
        f"{cfg['optim']} | {cfg['steps']} timed rounds after {cfg['warmup']} warm-up, interleaved | "
        f"torch {env['torch']} threads {env['torch_threads']}"
    )
    mem = cfg["device"] == "cuda"
    head = f"{'strategy':<17} {'trainable M':>11} {'opt tensors':>11} {'median ms':>10} {'p25-p75 ms':>15} "
    head += f"{'min ms':>8} "
    head += f"{'vs full':>8} {'paired':>7}" + (f" {'peak GiB':>9}" if mem else "")
    print(head)
    print("-" * len(head))
    notes = []
    for r in res["results"]:
        line = (
            f"{r['strategy']:<17} {r['trainable_params'] / 1e6:>11.3f} {r['optimizer_tensors']:>11d} "
            f"{r['median_ms']:>10.2f} {r['p25_ms']:>7.2f}-{r['p75_ms']:<7.2f} {r['min_ms']:>8.2f} "
            f"{r['ratio_vs_full']:>8.3f} {r['paired_ratio_median']:>7.3f}"
        )
        if mem:
            line += f" {r['peak_mem_bytes'] / 2**30:>9.3f}"
        print(line)
        if "active_layers" in r:
            notes.append(f"{r['strategy']}: active layers {r['active_layers']}")
    if notes:
        print("(" + "; ".join(notes) + ")")
    verdict = "MET" if res["goal_met"] else "NOT met"
    print(
        f"\nTAPS / full FT step (ratio of medians) = {res['taps_over_full']:.3f} "
        f"(median of paired per-round ratios {res['taps_over_full_paired']:.3f}); "
        f"goal <= {res['goal']:.2f} on {cfg['device']}: {verdict}"
    )
    if res.get("frozen_over_full") is not None:
        print(
            f"TAPS frozen ({res['frozen_active_layers']} open) / full FT step = {res['frozen_over_full']:.3f} "
            f"(paired {res['frozen_over_full_paired']:.3f}); goal <= {res['frozen_goal']:.2f}: "
            f"{'MET' if res['frozen_goal_met'] else 'NOT met'}"
        )
    if res.get("lowrank_over_lora") is not None:
        print(
            f"TAPS r=16 / LoRA r=16 step = {res['lowrank_over_lora']:.3f} (paired {res['lowrank_over_lora_paired']:.3f}),"
            f" trainable parameters {res['lowrank_params_over_lora']:.3f}x; goal <= {res['lowrank_goal']:.2f}: "
            f"{'MET' if res['lowrank_goal_met'] else 'NOT met'}"
        )
    if res.get("windowed_speedup"):
        print("windowed depthwise weight gradient (faster_depthwise_convs), step speed-up: " + ", ".join(
            f"{name} {x:.2f}x" for name, x in res["windowed_speedup"].items()))
    if res["taps_peak_mem_over_full"] is not None:
        print(f"TAPS / full FT peak memory = {res['taps_peak_mem_over_full']:.3f}")


def write_json(path: str, res: dict[str, Any]) -> None:
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(res, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    base = build_base(args)
    strategies = [make_full(base, args), make_taps(base, args)]
    if args.frozen:
        strategies.append(make_taps_frozen(base, args))
    if args.lora or args.lowrank:
        strategies.append(make_lora(base, args))
    if args.lowrank:
        strategies.append(make_taps_lowrank(base, args))
    if args.faster_depthwise:
        from taps_peft.training import faster_depthwise_convs

        windowed = copy.deepcopy(base)
        faster_depthwise_convs(windowed)
        strategies += [make_full(windowed, args, "full FT, windowed"), make_taps(windowed, args, name="TAPS, windowed")]
    if args.compile:  # the penalty and the optimizer keep using the eager module's parameters
        for s in strategies:
            s.model = torch.compile(s.model)
    del base
    x, y = make_batch(args)
    if args.sync_check and args.device == "cuda":
        train_step(strategies[1], x, y, args)  # warm-up: allocator and library plans may sync once
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any device-to-host sync in the step raises
        try:
            train_step(strategies[1], x, y, args)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        print("sync check: a TAPS training step (forward, penalty, backward, optimizer step) made no host sync")

    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()  # no collector pauses inside timed steps
    try:
        run_rounds(strategies, x, y, args)
    finally:
        if gc_was_enabled:
            gc.enable()

    res = summarize(strategies, args)
    print_table(res)
    if args.json:
        write_json(args.json, res)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
