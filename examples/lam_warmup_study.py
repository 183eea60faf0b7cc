"""How long should lam ramp from 0 (``TAPSConfig.lam_warmup``)? Validation accuracy and k/L of TAPS (full-size and
rank-8 deltas, each at TAPSConfig's defaults otherwise) on the main job's tasks, for each warm-up, both at TAPS's
committed setting of each task (lr, lam: low-rank deltas train at full deltas' learning rate), every other choice as in
the main job (``pretrained_demo.py``: EfficientNet-Lite0, 64 px, AdamW, gates frozen at 80%, BatchNorm re-estimated).
The test split is never read.

    python examples/lam_warmup_study.py --seeds 0 1 --warmups 0 0.25 0.5 --json runs/lam_warmup.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
import pretrained_demo as job  # noqa: E402

import taps_peft  # noqa: E402
from peft import get_peft_model  # noqa: E402


def run(args: argparse.Namespace) -> list[dict]:
    demo_args = job.parse_args(["--tasks", *args.tasks])
    chosen = json.loads(job.SELECTION.read_text())["tasks"]
    base = job.efficientnet_lite0(num_classes=1000).eval()
    mean, std = base.pretrained_cfg["mean"], base.pretrained_cfg["std"]
    rows = []
    for seed in args.seeds:
        demo_args.seed = seed
        for task in args.tasks:
            splits = job.load_task(task, demo_args.size, mean, std, seed)
            train, val = splits[0], splits[1]
            steps = job.task_steps(task, len(train[1]), demo_args)
            setting = chosen[task]["taps"]["chosen"]  # TAPS's (lr, lam), for both: low-rank at full deltas' lr
            for kind in args.kinds:
                r = None if kind == "full" else demo_args.lowrank_r
                for warmup in args.warmups:
                    start = time.perf_counter()
                    config = taps_peft.TAPSConfig(lam=setting["lam"], r=r, lam_warmup=warmup, total_step=steps)
                    model = get_peft_model(job.demo.new_task_model(base, int(train[1].max()) + 1, seed), config)
                    job.train_taps(model, train, steps, setting["lr"], demo_args, demo_args.freeze_at,
                                   demo_args.recalibrate_bn, lambda step: None)
                    summary = taps_peft.taps_summary(model)
                    row = {"seed": seed, "task": task, "deltas": kind, "lam_warmup": warmup, **setting,
                           "val_accuracy": job.demo.accuracy(model, val),
                           "k/L": summary["active_layers"] / summary["total_layers"],
                           "seconds": round(time.perf_counter() - start, 1)}
                    rows.append(row)
                    print(f"seed {seed} {task:>17} {kind:>4} warm-up {warmup:<4}: val {row['val_accuracy']:.3f} "
                          f"k/L {row['k/L']:.2f} ({row['seconds']:.0f} s)", flush=True)
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
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    rows = run(args)
    summarise(rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
