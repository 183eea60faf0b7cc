#!/usr/bin/env python
"""Run every benchmark with shared flags; print one summary table at the end and write one JSON file.

Runs, each as its own process (one at a time, so they do not compete for the cores), with ``--json`` to a
temporary file that is collected afterwards:

    train_step   bench_train_step.py --lora     TAPS (frozen gates, LoRA) step / full fine-tuning step
    inference    bench_inference.py             TAPS unmerged / merged forward vs the base model
    switch       bench_switch.py                task switch time and bytes with N adapters, adapter size
    memory       bench_memory.py --lora         TAPS / full fine-tuning training memory

Every script's own table is printed as it finishes. A script that fails is reported (and makes the exit code 1);
a goal that is not met never does.

Examples:
    python benchmarks/run_all.py --json runs/bench.json                 # CPU, a few minutes on 2 idle cores
    python benchmarks/run_all.py --quick                                # functional check of every script
    python benchmarks/run_all.py --device cuda --threads 8 --json runs/bench_cuda.json
    python benchmarks/run_all.py --only inference,switch -- --model vit_small_patch16_224
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

BENCHMARKS = ["train_step", "inference", "switch", "memory"]
SCRIPTS = {
    "train_step": ("bench_train_step.py", ["--lora"]),
    "inference": ("bench_inference.py", []),
    "switch": ("bench_switch.py", []),
    "memory": ("bench_memory.py", ["--lora"]),
}


def parse_args(argv: Optional[list[str]] = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads, passed to every script")
    p.add_argument("--quick", action="store_true", help="few rounds everywhere: a functional check, not a measurement")
    p.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    p.add_argument("--json", default=None, metavar="PATH", help="write every result and the summary to PATH")
    p.add_argument("extra", nargs="*", help="after --: flags passed to every script (e.g. --model, --dtype bf16)")
    args = p.parse_args(argv)
    names = BENCHMARKS if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        p.error(f"--only: unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    args.names = names
    return args, args.extra


def command(name: str, args: argparse.Namespace, extra: list[str], json_path: str) -> list[str]:
    script, own = SCRIPTS[name]
    cmd = [sys.executable, os.path.join(HERE, script), *own, "--device", args.device, "--json", json_path]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.quick:
        # bench_train_step.py has no --quick: few rounds instead
        cmd += ["--steps", "6", "--warmup", "2"] if name == "train_step" else ["--quick"]
    return cmd + extra


# ----------------------------------------------------------------------------------------------------------------
# Summary rows: (benchmark, metric, value, goal, verdict)
# ----------------------------------------------------------------------------------------------------------------

Row = dict[str, Any]


def _row(bench: str, metric: str, value: Any, goal: Optional[str] = None, met: Optional[bool] = None) -> Row:
    return {"benchmark": bench, "metric": metric, "value": value, "goal": goal,
            "met": None if met is None else bool(met)}


def rows_train_step(r: dict[str, Any]) -> list[Row]:
    dev = r["config"]["device"]
    out = [
        _row("train_step", "TAPS / full FT step time", r["taps_over_full"], f"<= {r['goal']:.2f} ({dev})",
             r["goal_met"]),
        _row("train_step", "  (median of paired per-round ratios)", r["taps_over_full_paired"]),
    ]
    if r.get("frozen_over_full") is not None:
        out.append(_row("train_step", f"TAPS frozen gates ({r['frozen_active_layers']} open) / full FT step",
                        r["frozen_over_full"], f"<= {r['frozen_goal']:.2f}", r["frozen_goal_met"]))
    for res in r["results"]:
        if res["strategy"].startswith("LoRA"):
            out.append(_row("train_step", f"{res['strategy']} / full FT step time", res["ratio_vs_full"]))
    if r.get("taps_peak_mem_over_full") is not None:
        out.append(_row("train_step", "TAPS / full FT peak memory (cuda)", r["taps_peak_mem_over_full"], "<= 1.05",
                        r["taps_peak_mem_over_full"] <= 1.05))
    return out


def rows_inference(r: dict[str, Any]) -> list[Row]:
    active = next(x["active_layers"] for x in r["results"] if x["strategy"] == "TAPS unmerged")
    out = []
    for name, g in r["goals"].items():
        goal = f"<= {g['goal']:.2f}" + (f" (+{g['allowed'] - g['goal']:.2f} noise)" if g["allowed"] != g["goal"] else "")
        out.append(_row("inference", f"{name} / base forward ({active} active)", g["ratio"], goal, g["met"]))
    for x in r["results"]:
        if x["strategy"] == "TAPS mixed batch":
            out.append(_row("inference", "TAPS mixed batch / base forward", x["ratio_vs_base"]))
    if r.get("unmerged_peak_mem_over_base") is not None:
        out.append(_row("inference", "unmerged / base peak memory (cuda)", r["unmerged_peak_mem_over_base"]))
        out.append(_row("inference", "merged / base peak memory (cuda)", r["merged_peak_mem_over_base"]))
    return out


def rows_switch(r: dict[str, Any]) -> list[Row]:
    out = []
    for mode in ["unmerged", "merged"]:
        ns = [x for x in r["n_sweep"] if x["mode"] == mode]
        out.append(_row("switch", f"{mode} switch overhead ms, N=" + "/".join(str(x["n_adapters"]) for x in ns),
                        " / ".join(f"{x['overhead_ms']:.1f}" for x in ns)))
        out.append(_row("switch", f"{mode} formed MiB per switch, N=" + "/".join(str(x["n_adapters"]) for x in ns),
                        " / ".join(f"{x['formed_bytes'] / 2**20:.2f}" for x in ns)))
    fr = [x for x in r["fraction_sweep"] if x["mode"] == "merged"]
    out.append(_row("switch", "formed MiB per switch, " + ", ".join(x["config"].replace(" ", "") for x in fr),
                    " / ".join(f"{x['formed_bytes'] / 2**20:.2f}" for x in fr)))
    out.append(_row("switch", "adapter file / full model, active " + "/".join(f"{x['active_frac']:.0%}"
                                                                                for x in r["sizes"]),
                    " / ".join(f"{x['file_over_full_model_file']:.3f}" for x in r["sizes"])))
    ch = r["checks"]
    out.append(_row("switch", "loaded adapter in memory / model", ch["adapter_held_bytes"] / r["model_bytes"]))
    out.append(_row("switch", "switches touching layers outside A u B", ch["switches_beyond_active_sets"], "0",
                    ch["switches_beyond_active_sets"] == 0))
    return out


def rows_memory(r: dict[str, Any]) -> list[Row]:
    out = [_row("memory", f"TAPS / full FT training memory ({r['method']})", r["taps_peak_over_full"],
                f"<= {r['goal']:.2f}", r["goal_met"])]
    out.append(_row("memory", "  params + grads + optimizer state only", r["taps_static_over_full"]))
    for x in r["results"]:
        if x["strategy"].startswith("LoRA"):
            out.append(_row("memory", f"{x['strategy']} / full FT training memory", x["measured_peak_over_full"]))
    return out


SUMMARIZERS: dict[str, Callable[[dict[str, Any]], list[Row]]] = {
    "train_step": rows_train_step,
    "inference": rows_inference,
    "switch": rows_switch,
    "memory": rows_memory,
}


def print_summary(rows: list[Row], runs: dict[str, Any], args: argparse.Namespace) -> None:
    print("\n" + "=" * 100)
    print(f"SUMMARY ({args.device}, threads {args.threads or 'default'}{', QUICK: not a measurement' if args.quick else ''};"
          " ratios measured side by side within each script)")
    w = max([len(r["metric"]) for r in rows] + [10])
    head = f"{'benchmark':<11} {'metric':<{w}} {'value':>22} {'goal':>22} {'':>7}"
    print(head)
    print("-" * len(head))
    for r in rows:
        v = r["value"]
        v = f"{v:.3f}" if isinstance(v, float) else str(v)
        verdict = "" if r["met"] is None else ("MET" if r["met"] else "NOT met")
        print(f"{r['benchmark']:<11} {r['metric']:<{w}} {v:>22} {r['goal'] or '':>22} {verdict:>7}")
    for name, run in runs.items():
        status = "ok" if run["rc"] == 0 else f"FAILED (exit {run['rc']})"
        print(f"{name}: {status}, {run['wall_s']:.0f} s")


def main(argv: Optional[list[str]] = None) -> int:
    args, extra = parse_args(argv)
    runs: dict[str, Any] = {}
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="taps_bench_") as tmp:
        for name in args.names:
            path = os.path.join(tmp, f"{name}.json")
            cmd = command(name, args, extra, path)
            print(f"\n### {name}: {' '.join(os.path.relpath(c) if c.endswith('.py') else c for c in cmd[1:])}",
                  flush=True)
            t0 = time.perf_counter()
            rc = subprocess.call(cmd)
            run: dict[str, Any] = {"command": cmd[1:], "rc": rc, "wall_s": time.perf_counter() - t0}
            if rc == 0 and os.path.exists(path):
                with open(path, encoding="utf-8") as f:
                    run["result"] = json.load(f)
                try:
                    rows += SUMMARIZERS[name](run["result"])
                except (KeyError, TypeError, ZeroDivisionError) as e:  # a script's output changed shape
                    rows.append(_row(name, f"(summary failed: {type(e).__name__}: {e})", "-"))
            else:
                rows.append(_row(name, "(script failed, see its output above)", "-"))
                if rc == 0:
                    run["rc"] = rc = 1
            runs[name] = run
    print_summary(rows, runs, args)
    if args.json:
        from bench_train_step import write_json

        write_json(args.json, {
            "config": {"device": args.device, "threads": args.threads, "quick": args.quick, "extra": extra,
                       "benchmarks": args.names},
            "summary": rows,
            "runs": runs,
        })
        print(f"wrote {args.json}")
    return 0 if all(r["rc"] == 0 for r in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
