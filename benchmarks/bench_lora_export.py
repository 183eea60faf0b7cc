#!/usr/bin/env python
"""``export_lora`` on a real pretrained base: LoRA rank vs adapter size vs output error.

Trains a TAPS adapter on ImageNet EfficientNet-Lite0 (the weights ship in a pip package; nothing is downloaded) for
scikit-learn's digits at 64 px (the main job's recipe: lam 0.2, AdamW 2e-3 / scores 1e-2, gates frozen at 80%,
BatchNorm re-estimated), then exports it with several ranks and loads each LoRA adapter with plain PEFT into a
fresh base. Per rank: the LoRA file's bytes (and over the TAPS adapter's), the largest and mean logit difference from
the TAPS model on held-out images, top-1 agreement with it, and accuracy.

    python benchmarks/bench_lora_export.py [--steps 60] [--ranks exact,64,16,4,0.99,0.9] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model

import taps_peft
from taps_peft.training import efficientnet_lite0
from taps_peft import recalibrate_batchnorm


def digits(img_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as 3-channel images (mean = std = 0.5 inputs), 75/25 split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=img_size, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    x, y = (x - 0.5) / 0.5, torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    cut = int(0.75 * len(y))
    return x[perm[:cut]], y[perm[:cut]], x[perm[cut:]], y[perm[cut:]]


def parse_rank(text: str) -> Optional[float | int]:
    return None if text == "exact" else float(text) if "." in text else int(text)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--lam", type=float, default=0.2)
    p.add_argument("--ranks", default="exact,64,16,4,0.99,0.9")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    xtr, ytr, xte, yte = digits(args.img_size)
    model = get_peft_model(efficientnet_lite0(num_classes=10), taps_peft.TAPSConfig(lam=args.lam))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)  # the main job's recipe (score lr 1e-2)
    model.train()
    for step in range(args.steps):
        if step == int(0.8 * args.steps):
            model.freeze_gates()
        idx = torch.randint(0, len(ytr), (32,))
        loss = F.cross_entropy(model(xtr[idx]), ytr[idx]) + model.taps_penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
    recalibrate_batchnorm(model, xtr[:512].split(32))
    model.eval()
    with torch.no_grad():
        ref = model(xte)
    summary = taps_peft.taps_summary(model)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(os.path.join(tmp, "taps"))
        taps_bytes = os.path.getsize(os.path.join(tmp, "taps", "adapter_model.safetensors"))
        for text in args.ranks.split(","):
            out = os.path.join(tmp, f"lora-{text}")
            # every rank is written and measured here, however far it is from the TAPS model (no tolerance)
            info = taps_peft.export_lora(model, out, rank=parse_rank(text), example_inputs=xte[:8],
                                         tolerance=float("inf"))
            torch.manual_seed(1)  # another head init: the exported head must override it
            lora = PeftModel.from_pretrained(efficientnet_lite0(num_classes=10), out).eval()
            with torch.no_grad():
                got = lora(xte)
            rows.append({
                "rank": text, "bytes": info["bytes"], "over_taps": info["bytes"] / taps_bytes,
                "max_rank": max(info["lora_layers"].values()), "saved_whole": len(info["saved_whole"]),
                "max_abs": float((got - ref).abs().max()), "mean_abs": float((got - ref).abs().mean()),
                "agree": float((got.argmax(1) == ref.argmax(1)).float().mean()),
                "accuracy": float((got.argmax(1) == yte).float().mean()),
            })
    taps_acc = float((ref.argmax(1) == yte).float().mean())
    print(f"tf_efficientnet_lite0 (ImageNet) on digits, {args.img_size} px, {args.steps} steps, lam {args.lam}: "
          f"TAPS {summary['active_layers']}/{summary['total_layers']} layers active, adapter {taps_bytes / 2**20:.2f} "
          f"MiB, accuracy {taps_acc:.3f}; |logits| max {float(ref.abs().max()):.2f}")
    print(f"{'rank':>6} {'LoRA MiB':>9} {'/ TAPS':>7} {'max r':>6} {'whole':>6} {'max |d|':>9} {'mean |d|':>9} "
          f"{'top-1 agree':>11} {'accuracy':>8}")
    for r in rows:
        print(f"{r['rank']:>6} {r['bytes'] / 2**20:>9.2f} {r['over_taps']:>7.2f} {r['max_rank']:>6} "
              f"{r['saved_whole']:>6} {r['max_abs']:>9.2e} {r['mean_abs']:>9.2e} {r['agree']:>11.3f} "
              f"{r['accuracy']:>8.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"taps": {**summary, "file_bytes": taps_bytes, "accuracy": taps_acc}, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
