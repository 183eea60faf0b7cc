#!/usr/bin/env python
"""Training memory of TAPS against full fine-tuning of the same model (and optionally LoRA), in the same run.

Strategies are built exactly as in ``bench_train_step.py`` (deep copies of one random-init timm model, same batch,
resolution, precision and optimizer, defaults 224 px and batch 16; TAPS with every gate open as after
``get_peft_model``). Two measurements:

* ``measured`` (the goal's number): on cpu, each strategy runs alone in a fresh process with
  ``MALLOC_MMAP_THRESHOLD_=65536`` (freed tensors go back to the OS at once): its peak resident set (``VmHWM``, reset
  after the model is built) over ``--steps`` training steps, minus the resident set after the imports, before any
  model exists. On cuda, ``torch.cuda.max_memory_allocated`` over a training step, as if the strategy were alone on
  the device (the other strategies' resident bytes subtracted), max over ``--steps`` interleaved steps (the same
  measurement ``bench_train_step.py --device cuda`` reports next to its timings).
* ``static`` (every device): the distinct tensor storages a step leaves behind, by kind: parameters and buffers,
  gradients (after ``backward``) and optimizer state (after ``step``). TAPS holds the frozen base and a delta where
  a full fine-tune holds one weight, so at most (4P + A) / (3P + A) with SGD momentum (P = gated weights,
  A = activations): the ratio meets 1.05 once activations dominate, as at 224 px, and not in the weight-bound
  ``--img-size 64`` stress case.

Examples:
    python benchmarks/bench_memory.py                      # CPU, under a minute
    python benchmarks/bench_memory.py --lora --optim adamw --json out.json
    python benchmarks/bench_memory.py --device cuda --dtype bf16 --model vit_base_patch16_224 --img-size 224 \\
        --batch 128

Goal: TAPS / full fine-tuning peak training memory (measured) <= 1.05. The script prints whether it is met; it
never fails because of it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
from typing import Any, Optional

import torch

import _common as C
import bench_train_step as T

GOAL = 1.05


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    C.add_common_args(p, batch=16, img_size=224)
    p.add_argument("--optim", choices=["sgd", "adamw"], default="sgd", help="sgd = SGD momentum 0.9 (paper)")
    p.add_argument("--lr", type=float, default=None, help="default: 0.01 for sgd, 1e-4 for adamw")
    p.add_argument("--lam", type=float, default=0.5, help="TAPS lam")
    p.add_argument("--lora", action="store_true", help="also measure PEFT LoRA r=16 on qkv, proj, fc1, fc2")
    p.add_argument("--lowrank", action="store_true", help="also measure TAPS r=16 against LoRA r=16 (same layers)")
    p.add_argument("--base-dtype", choices=["fp32", "bf16"], default="fp32",
                   help="the base's own dtype; bf16 also measures TAPS with autocast_adapter_dtype=False (bf16 deltas)")
    p.add_argument("--steps", type=int, default=None, help="measured steps per strategy (default 5; quick 2)")
    p.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)  # internal: measure one strategy's peak RSS
    args = p.parse_args(argv)
    if args.lr is None:
        args.lr = 0.01 if args.optim == "sgd" else 1e-4
    if args.steps is None:
        args.steps = 2 if args.quick else 5
    args.warmup = 1
    C.check_common_args(p, args)
    return args


def components(s: T.Strategy, x: torch.Tensor, y: torch.Tensor, args) -> dict[str, int]:
    """One training step; bytes of the distinct storages it leaves behind, by kind (see the module docstring)."""
    model, opt = s.model, s.optimizer
    params = list(model.parameters()) + list(model.buffers())
    opt.zero_grad(set_to_none=True)
    T.train_step(s, x, y, args)
    state = C.storage_bytes([v for st in opt.state.values() for v in st.values() if torch.is_tensor(v) and v.dim()])
    out = {
        "param_buffer_bytes": C.storage_bytes(params),
        "trainable_param_bytes": C.storage_bytes([p for p in model.parameters() if p.requires_grad]),
        "grad_bytes": C.storage_bytes([p.grad for p in model.parameters()]),
        "optimizer_state_bytes": state,
    }
    opt.zero_grad(set_to_none=True)
    out["static_bytes"] = out["param_buffer_bytes"] + out["grad_bytes"] + out["optimizer_state_bytes"]
    return out


def _rss_kib() -> dict[str, int]:
    status = open("/proc/self/status").read()
    return {k: int(re.search(rf"{k}:\s+(\d+)", status).group(1)) for k in ("VmRSS", "VmHWM")}


def rss_child(args: argparse.Namespace) -> int:
    """One strategy alone in this process: peak resident bytes over training steps, above the imports' baseline."""
    import peft  # noqa: F401  (every import first: the baseline holds the libraries, not the model)
    import timm  # noqa: F401

    import taps_peft  # noqa: F401

    baseline = _rss_kib()["VmRSS"]
    base = T.build_base(args)
    make = {"full FT": T.make_full, "TAPS": T.make_taps, "LoRA r=16": T.make_lora, HALF_DELTAS: make_half,
            "TAPS r=16": T.make_taps_lowrank}[args.rss_child]
    s = make(base, args)
    del base
    x, y = T.make_batch(args)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM: the peak counts from here, after the model (and its copies) were built
    for _ in range(args.steps):
        T.train_step(s, x, y, args)
        s.optimizer.zero_grad(set_to_none=True)
    print(json.dumps({"measured_peak_bytes": (_rss_kib()["VmHWM"] - baseline) * 1024}))
    return 0


HALF_DELTAS = "TAPS autocast_adapter_dtype=False"


def make_half(base, args: argparse.Namespace) -> T.Strategy:
    """TAPS with PEFT's ``autocast_adapter_dtype=False``: deltas and head/norm copies in the base's 16-bit dtype."""
    return T.make_taps(base, args, autocast_adapter_dtype=False, name=HALF_DELTAS)


def measure_rss(name: str, args: argparse.Namespace) -> int:
    """Run ``rss_child`` for strategy ``name`` in a fresh process with this run's settings."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    flags = ["model", "img_size", "batch", "num_classes", "dtype", "seed", "optim", "lr", "lam", "steps", "base_dtype"]
    argv = [a for f in flags for a in (f"--{f.replace('_', '-')}", str(getattr(args, f)))]
    argv += ["--threads", str(args.threads)] if args.threads else []
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--rss-child", name]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["measured_peak_bytes"]


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.rss_child:
        return rss_child(args)
    base = T.build_base(args)
    strategies = [T.make_full(base, args), T.make_taps(base, args)]
    if args.base_dtype != "fp32":
        strategies.append(make_half(base, args))
    if args.lora or args.lowrank:
        strategies.append(T.make_lora(base, args))
    if args.lowrank:
        strategies.append(T.make_taps_lowrank(base, args))
    del base
    x, y = T.make_batch(args)

    rows = []
    for s in strategies:
        T.train_step(s, x, y, args)  # warm-up: optimizer state exists from now on
        s.optimizer.zero_grad(set_to_none=True)
        rows.append({"strategy": s.name, **s.info, **components(s, x, y, args)})
    if args.device == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        T.run_rounds(strategies, x, y, args)  # records peak_bytes per step, as if alone on the device
        for r, s in zip(rows, strategies):
            r["measured_peak_bytes"] = max(s.peak_bytes)
    else:
        for r in rows:
            r["measured_peak_bytes"] = measure_rss(r["strategy"], args)

    full = rows[0]
    for r in rows:
        for k in ["static_bytes", "measured_peak_bytes"]:
            r[k.replace("_bytes", "_over_full")] = r[k] / full[k]
    taps = rows[1]
    res = {
        "benchmark": "memory",
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "env": C.env_info(args),
        "method": "cuda max_memory_allocated per step" if args.device == "cuda" else "peak RSS, one process each",
        "results": rows,
        "taps_peak_over_full": taps["measured_peak_over_full"],
        "taps_static_over_full": taps["static_over_full"],
        "goal": GOAL,
        "goal_met": taps["measured_peak_over_full"] <= GOAL,
    }
    by_name = {r["strategy"]: r for r in rows}
    if "TAPS r=16" in by_name:
        lowrank, lora = by_name["TAPS r=16"], by_name["LoRA r=16"]
        res["lowrank_peak_over_lora"] = lowrank["measured_peak_bytes"] / lora["measured_peak_bytes"]
        res["lowrank_static_over_lora"] = lowrank["static_bytes"] / lora["static_bytes"]
    C.emit(res, args, print_table)
    return 0


def print_table(res: dict[str, Any]) -> None:
    cfg, env = res["config"], res["env"]
    print(
        f"\n{cfg['model']} img {cfg['img_size']} batch {cfg['batch']} | {cfg['device']} {cfg['dtype']} | {cfg['optim']} "
        f"| torch {env['torch']}"
    )
    head = (f"{'strategy':<10} {'params+buf':>10} {'grads':>8} {'opt state':>9} {'static':>8} {'static/full':>11} "
            f"{'measured':>9} {'meas/full':>9}")
    print(head + "   (MiB)")
    print("-" * len(head))
    for r in res["results"]:
        print(
            f"{r['strategy']:<10} {C.mib(r['param_buffer_bytes']):>10} {C.mib(r['grad_bytes']):>8} "
            f"{C.mib(r['optimizer_state_bytes']):>9} {C.mib(r['static_bytes']):>8} {r['static_over_full']:>11.3f} "
            f"{C.mib(r['measured_peak_bytes']):>9} {r['measured_peak_over_full']:>9.3f}"
        )
    print("static = params + buffers + grads + optimizer state; measured = peak over a training step (see --help)")
    verdict = "MET" if res["goal_met"] else "NOT met"
    print(f"\nTAPS / full FT peak training memory ({res['method']}) = {res['taps_peak_over_full']:.3f}; "
          f"goal <= {res['goal']:.2f}: {verdict}")
    if "lowrank_peak_over_lora" in res:
        print(f"TAPS r=16 / LoRA r=16 peak training memory = {res['lowrank_peak_over_lora']:.3f} (static "
              f"{res['lowrank_static_over_lora']:.3f}); goal <= 1.05: "
              f"{'MET' if res['lowrank_peak_over_lora'] <= 1.05 else 'NOT met'}")


if __name__ == "__main__":
    sys.exit(main())
