#!/usr/bin/env python
"""Time no-grad inference of a TAPS model (unmerged and merged) against its base model, in the same run.

All strategies share one random-init timm model, one batch and one precision (defaults: 224 px, batch 16, as in
``bench_train_step.py``), and run in ``eval()`` under ``torch.no_grad()``:

* ``base``: the plain model (a deep copy), what a model without TAPS costs.
* ``TAPS unmerged``: ``get_peft_model(base, TAPSConfig(lam))`` with one adapter whose deltas are non-zero and whose
  scores put ``--active-frac`` of the gated layers (default 30%, a seeded random set) at 0.15 >= tau and the others at
  0.05 < tau. Active layers run on the cached formed weight ``W_base + dW``, inactive ones on the base layer.
* ``TAPS merged``: a deep copy of that model after ``merge_adapter()`` (PEFT keeps the wrappers so that it can
  unmerge: each costs one Python call, about 0.5 ms per forward for a ViT-Ti, visible only in small-input stress
  cases such as ``--img-size 64``; ``merge_and_unload()`` returns the plain model).
* ``TAPS mixed batch`` (``--mixed``): two adapters loaded, ``model(x, adapter_names=[...])`` with half the batch each.

Forward passes are interleaved in rounds (one of each strategy per round, order rotated every round) after untimed
warm-up rounds (which also fill the formed-weight cache); the table shows medians, p25-p75 and ratios to ``base``.
On cuda it also reports the peak memory of each strategy's forward as if it were alone on the device (what it holds
between calls plus the peak its forward adds), via ``torch.cuda.max_memory_allocated``; on every device it reports
what each strategy holds between calls (parameters, buffers, TAPS formed-weight cache and set-aside base weights).

Examples:
    python benchmarks/bench_inference.py                        # CPU defaults, under a minute on 2 cores
    python benchmarks/bench_inference.py --threads 1 --mixed --json out.json
    python benchmarks/bench_inference.py --device cuda --dtype bf16 --model vit_base_patch16_224 \\
        --img-size 224 --batch 128

Goals: TAPS unmerged / base <= 1.05; TAPS merged / base = 1.00 (met when <= 1.00 + --tolerance, default 0.01, the
timing noise of an idle machine). The script prints whether they are met; it never fails because of them.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

import _common as C

GOALS = {"TAPS unmerged": 1.05, "TAPS merged": 1.00}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    C.add_common_args(p, batch=16, img_size=224)
    p.add_argument("--steps", type=int, default=None, help="timed rounds (default: 40 on cpu, 50 on cuda; quick: 8)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default: 5 on cpu, 10 on cuda)")
    p.add_argument("--active-frac", type=float, default=0.3, help="fraction of gated layers active (default 0.3)")
    p.add_argument("--lam", type=float, default=0.5, help="TAPS lam (does not affect inference)")
    p.add_argument("--mixed", action="store_true", help="also time a mixed-task batch (adapter_names, 2 adapters)")
    p.add_argument("--tolerance", type=float, default=0.01, help="noise allowance on the merged goal of 1.00")
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 8 if args.quick else (40 if args.device == "cpu" else 50)
    if args.warmup is None:
        args.warmup = 2 if args.quick else (5 if args.device == "cpu" else 10)
    if args.steps < 1 or args.warmup < 1:
        p.error("--steps and --warmup must be >= 1 (warm-up fills the formed-weight cache)")
    if not 0.0 <= args.active_frac <= 1.0:
        p.error("--active-frac must be in [0, 1]")
    C.check_common_args(p, args)
    return args


@dataclass
class Strategy:
    name: str
    model: nn.Module
    call: Callable[[torch.Tensor], torch.Tensor]
    times_ms: list[float] = field(default_factory=list)
    peak_bytes: list[int] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


def build(args: argparse.Namespace) -> list[Strategy]:
    import taps_peft
    from peft import get_peft_model

    base = C.build_base(args)
    plain = copy.deepcopy(base).to(args.device).eval()
    strategies = [Strategy("base", plain, call=plain)]

    taps = get_peft_model(copy.deepcopy(base), taps_peft.TAPSConfig(lam=args.lam))
    n_layers = len(C.taps_layers(taps))
    active = C.choose_active(n_layers, args.active_frac, random.Random(args.seed))
    C.shape_adapter(taps, "default", active, seed=args.seed + 1)
    taps = taps.to(args.device).eval()
    info = {"active_layers": f"{len(active)}/{n_layers}"}
    strategies.append(Strategy("TAPS unmerged", taps, call=taps, info=dict(info)))

    merged = copy.deepcopy(taps)
    merged.merge_adapter()
    strategies.append(Strategy("TAPS merged", merged, call=merged, info=dict(info)))

    if args.mixed:
        mixed = copy.deepcopy(taps)
        mixed.add_adapter("b", taps_peft.TAPSConfig(lam=args.lam))
        active_b = C.choose_active(n_layers, args.active_frac, random.Random(args.seed + 100))
        C.shape_adapter(mixed, "b", active_b, seed=args.seed + 2)
        mixed = mixed.to(args.device).eval()
        names = ["default" if i < args.batch // 2 else "b" for i in range(args.batch)]
        strategies.append(
            Strategy(
                "TAPS mixed batch", mixed, call=lambda x, m=mixed, n=names: m(x, adapter_names=n),
                info={"active_layers": f"{len(active)}+{len(active_b)}/{n_layers}"},
            )
        )
    return strategies


def forward(s: Strategy, x: torch.Tensor, args: argparse.Namespace) -> torch.Tensor:
    with torch.no_grad(), C.autocast(args):
        return s.call(x)


def check_outputs(strategies: list[Strategy], x: torch.Tensor, args: argparse.Namespace) -> dict[str, float]:
    """The benchmark times the real thing: merged == unmerged, and the adapter does change the output."""
    outs = {s.name: forward(s, x, args).float() for s in strategies}
    return {
        "max_abs_diff_merged_vs_unmerged": float((outs["TAPS merged"] - outs["TAPS unmerged"]).abs().max()),
        "max_abs_diff_unmerged_vs_base": float((outs["TAPS unmerged"] - outs["base"]).abs().max()),
    }


def timed_forward(s: Strategy, others_held: int, x: torch.Tensor, args: argparse.Namespace, record: bool) -> None:
    if args.device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    with C.Timer(args.device) as t:
        forward(s, x, args)
    if record:
        s.times_ms.append(t.ms)
        if args.device == "cuda":
            # As if alone on the device: what this strategy holds plus the peak its forward added.
            s.peak_bytes.append(torch.cuda.max_memory_allocated() - others_held)


def run_rounds(strategies: list[Strategy], x: torch.Tensor, args: argparse.Namespace) -> None:
    held = {s.name: C.storage_bytes(C.held_tensors(s.model), "cuda") for s in strategies}
    total = sum(held.values())  # strategies share nothing (deep copies)
    for r in range(args.warmup + args.steps):
        for s in C.rotate(strategies, r):
            timed_forward(s, total - held[s.name], x, args, record=r >= args.warmup)


def summarize(strategies: list[Strategy], checks: dict[str, float], args: argparse.Namespace) -> dict[str, Any]:
    base = strategies[0]
    base_med = statistics.median(base.times_ms)
    rows = []
    for s in strategies:
        st = C.stats(s.times_ms)
        paired = [a / b for a, b in zip(s.times_ms, base.times_ms)]
        rows.append(
            {
                "strategy": s.name,
                "median_ms": st["median"],
                "mean_ms": st["mean"],
                "min_ms": st["min"],
                "p25_ms": st["p25"],
                "p75_ms": st["p75"],
                "ratio_vs_base": st["median"] / base_med,
                "paired_ratio_median": statistics.median(paired),
                "paired_ratio_p25": C._quantile(paired, 0.25),
                "paired_ratio_p75": C._quantile(paired, 0.75),
                "held_bytes": C.storage_bytes(C.held_tensors(s.model)),
                "peak_mem_bytes": max(s.peak_bytes) if s.peak_bytes else None,
                "times_ms": s.times_ms,
                **s.info,
            }
        )
    by = {r["strategy"]: r for r in rows}
    goals = {}
    for name, goal in GOALS.items():
        allowed = goal + (args.tolerance if goal == 1.00 else 0.0)
        goals[name] = {"goal": goal, "allowed": allowed, "ratio": by[name]["ratio_vs_base"],
                       "met": by[name]["ratio_vs_base"] <= allowed}
    base_peak = by["base"]["peak_mem_bytes"]
    return {
        "benchmark": "inference",
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "env": C.env_info(args),
        "results": rows,
        "checks": checks,
        "unmerged_over_base": by["TAPS unmerged"]["ratio_vs_base"],
        "merged_over_base": by["TAPS merged"]["ratio_vs_base"],
        "unmerged_over_base_paired": by["TAPS unmerged"]["paired_ratio_median"],
        "merged_over_base_paired": by["TAPS merged"]["paired_ratio_median"],
        "unmerged_peak_mem_over_base": (by["TAPS unmerged"]["peak_mem_bytes"] / base_peak) if base_peak else None,
        "merged_peak_mem_over_base": (by["TAPS merged"]["peak_mem_bytes"] / base_peak) if base_peak else None,
        "goals": goals,
        "goal_met": all(g["met"] for g in goals.values()),
    }


def print_table(res: dict[str, Any]) -> None:
    cfg, env = res["config"], res["env"]
    print(
        f"\n{cfg['model']} img {cfg['img_size']} batch {cfg['batch']} | {cfg['device']} {cfg['dtype']} | eval, no_grad | "
        f"{cfg['steps']} timed rounds after {cfg['warmup']} warm-up, interleaved | torch {env['torch']} "
        f"threads {env['torch_threads']} | load {env['loadavg_1m']}"
    )
    mem = cfg["device"] == "cuda"
    head = (f"{'strategy':<17} {'active':>8} {'median ms':>10} {'p25-p75 ms':>15} {'min ms':>8} {'vs base':>8} "
            f"{'paired (p25-p75)':>20} {'held MiB':>9}" + (f" {'peak MiB':>9}" if mem else ""))
    print(head)
    print("-" * len(head))
    for r in res["results"]:
        line = (
            f"{r['strategy']:<17} {r.get('active_layers', '-'):>8} {r['median_ms']:>10.2f} "
            f"{r['p25_ms']:>7.2f}-{r['p75_ms']:<7.2f} {r['min_ms']:>8.2f} {r['ratio_vs_base']:>8.3f} "
            f"{r['paired_ratio_median']:>7.3f} ({r['paired_ratio_p25']:.3f}-{r['paired_ratio_p75']:.3f}) "
            f"{C.mib(r['held_bytes']):>9}"
        )
        if mem:
            line += f" {C.mib(r['peak_mem_bytes']):>9}"
        print(line)
    ch = res["checks"]
    print(
        f"(checks: |merged - unmerged| max {ch['max_abs_diff_merged_vs_unmerged']:.2e}; "
        f"|unmerged - base| max {ch['max_abs_diff_unmerged_vs_base']:.2e}, > 0: the adapter is applied)"
    )
    print()
    for name, g in res["goals"].items():
        verdict = "MET" if g["met"] else "NOT met"
        tol = f" (allowed {g['allowed']:.2f}: noise tolerance)" if g["allowed"] != g["goal"] else ""
        print(f"{name} / base (ratio of medians) = {g['ratio']:.3f}; goal <= {g['goal']:.2f}{tol}: {verdict}")
    if res["unmerged_peak_mem_over_base"] is not None:
        print(
            f"peak memory / base: unmerged {res['unmerged_peak_mem_over_base']:.3f}, "
            f"merged {res['merged_peak_mem_over_base']:.3f}"
        )


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    strategies = build(args)
    x, _ = C.make_batch(args)
    checks = check_outputs(strategies, x, args)
    with C.no_gc():
        run_rounds(strategies, x, args)
    C.emit(summarize(strategies, checks, args), args, print_table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
