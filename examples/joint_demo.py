"""Joint vs incremental TAPS on the multi-task demo's four tasks (offline, a few minutes on 2 CPU cores).

Pretrains the small ViT of ``multitask_demo.py`` on digits 0-4 (its data and training loop are imported), then adapts
it to digits 5-9, inverted digits, rotated digits and faces in three ways, with the same number of batches per task:

(a) incremental TAPS: an independent adapter per task on the frozen pretrained base (as in multitask_demo.py);
(b) joint TAPS (the paper's Eq. 4, ``taps_peft.training.train_joint``): the shared base is trained too;
(c) shared-then-incremental (``train_shared_then_incremental``): full fine-tuning of one shared network with a head
    per task (half the batches), then incremental TAPS per task on it (the other half).

Prints test accuracy and task-specific layers k/L per task and strategy, and the mean k/L; writes
``runs/joint/results.json`` and the joint models (``save_joint``: the new base plus one adapter per task).

    python examples/joint_demo.py [--out runs/joint] [--steps 300] [--lam 0.2] [--train-base gated] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from peft import get_peft_model
from torch import nn

import taps_peft
from taps_peft.training import load_joint, save_joint, train_joint, train_shared_then_incremental

_spec = importlib.util.spec_from_file_location("multitask_demo", Path(__file__).with_name("multitask_demo.py"))
demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(demo)


def incremental(base: nn.Module, tasks: dict, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """(a) One TAPS adapter per task on a copy of the frozen base: multitask_demo.py's TAPS arm."""
    out = {}
    for name, ((train, test), n) in tasks.items():
        config = taps_peft.TAPSConfig(lam=args.lam, score_lr=args.score_lr)
        model = get_peft_model(demo.new_task_model(base, n, args.seed), config)
        demo.fit(model, train, demo.optimizer(model, args.lr), args.steps, args.batch, penalty=model.taps_penalty)
        out[name] = row(model, "default", test)
    return out


def row(model: Any, adapter: str, test: Any) -> dict[str, Any]:
    model.set_adapter(adapter)
    s = taps_peft.taps_summary(model, adapter)
    return {"accuracy": demo.accuracy(model, test), "active_layers": s["active_layers"],
            "total_layers": s["total_layers"], "layers": [r["name"] for r in taps_peft.taps_layer_report(model, adapter)
                                                          if r["active"]]}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = demo.build_parser(__doc__, out="runs/joint")  # --steps counts batches per task for every strategy
    p.add_argument("--train-base", default="gated", choices=("gated", "all"), help="joint: which base weights learn")
    p.add_argument("--schedule", default="round_robin", choices=("round_robin", "mixed"), help="joint batches")
    return demo.parse_args(argv, p)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    (base_train, base_test), data = demo.load_tasks(args.seed)
    base = demo.pretrain_base(base_train, args)
    print(f"base model, digits 0-4: test accuracy {demo.accuracy(base, base_test):.3f}")

    tasks = {name.replace(" ", "_"): (split, int(split[0][1].max()) + 1) for name, split in data.items()}
    train = {t: split[0] for t, (split, _) in tasks.items()}
    heads = {t: demo.new_task_model(base, n, args.seed).get_classifier() for t, (_, n) in tasks.items()}  # as in (a)
    opts = dict(heads=heads, lr=args.lr, batch_size=args.batch, seed=args.seed)
    config = taps_peft.TAPSConfig(lam=args.lam, score_lr=args.score_lr)
    results: dict[str, Any] = {}
    seconds: dict[str, float] = {}

    t0 = time.perf_counter()
    results["incremental"] = incremental(base, tasks, args)
    seconds["incremental"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    joint = train_joint(copy.deepcopy(base), train, config, args.steps, train_base=args.train_base,
                        schedule=args.schedule, **opts)
    results["joint"] = {t: row(joint, t, split[1]) for t, (split, _) in tasks.items()}
    seconds["joint"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    shared = train_shared_then_incremental(copy.deepcopy(base), train, config, args.steps - args.steps // 2,
                                           shared_steps=args.steps // 2, **opts)
    results["shared_then_incremental"] = {t: row(shared, t, split[1]) for t, (split, _) in tasks.items()}
    seconds["shared_then_incremental"] = time.perf_counter() - t0

    for name, model in (("joint", joint), ("shared_then_incremental", shared)):  # the new base + K adapters each
        save_joint(model, args.out / name)
    first, (split, _) = next(iter(tasks.items()))
    reloaded = demo.accuracy(load_joint(lambda: copy.deepcopy(base), args.out / "joint", first), split[1])
    assert reloaded == results["joint"][first]["accuracy"], "load_joint did not reproduce the joint model"

    names = {"incremental": "(a) incremental", "joint": "(b) joint", "shared_then_incremental": "(c) shared+incr."}
    header = f"{'strategy':<18}" + "".join(f"{t:>17}" for t in tasks) + f"{'mean acc':>10}{'mean k/L':>10}{'s':>6}"
    print("\n" + header + "\n" + "-" * len(header))
    for key, per_task in results.items():
        cells = "".join(f"{r['accuracy']:>8.3f} {r['active_layers']:>3}/{r['total_layers']:<4}"
                        for r in per_task.values())
        acc = sum(r["accuracy"] for r in per_task.values()) / len(per_task)
        kl = sum(r["active_layers"] / r["total_layers"] for r in per_task.values()) / len(per_task)
        per_task_summary = {"mean_accuracy": acc, "mean_k_over_L": kl, "seconds": seconds[key]}
        results[key] = {"tasks": per_task, **per_task_summary}
        print(f"{names[key]:<18}{cells}{acc:>10.3f}{kl:>10.3f}{seconds[key]:>6.0f}")
    print("cells: test accuracy, task-specific layers k/L (lower k/L = more layers shared)")
    verdict = results["joint"]["mean_k_over_L"] < results["incremental"]["mean_k_over_L"]
    gap = results["joint"]["mean_accuracy"] - results["incremental"]["mean_accuracy"]
    print(f"joint shares {'more' if verdict else 'no more'} layers than incremental "
          f"(mean k/L {results['joint']['mean_k_over_L']:.3f} vs {results['incremental']['mean_k_over_L']:.3f}), "
          f"mean accuracy {gap:+.3f}")

    args.out.mkdir(parents=True, exist_ok=True)
    config_json = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    report = {"config": config_json, "strategies": results, "seconds": time.perf_counter() - start}
    (args.out / "results.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}/results.json and {args.out}/{{joint,shared_then_incremental}} ({report['seconds']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
