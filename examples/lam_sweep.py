"""lam sweep: accuracy against active layers for one task (the paper's Fig. 2), offline.

Pretrains the demo's small ViT on digits 0-4 (examples/multitask_demo.py), then trains one TAPS adapter per lam on a
demo task and prints accuracy and active layers k/L per lam; saves the curve to ``<out>/lam_sweep.png`` and JSON.

    python examples/lam_sweep.py [--task "rotated 0-9"] [--lams 0 0.05 0.1 0.2 0.5 1 2] [--out runs/lam_sweep]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import matplotlib.pyplot as plt
import torch
from peft import get_peft_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
import multitask_demo as demo  # noqa: E402  (data, training loop and base model of the main job)

import taps_peft  # noqa: E402


def main(argv: Optional[Sequence[str]] = None) -> list[dict[str, Any]]:
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--task", default="rotated 0-9", help="a task of examples/multitask_demo.py")
    own.add_argument("--lams", type=float, nargs="+", default=[0, 0.05, 0.1, 0.2, 0.5, 1, 2])
    sweep, rest = own.parse_known_args(argv)
    args = demo.parse_args(rest, demo.build_parser(__doc__, out="runs/lam_sweep"))  # the demo's options
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    (base_train, _), tasks = demo.load_tasks(args.seed)
    base = demo.pretrain_base(base_train, args)
    (train, test) = tasks[sweep.task]
    classes = int(train[1].max()) + 1

    rows = []
    print(f"{'lam':>6} {'acc':>6} {'k/L':>6}   (task {sweep.task!r})")
    for lam in sweep.lams:
        config = taps_peft.TAPSConfig(lam=lam, score_lr=args.score_lr)
        model = get_peft_model(demo.new_task_model(base, classes, args.seed), config)
        demo.fit(model, train, demo.optimizer(model, args.lr), args.steps, args.batch, penalty=model.taps_penalty)
        s = taps_peft.taps_summary(model)
        rows.append({"lam": lam, "accuracy": demo.accuracy(model, test), "active_layers": s["active_layers"],
                     "total_layers": s["total_layers"], "adapter_bytes": s["adapter_bytes"]})
        print(f"{lam:>6g} {rows[-1]['accuracy']:>6.3f} {s['active_layers']:>3}/{s['total_layers']}")

    args.out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["active_layers"] for r in rows], [r["accuracy"] for r in rows], "o-")
    for r in rows:
        ax.annotate(f"lam={r['lam']:g}", (r["active_layers"], r["accuracy"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.set(xlabel=f"active layers k (of {rows[0]['total_layers']})", ylabel="test accuracy",
           title=f"TAPS lam sweep: {sweep.task}")
    fig.tight_layout()
    fig.savefig(args.out / "lam_sweep.png", dpi=150)
    (args.out / "lam_sweep.json").write_text(json.dumps(rows, indent=2))
    print(f"wrote {args.out}/lam_sweep.png and lam_sweep.json")
    return rows


if __name__ == "__main__":
    main()
