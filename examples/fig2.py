#!/usr/bin/env python
"""The paper's Fig. 2 on the main job's tasks: test accuracy against the share of task-specific layers as lam varies,
with full fine-tuning, the linear probe and the fixed-layer rules (same k as TAPS) as references.

Reads what the main job wrote (nothing is trained here):

    python examples/pretrained_demo.py --lam-sweep 0.03 0.1 0.3 1 3 --tasks "digits on photos" "digit rotation" \\
        --out runs/fig2                                   # TAPS alone over lam (lam_sweep.json)
    python examples/pretrained_demo.py --fixed-layers --out runs/pretrained     # the references (results.json)
    python examples/fig2.py --sweep runs/fig2/lam_sweep.json --results runs/pretrained/results.json \\
        --out docs/fig2_accuracy_vs_layers.png

``--results`` takes several files of one seed (say a full job and a ``--methods taps --fixed-layers`` one): each
task's references are merged, the first file that has a value wins.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

REFERENCES = {"full_ft": ("full FT", "tab:red", "--"), "head_only": ("probe (head only)", "tab:gray", ":")}
RULES = {"last": ("last k", "v"), "first": ("first k", "^"), "random": ("random k", "s")}


def plot(sweep: list[dict[str, Any]], results: dict[str, Any], path: Path) -> None:
    """One panel per swept task: TAPS over lam (labelled), the main run's TAPS, and the references."""
    from matplotlib.figure import Figure

    tasks = list(dict.fromkeys(row["task"] for row in sweep))
    fig = Figure(figsize=(5 * len(tasks), 4))
    for i, task in enumerate(tasks):
        ax = fig.add_subplot(1, len(tasks), i + 1)
        rows = sorted((r for r in sweep if r["task"] == task), key=lambda r: r["active_layers"])
        xs = [100 * r["active_layers"] / r["total_layers"] for r in rows]
        ax.plot(xs, [r["accuracy"] for r in rows], "o-", color="tab:blue", label="TAPS, lam swept")
        for x, r in zip(xs, rows):
            ax.annotate(f"{r['lam']:g}", (x, r["accuracy"]), textcoords="offset points", xytext=(4, -10), fontsize=7)
        main = results["tasks"].get(task, {})
        for key, (label, color, style) in REFERENCES.items():
            if key in main:
                ax.axhline(main[key], color=color, linestyle=style, label=label)
        if "taps" in main:
            k = 100 * main["active_layers"] / main["total_layers"]
            ax.plot([k], [main["taps"]], "*", color="tab:blue", markersize=12, label="TAPS, selected lam")
            for rule, (label, marker) in RULES.items():
                if rule in main.get("fixed_layers", {}):
                    ax.plot([k], [main["fixed_layers"][rule]], marker, color="tab:green", label=label, alpha=0.8)
        ax.set_title(task)
        ax.set_xlabel("task-specific layers (% of gated layers)")
        ax.set_ylabel("test accuracy")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One ``results.json`` from several of one seed: per task, a key comes from the first file that has it.

    >>> merge([{"tasks": {"a": {"taps": 0.9}}}, {"tasks": {"a": {"taps": 0.8, "full_ft": 0.95}}}])
    {'tasks': {'a': {'taps': 0.9, 'full_ft': 0.95}}}
    """
    seeds = {r["protocol"]["seed"] for r in results if "protocol" in r}
    if len(seeds) > 1:
        raise SystemExit(f"--results mixes seeds {sorted(seeds)}: give the files of one seed")
    tasks: dict[str, dict[str, Any]] = {}
    for r in results:
        for task, values in r["tasks"].items():
            tasks[task] = {**values, **tasks.get(task, {})}
    return {"tasks": tasks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", type=Path, required=True, help="lam_sweep.json of pretrained_demo.py --lam-sweep")
    parser.add_argument("--results", type=Path, nargs="+", required=True,
                        help="results.json of the main job (the references); several are merged per task")
    parser.add_argument("--out", type=Path, default=Path("runs/fig2.png"))
    args = parser.parse_args()
    sweep = json.loads(args.sweep.read_text())["rows"]
    plot(sweep, merge([json.loads(path.read_text()) for path in args.results]), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
