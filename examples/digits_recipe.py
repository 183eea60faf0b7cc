"""The CLI's digits recipe, three ways, at their defaults: does TAPS train (and low-rank TAPS as well as full-size)?

The recipe: scikit-learn's digits as an image folder (``digits_imagefolder.py``), timm's EfficientNet-Lite0 with the
packaged ImageNet weights (``--weights``, offline), 64 px, 3 epochs. Each way trains TAPS with full-size deltas and
with ``r=8`` (or ``--ranks``), everything else at its defaults, and reports the test accuracy and k/L:

- ``cli``: ``taps-peft train`` (``taps_peft.training.train``): SGD with momentum, lr 0.01, batch 32, cosine;
- ``trainer``: the stock 🤗 ``Trainer`` with its ``TrainingArguments`` defaults (AdamW lr 5e-5, batch 8, linear,
  gradients clipped to norm 1); only a loss function for the timm model (cross-entropy plus ``model.taps_penalty()``,
  as docs/trainer.md says);
- ``trainer_callback``: the same with ``callbacks=[TAPSCallback()]`` (the training length, for lam's warm-up);
- ``taps_trainer``: the same with ``TAPSTrainer`` (gates frozen for the last 20%, BatchNorm re-estimated; it adds
  the penalty itself when the loss function does not, never twice).

    python examples/digits_recipe.py [--ways cli trainer trainer_callback taps_trainer] [--ranks full 8] [--alpha 16] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

import taps_peft  # noqa: F401  (registers TAPS with PEFT)

EPOCHS, SIZE = 3, 64


class Folder(torch.utils.data.Dataset):
    """The image folder's split as ``{"x": image, "label": class}`` (timm models take ``x``)."""

    def __init__(self, root: Path, split: str, mean, std) -> None:
        from PIL import Image
        from torchvision import transforms

        tf = transforms.Compose([transforms.Resize((SIZE, SIZE)), transforms.ToTensor(), transforms.Normalize(mean, std)])
        files = sorted((root / split).glob("*/*.png"))
        self.x = torch.stack([tf(Image.open(f).convert("RGB")) for f in files])
        self.y = torch.tensor([int(f.parent.name) for f in files])

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"x": self.x[i], "label": self.y[i]}  # the collator makes it "labels"


def lite0(seed: int):
    from taps_peft.training import efficientnet_lite0

    torch.manual_seed(seed)
    return efficientnet_lite0(num_classes=10)


@torch.no_grad()
def accuracy(model, data: Folder) -> float:
    model.eval()
    hits = sum((model(x).argmax(-1) == y).sum().item() for x, y in zip(data.x.split(128), data.y.split(128)))
    return hits / len(data)


def run_cli(root: Path, out: Path, r: Optional[int], alpha: Optional[float], seed: int,
            extra: dict[str, Any]) -> dict[str, Any]:
    from taps_peft.training import TrainArgs, train
    from taps_peft.training import efficientnet_lite0_weights

    metrics = train(TrainArgs(model="timm:tf_efficientnet_lite0", weights=efficientnet_lite0_weights(),
                              dataset=f"imagefolder:{root}", image_size=SIZE, epochs=EPOCHS, output_dir=str(out),
                              r=r, alpha=alpha if r else None, seed=seed, **extra))
    return {"accuracy": metrics["eval_accuracy"], "k": metrics["active_layers"], "L": metrics["total_layers"]}


def run_trainer(root: Path, out: Path, r: Optional[int], alpha: Optional[float], seed: int, way: str,
                extra: dict[str, Any], trainer_args: dict[str, Any]) -> dict[str, Any]:
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments

    from taps_peft.training import TAPSCallback, TAPSTrainer

    model = get_peft_model(lite0(seed), taps_peft.TAPSConfig(r=r, alpha=alpha if r else None, **extra))
    cfg = model.base_model.model.pretrained_cfg
    train_ds, test_ds = (Folder(root, s, cfg["mean"], cfg["std"]) for s in ("train", "test"))
    args = TrainingArguments(str(out), num_train_epochs=EPOCHS, use_cpu=True, report_to=[], disable_tqdm=True,
                             save_strategy="no", seed=seed, logging_steps=50, **trainer_args)
    cls = TAPSTrainer if way == "taps_trainer" else Trainer
    trainer = cls(model=model, args=args, train_dataset=train_ds,
                  callbacks=[TAPSCallback()] if way == "trainer_callback" else None,
                  compute_loss_func=lambda outputs, labels, num_items_in_batch=None: (  # a timm model: logits
                      F.cross_entropy(outputs, labels) + model.taps_penalty()))
    trainer.train()
    summary = taps_peft.taps_summary(model)
    return {"accuracy": accuracy(model, test_ds), "k": summary["active_layers"], "L": summary["total_layers"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ways", nargs="+", default=["cli", "trainer", "trainer_callback", "taps_trainer"],
                   choices=["cli", "trainer", "trainer_callback", "taps_trainer"])
    p.add_argument("--ranks", nargs="+", default=["full", "8"], help="'full' and/or ranks")
    p.add_argument("--alpha", type=float, default=None, help="TAPSConfig.alpha of the low-rank runs (its default)")
    p.add_argument("--set", type=json.loads, default={}, metavar="JSON",
                   help='other TAPSConfig fields (for the CLI: TrainArgs fields), e.g. \'{"lam_warmup": 0.5}\'')
    p.add_argument("--trainer-args", type=json.loads, default={}, metavar="JSON",
                   help='TrainingArguments fields other than their defaults, e.g. \'{"learning_rate": 1e-3}\'')
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = p.parse_args()
    from digits_imagefolder import write_digits

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = write_digits(Path(tmp) / "digits", seed=args.seed)
        for way in args.ways:
            for rank in args.ranks:
                r = None if rank == "full" else int(rank)
                start = time.perf_counter()
                out = Path(tmp) / f"{way}-{rank}"
                if way == "cli":
                    row = run_cli(root, out, r, args.alpha, args.seed, args.set)
                else:
                    row = run_trainer(root, out, r, args.alpha, args.seed, way, args.set,
                                      args.trainer_args)
                row.update(way=way, deltas=rank, alpha=args.alpha, set=args.set, trainer_args=args.trainer_args,
                           seconds=round(time.perf_counter() - start, 1))
                rows.append(row)
                print(f"{way:>13} {rank:>5}: accuracy {row['accuracy']:.3f}, k/L {row['k']}/{row['L']}, "
                      f"{row['seconds']:.0f} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
