"""A stable end of training, measured: TAPS at a large lam on a pretrained base, with and without frozen gates for
the last part of training and BatchNorm statistics re-estimated at the end.

A gate that flips in the last steps changes what the layers after it see, while the task's BatchNorm running
statistics still average the earlier activations: eval accuracy can drop although the training loss is low. This
trains TAPS on one task of examples/pretrained_demo.py (same base, data and budget) for each lam and seed twice:
gates free to the end, and gates frozen (``model.freeze_gates()``) after ``--freeze-at`` of the steps. Each model is
evaluated as trained and again after ``recalibrate_batchnorm`` (no weight changes), so one seed gives four numbers.
It also counts the steps in the last 20% of training at which the set of active layers changed.

    python examples/end_of_training.py [--lams 2 0.2] [--seeds 0 1 2] [--task digits] [--out runs/end_of_training]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pretrained_demo as pd  # noqa: E402  (base, data, TAPS training of the main job)

import taps_peft  # noqa: E402
from taps_peft import recalibrate_batchnorm  # noqa: E402


def run(base, split, lam: float, seed: int, freeze: bool, args: argparse.Namespace) -> dict[str, Any]:
    """One TAPS training; accuracy before and after BatchNorm re-estimation, and when the gates last changed."""
    (train, _, test), classes = split, int(split[0][1].max()) + 1
    args.seed = seed
    model = pd.new_taps_model(base, classes, lam, seed)
    history: list[tuple[bool, ...]] = []
    lr = pd.chosen(pd.read_selection(args), args.tasks[0], "taps")[0]["lr"]
    pd.train_taps(model, train, pd.task_steps(args.tasks[0], len(train[1]), args), lr, args,
                  args.freeze_at if freeze else None, recalibrate=False,
                  on_step=lambda step: history.append(tuple(r["active"] for r in taps_peft.taps_layer_report(model))))
    steps = len(history)
    changes = [i + 1 for i in range(1, steps) if history[i] != history[i - 1]]
    row = {"lam": lam, "seed": seed, "gates": "frozen" if freeze else "free", "steps": steps,
           "accuracy": pd.demo.accuracy(model, test),
           "active_layers": sum(history[-1]), "total_layers": len(history[-1]),
           "late_changes": sum(step > 0.8 * steps for step in changes), "last_change": max(changes, default=0)}
    recalibrate_batchnorm(model, pd.recalibration_batches(train[0], seed))
    row["accuracy_recalibrated"] = pd.demo.accuracy(model, test)
    return row


def main(argv: Optional[Sequence[str]] = None) -> list[dict[str, Any]]:
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--lams", type=float, nargs="+", default=[2.0, 0.2])
    own.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    own.add_argument("--task", default="digits", choices=list(pd.TASKS))
    study, rest = own.parse_known_args(argv)
    args = pd.parse_args([*rest, "--tasks", study.task], __doc__, out="runs/end_of_training")
    args.freeze_at = args.freeze_at or 0.8
    base, tasks = pd.setup(args)
    rows = []
    print(f"{'lam':>4} {'seed':>4} {'gates':>7} {'acc':>6} {'acc+BN':>6} {'k/L':>6} {'late':>4} {'last':>4}"
          f"   (task {study.task!r}; late = steps in the last 20% with a gate change; last = last such step)")
    for lam in study.lams:
        for seed in study.seeds:
            for freeze in (False, True):
                r = run(base, tasks[study.task], lam, seed, freeze, args)
                rows.append(r)
                print(f"{lam:>4g} {seed:>4} {r['gates']:>7} {r['accuracy']:>6.3f} {r['accuracy_recalibrated']:>6.3f} "
                      f"{r['active_layers']:>3}/{r['total_layers']:<2} {r['late_changes']:>4} {r['last_change']:>4}",
                      flush=True)
    print(f"\nmean over seeds ({len(study.seeds)}) of test accuracy")
    print(f"{'lam':>4} {'gates':>7} {'as trained':>10} {'BN re-estimated':>15}")
    for lam in study.lams:
        for gates in ("free", "frozen"):
            sel = [r for r in rows if r["lam"] == lam and r["gates"] == gates]
            print(f"{lam:>4g} {gates:>7} {sum(r['accuracy'] for r in sel) / len(sel):>10.3f} "
                  f"{sum(r['accuracy_recalibrated'] for r in sel) / len(sel):>15.3f}")
    args.out.mkdir(parents=True, exist_ok=True)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in {**vars(args), **vars(study)}.items()}
    pd.atomic_write(args.out / "end_of_training.json", json.dumps({"config": config, "rows": rows}, indent=2))
    print(f"wrote {args.out}/end_of_training.json")
    return rows


if __name__ == "__main__":
    main()
