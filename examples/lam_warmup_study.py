"""How long should lam ramp from 0 (``TAPSConfig.lam_warmup``)? Validation accuracy and k/L of TAPS (full-size and
rank-8 deltas, each at TAPSConfig's defaults otherwise) on the main job's tasks, for each warm-up, both at TAPS's
committed setting of each task (lr, lam: low-rank deltas train at full deltas' learning rate), every other choice as in
the main job (``pretrained_demo.py``: EfficientNet-Lite0, 64 px, AdamW, gates frozen at 80%, BatchNorm re-estimated).
The test split is never read.

    python examples/lam_warmup_study.py --seeds 1 2 --warmups 0 0.25 0.5 --json runs/lam_warmup.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pretrained_demo as job  # noqa: E402


def run(args: argparse.Namespace) -> list[dict]:
    chosen = json.loads(job.SELECTION.read_text())["tasks"]
    rows = []
    for seed in args.seeds:
        demo_args = job.parse_args(["--tasks", *args.tasks, "--seed", str(seed), "--workers", str(args.workers)])
        base, tasks = job.setup(demo_args)
        # TAPS's (lr, lam) for both kinds (low-rank deltas train at full deltas' lr), TAPSConfig's alpha otherwise
        runs = [job.Run(task, "taps" if kind == "full" else "taps_lowrank",
                        {**chosen[task]["taps"]["chosen"], "lam_warmup": warmup, "alpha": None}, test=False)
                for task in args.tasks for kind in args.kinds for warmup in args.warmups]
        outs = job.run_all(runs, demo_args, base, tasks, lambda r, o: f"seed {seed} {r.task} {job.NAMES[r.method]} "
                           f"warm-up {r.setting['lam_warmup']:g}: val {o['validation']:.3f} k/L {o['k/L']:.2f}")
        rows += [{"seed": seed, "task": r.task, "deltas": "full" if r.method == "taps" else f"r{demo_args.lowrank_r}",
                  **r.setting, "val_accuracy": o["validation"], "k/L": o["k/L"], "seconds": round(o["seconds"], 1)}
                 for r, o in zip(runs, outs)]
    return rows


def summarise(rows: list[dict]) -> None:
    print("\nmean validation accuracy (k/L) over seeds and tasks")
    for kind in dict.fromkeys(r["deltas"] for r in rows):
        for warmup in dict.fromkeys(r["lam_warmup"] for r in rows):
            sel = [r for r in rows if r["deltas"] == kind and r["lam_warmup"] == warmup]
            print(f"  {kind:>4} warm-up {warmup:<4}: {statistics.mean(r['val_accuracy'] for r in sel):.3f} "
                  f"({statistics.mean(r['k/L'] for r in sel):.2f})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=["digits on photos", "digit rotation"], choices=list(job.TASKS))
    p.add_argument("--kinds", nargs="+", default=["full", "r8"], choices=["full", "r8"])
    p.add_argument("--warmups", nargs="+", type=float, default=[0.0, 0.25, 0.5])
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2], help="not 0, on whose validation split the "
                   "committed settings were chosen")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    rows = run(args)
    summarise(rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
