"""Multi-task TAPS demo: one small base model, several downstream tasks, TAPS vs full fine-tuning vs a linear probe.

Runs offline (all data ships with scikit-learn and scikit-image) in a few minutes on 2 CPU cores:

1. Pretrain a small random-init timm ViT on digits 0-4 (scikit-learn's 8x8 digits).
2. Adapt it to four tasks that need different amounts of change: digits 5-9 (new classes), inverted digits 0-4 (new
   low-level statistics), digits 0-9 rotated by 90 degrees (new spatial layout) and faces vs non-faces
   (scikit-image's LFW subset, resized to 8x8: a new domain with 160 training images).
3. Train three strategies per task with the same number of steps: TAPS (``get_peft_model`` + ``taps_penalty``), full
   fine-tuning (every parameter of a copy of the base) and feature extraction (only a new head on the frozen base).
4. Print accuracy, TAPS active layers k/L and adapter size per task; save each TAPS adapter, ``results.json`` and
   ``layer_map.png`` (rows = tasks, columns = gated layers, filled = task-specific; the paper's Fig. 3 style).

    python examples/multitask_demo.py [--out runs/demo] [--steps 300] [--lam 0.2] [--seed 0] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import safetensors.torch
import timm
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure  # no pyplot: the PNG is drawn by the Agg backend, no display needed
from peft import get_peft_model
from skimage.data import lfw_subset
from sklearn.datasets import load_digits
from torch import nn

import taps_peft  # registers TAPS with PEFT

Data = tuple[torch.Tensor, torch.Tensor]  # images (N, 1, 8, 8), labels (N,)
Split = tuple[Data, Data]  # train, test


def split(x: torch.Tensor, y: torch.Tensor, test: torch.Tensor) -> Split:
    """Train/test split of images in [0, 1] by the boolean mask ``test``, standardised like the base task's inputs."""
    x = (x - 0.3) / 0.4
    return (x[~test], y[~test]), (x[test], y[test])


def holdout_mask(n: int, seed: int) -> torch.Tensor:
    """A fixed random 20% of ``n`` examples."""
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: n // 5]] = True
    return mask


def load_tasks(seed: int) -> tuple[Split, dict[str, Split]]:
    """The base task and the downstream tasks, built from data bundled with scikit-learn / scikit-image.

    Every digit task uses the same test digits, so no task is tested on (a transformed copy of) a base training image.
    """
    xs, ys = load_digits(return_X_y=True)
    x = torch.as_tensor(xs, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.as_tensor(ys)
    test, low, high = holdout_mask(len(y), seed), y < 5, y >= 5
    faces = torch.as_tensor(lfw_subset(), dtype=torch.float32).unsqueeze(1)  # 100 faces, then 100 non-faces
    faces = F.interpolate(faces, size=(8, 8), mode="area")
    tasks = {
        "digits 5-9": split(x[high], y[high] - 5, test[high]),
        "inverted 0-4": split(1.0 - x[low], y[low], test[low]),
        "rotated 0-9": split(torch.rot90(x, 1, (2, 3)), y, test),
        "faces": split(faces, (torch.arange(200) >= 100).long(), holdout_mask(200, seed)),
    }
    return split(x[low], y[low], test[low]), tasks


def fit(model: nn.Module, data: Data, opt: torch.optim.Optimizer, steps: int, batch: int,
        penalty: Optional[Callable[[], torch.Tensor]] = None,
        on_step: Optional[Callable[[int], None]] = None) -> None:
    """``steps`` optimizer steps of cross-entropy (+ TAPS penalty) over shuffled mini-batches, cosine lr (TAPS moves
    the scores at each step itself); ``on_step(steps_done)`` runs after each step (progress bars, freezing the
    gates)."""
    x, y = data
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    step = 0
    while step < steps:
        for idx in torch.randperm(len(y)).split(batch):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            if penalty is not None:
                loss = loss + penalty()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if on_step is not None:
                on_step(step)
            if step == steps:
                break


@torch.no_grad()
def accuracy(model: nn.Module, data: Data, batch: int = 64) -> float:
    """Top-1 accuracy in eval mode, ``batch`` images at a time (on the CPU about 2x faster per image than 256)."""
    model.eval()
    x, y = data
    return torch.cat([model(b).argmax(-1) for b in x.split(batch)]).eq(y).float().mean().item()


def optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, without weight decay (TAPS scores included: TAPS steps them itself)."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)


def safetensors_bytes(model: nn.Module) -> int:
    """Size of the model's full state dict as a safetensors file: what each task stores without TAPS."""
    return len(safetensors.torch.save({k: v.contiguous() for k, v in model.state_dict().items()}))


def new_task_model(base: nn.Module, num_classes: int, seed: int) -> nn.Module:
    """A copy of the base with a fresh head; the same seed gives every strategy the same head init."""
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    model.reset_classifier(num_classes)
    return model


def short_name(name: str) -> str:
    """``blocks.2.attn.qkv`` -> ``b2.qkv``, ``blocks.2.1.conv_pw`` -> ``b2.1.conv_pw`` (layer-map column labels)."""
    m = re.search(r"blocks\.(\d+(?:\.\d+)*)\..*?([^.]+)$", name)
    return f"b{m.group(1)}.{m.group(2)}" if m else ".".join(name.split(".")[-2:])


def run_task(base: nn.Module, data: Split, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Train TAPS, full fine-tuning and feature extraction on one task with the same budget."""
    (train, test), n = data, int(data[0][1].max()) + 1
    result: dict[str, Any] = {"classes": n, "train_size": len(train[1]), "test_size": len(test[1])}

    config = taps_peft.TAPSConfig(lam=args.lam, score_lr=args.score_lr)
    taps = get_peft_model(new_task_model(base, n, args.seed), config)
    fit(taps, train, optimizer(taps, args.lr), args.steps, args.batch, penalty=taps.taps_penalty)
    result["taps"] = accuracy(taps, test)
    taps.save_pretrained(str(out))
    summary = taps_peft.taps_summary(taps)
    result.update(
        active_layers=summary["active_layers"], total_layers=summary["total_layers"],
        adapter_bytes=(out / "adapter_model.safetensors").stat().st_size, taps_summary=summary,
        layers=[{k: r[k] for k in ("name", "score", "active", "params")} for r in taps_peft.taps_layer_report(taps)],
    )

    full = new_task_model(base, n, args.seed)
    fit(full, train, torch.optim.AdamW(full.parameters(), lr=args.lr), args.steps, args.batch)
    result["full_ft"] = accuracy(full, test)
    result["full_model_bytes"] = safetensors_bytes(full)

    probe = new_task_model(base, n, args.seed)
    probe.requires_grad_(False)
    head = probe.get_classifier()
    head.requires_grad_(True)
    fit(probe, train, torch.optim.AdamW(head.parameters(), lr=args.head_lr), args.steps, args.batch)
    result["feature_extraction"] = accuracy(probe, test)
    return result


def plot_layer_map(results: dict[str, dict[str, Any]], path: Path, dpi: int = 150) -> None:
    """Rows = tasks, columns = gated layers in depth order; a filled cell is a task-specific (active) layer."""
    tasks = list(results)
    names = [r["name"] for r in results[tasks[0]]["layers"]]
    grid = [[float(r["active"]) for r in results[t]["layers"]] for t in tasks]
    fig = Figure(figsize=(0.42 * len(names) + 3.0, 0.55 * len(tasks) + 1.6))
    ax = fig.subplots()
    ax.imshow(grid, cmap="Blues", vmin=-0.15, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(names)), [short_name(n) for n in names], rotation=90, fontsize=8)
    rows = [f"{t}: {results[t]['active_layers']}/{len(names)}, acc {results[t]['taps']:.2f}" for t in tasks]
    ax.set_yticks(range(len(tasks)), rows)
    ax.set_xticks([i - 0.5 for i in range(1, len(names))], minor=True)
    ax.set_yticks([i - 0.5 for i in range(1, len(tasks))], minor=True)
    ax.grid(which="minor", color="white", linewidth=1.5)
    ax.tick_params(which="minor", length=0)
    ax.set_title("TAPS layer map: dark = task-specific layer, light = shared with the base")
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)


def pretrain_base(data: Data, args: argparse.Namespace) -> nn.Module:
    """The in-run "pretrained" model: a small random-init timm ViT trained on the base task (digits 0-4)."""
    base = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=8, patch_size=2, in_chans=1,
        embed_dim=64, depth=4, num_heads=4, global_pool="avg",
    )
    # timm starts position embeddings at std 0.02: after a short pretraining they stay too weak to carry the layout,
    # and TAPS (like the paper) keeps the base's position embedding shared. A larger start helps every strategy.
    nn.init.normal_(base.pos_embed, std=0.5)
    fit(base, data, torch.optim.AdamW(base.parameters(), lr=args.lr), args.base_steps, args.batch)
    return base


def build_parser(description: Optional[str] = __doc__, out: str = "runs/demo") -> argparse.ArgumentParser:
    """The demo's options (also used by joint_demo.py and lam_sweep.py)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(out))
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per task and strategy")
    p.add_argument("--base-steps", type=int, default=600, help="optimizer steps to pretrain the base model")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lam", type=float, default=0.2, help="TAPS sparsity weight: larger shares more layers")
    p.add_argument("--lr", type=float, default=1e-3, help="lr of TAPS deltas, of full fine-tuning and pretraining")
    p.add_argument("--score-lr", type=float, default=1e-2, help="lr of the TAPS scores")
    p.add_argument("--head-lr", type=float, default=1e-2, help="lr of the head in feature extraction")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for this tiny model)")
    p.add_argument("--quick", action="store_true", help="a tiny budget (smoke test, accuracies meaningless)")
    return p


def parse_args(argv: Optional[Sequence[str]] = None, parser: Optional[argparse.ArgumentParser] = None):
    args = (parser or build_parser()).parse_args(argv)
    if args.quick:
        args.steps, args.base_steps = 20, 20
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    (base_train, base_test), tasks = load_tasks(args.seed)
    base = pretrain_base(base_train, args)
    base_acc = accuracy(base, base_test)
    print(f"base model (ViT, depth 4, {sum(p.numel() for p in base.parameters()):,} params), digits 0-4: "
          f"test accuracy {base_acc:.3f}\n")

    results: dict[str, dict[str, Any]] = {}
    header = f"{'task':<13} {'train/test':>10} {'TAPS':>6} {'full FT':>7} {'feat.ext':>8} {'k/L':>5}  adapter (% of full)"
    print(header + "\n" + "-" * len(header))
    for name, data in tasks.items():
        task_start = time.perf_counter()
        r = results[name] = run_task(base, data, args.out / name.replace(" ", "_"), args)
        r["seconds"] = time.perf_counter() - task_start
        print(f"{name:<13} {len(data[0][1]):>5}/{len(data[1][1]):<4} {r['taps']:>6.3f} {r['full_ft']:>7.3f} "
              f"{r['feature_extraction']:>8.3f} {r['active_layers']:>2}/{r['total_layers']:<2}  "
              f"{r['adapter_bytes'] / 1024:.0f} KiB ({100 * r['adapter_bytes'] / r['full_model_bytes']:.0f}%)")
    full_kib = max(r["full_model_bytes"] for r in results.values()) / 1024
    print(f"test accuracy per strategy; k/L = TAPS task-specific layers; adapter = TAPS adapter_model.safetensors "
          f"vs the full fine-tuned model ({full_kib:.0f} KiB)")

    args.out.mkdir(parents=True, exist_ok=True)
    plot_layer_map(results, args.out / "layer_map.png")
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    report = {"base_accuracy": base_acc, "config": config, "tasks": results, "seconds": time.perf_counter() - start}
    (args.out / "results.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {args.out}/results.json, {args.out}/layer_map.png and one TAPS adapter per task "
          f"({report['seconds']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
