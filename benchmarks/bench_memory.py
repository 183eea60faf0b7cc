#!/usr/bin/env python
"""Training memory of TAPS against full fine-tuning of the same model (and optionally LoRA), in the same run.

Strategies are built exactly as in ``bench_train_step.py`` (deep copies of one random-init timm model, same batch,
precision and optimizer; TAPS with every gate open as after ``get_peft_model``). Two measurements:

* ``components`` (every device, the CPU method): after a warm-up step, one training step is taken and the distinct
  tensor storages it involves are counted, by kind: parameters and buffers, gradients (after ``backward``), optimizer
  state (after ``step``) and the tensors autograd saves for backward (recorded with
  ``torch.autograd.graph.saved_tensors_hooks`` during the forward, minus those already counted as parameters: the
  activations, plus for TAPS the formed weights ``W_base + dW`` its layers compute with). The peak estimate is their
  sum: an upper bound of the step's live tensors that ignores short-lived temporaries and allocator caching (CPU
  allocators give no per-strategy peak; ``tracemalloc`` does not see torch's allocations).
* ``measured`` (cuda only): ``torch.cuda.max_memory_allocated`` over a training step, as if the strategy were alone
  on the device (the other strategies' resident bytes subtracted), max over ``--steps`` interleaved steps. This is the
  same measurement ``bench_train_step.py --device cuda`` reports next to its timings.

Examples:
    python benchmarks/bench_memory.py                      # CPU: components, a few seconds
    python benchmarks/bench_memory.py --lora --optim adamw --json out.json
    python benchmarks/bench_memory.py --device cuda --dtype bf16 --model vit_base_patch16_224 --img-size 224 \\
        --batch 128

Goal: TAPS / full fine-tuning peak training memory <= 1.05 (on cuda: measured; on cpu: the estimate). The script
prints whether it is met; it never fails because of it.
"""

from __future__ import annotations

import argparse
import gc
import sys
from typing import Any, Optional

import torch
import torch.nn.functional as F

import _common as C
import bench_train_step as T

GOAL = 1.05


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    C.add_common_args(p, batch=32)
    p.add_argument("--optim", choices=["sgd", "adamw"], default="sgd", help="sgd = SGD momentum 0.9 (paper)")
    p.add_argument("--lr", type=float, default=None, help="default: 0.01 for sgd, 1e-4 for adamw")
    p.add_argument("--lam", type=float, default=0.5, help="TAPS lam")
    p.add_argument("--lora", action="store_true", help="also measure PEFT LoRA r=16 on qkv, proj, fc1, fc2")
    p.add_argument("--steps", type=int, default=None, help="cuda: measured steps per strategy (default 5; quick 2)")
    args = p.parse_args(argv)
    if args.lr is None:
        args.lr = 0.01 if args.optim == "sgd" else 1e-4
    if args.steps is None:
        args.steps = 2 if args.quick else 5
    args.warmup = 1
    C.check_common_args(p, args)
    return args


def components(s: T.Strategy, x: torch.Tensor, y: torch.Tensor, args) -> dict[str, int]:
    """One training step; bytes of the distinct storages it involves, by kind (see the module docstring)."""
    model, opt = s.model, s.optimizer
    params = list(model.parameters()) + list(model.buffers())
    counted = {t.untyped_storage().data_ptr() for t in params}
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    opt.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), C.autocast(args):
        loss = F.cross_entropy(model(x), y)
        if s.extra_loss is not None:
            loss = loss + s.extra_loss()
    saved_bytes = C.storage_bytes([t for t in saved if t.untyped_storage().data_ptr() not in counted])
    loss.backward()
    grads = C.storage_bytes([p.grad for p in model.parameters()])
    del saved, loss
    opt.step()
    state = C.storage_bytes([v for st in opt.state.values() for v in st.values() if torch.is_tensor(v) and v.dim()])
    opt.zero_grad(set_to_none=True)
    out = {
        "param_buffer_bytes": C.storage_bytes(params),
        "trainable_param_bytes": C.storage_bytes([p for p in model.parameters() if p.requires_grad]),
        "grad_bytes": grads,
        "optimizer_state_bytes": state,
        "saved_for_backward_bytes": saved_bytes,
    }
    out["static_bytes"] = out["param_buffer_bytes"] + out["grad_bytes"] + out["optimizer_state_bytes"]
    out["peak_estimate_bytes"] = out["static_bytes"] + saved_bytes
    return out


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    base = T.build_base(args)
    strategies = [T.make_full(base, args), T.make_taps(base, args)]
    if args.lora:
        strategies.append(T.make_lora(base, args))
    del base
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=g).to(args.device)
    y = torch.randint(0, args.num_classes, (args.batch,), generator=g).to(args.device)

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

    full = rows[0]
    for r in rows:
        for k in ["static_bytes", "peak_estimate_bytes", "measured_peak_bytes"]:
            if k in r:
                r[k.replace("_bytes", "_over_full")] = r[k] / full[k]
    taps = rows[1]
    key = "measured_peak_over_full" if args.device == "cuda" else "peak_estimate_over_full"
    res = {
        "benchmark": "memory",
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "env": C.env_info(args),
        "method": "cuda max_memory_allocated per step" if args.device == "cuda" else "components (tensor storages)",
        "results": rows,
        "taps_peak_over_full": taps[key],
        "taps_static_over_full": taps["static_over_full"],
        "taps_peak_estimate_over_full": taps["peak_estimate_over_full"],
        "goal": GOAL,
        "goal_met": taps[key] <= GOAL,
    }
    C.emit(res, args, print_table)
    return 0


def print_table(res: dict[str, Any]) -> None:
    cfg, env = res["config"], res["env"]
    cuda = cfg["device"] == "cuda"
    print(
        f"\n{cfg['model']} img {cfg['img_size']} batch {cfg['batch']} | {cfg['device']} {cfg['dtype']} | {cfg['optim']} "
        f"| torch {env['torch']}"
    )
    head = (f"{'strategy':<10} {'params+buf':>10} {'grads':>8} {'opt state':>9} {'saved bwd':>9} {'static':>8} "
            f"{'estimate':>8} {'est/full':>8}" + (f" {'measured':>9} {'meas/full':>9}" if cuda else ""))
    print(head + "   (MiB)")
    print("-" * len(head))
    for r in res["results"]:
        line = (
            f"{r['strategy']:<10} {C.mib(r['param_buffer_bytes']):>10} {C.mib(r['grad_bytes']):>8} "
            f"{C.mib(r['optimizer_state_bytes']):>9} {C.mib(r['saved_for_backward_bytes']):>9} "
            f"{C.mib(r['static_bytes']):>8} {C.mib(r['peak_estimate_bytes']):>8} {r['peak_estimate_over_full']:>8.3f}"
        )
        if cuda:
            line += f" {C.mib(r['measured_peak_bytes']):>9} {r['measured_peak_over_full']:>9.3f}"
        print(line)
    print(
        "static = params + buffers + grads + optimizer state; estimate = static + tensors saved for backward "
        "(activations; TAPS: also the formed W_base + dW)"
    )
    verdict = "MET" if res["goal_met"] else "NOT met"
    print(f"\nTAPS / full FT peak training memory ({res['method']}) = {res['taps_peak_over_full']:.3f}; "
          f"goal <= {res['goal']:.2f}: {verdict}")


if __name__ == "__main__":
    sys.exit(main())
