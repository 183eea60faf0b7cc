#!/usr/bin/env python
"""Count the Python function calls of one unmerged TAPS forward against the same forward of the base model (cProfile;
a count, not a timing, so it is the same on a busy machine). What a forward pays beyond its matmuls is Python work
per layer: this shows where it goes.

    python benchmarks/count_forward_calls.py [--model vit_tiny_patch16_224] [--active-frac 0.3] [--top 10]
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import pstats
import random
import warnings

import timm
import torch
from peft import get_peft_model

import taps_peft


def calls(model: torch.nn.Module, x: torch.Tensor) -> pstats.Stats:
    with torch.no_grad():
        for _ in range(2):
            model(x)
        profile = cProfile.Profile()
        profile.enable()
        model(x)
        profile.disable()
    return pstats.Stats(profile)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--active-frac", type=float, default=0.3)
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    base = timm.create_model(args.model, pretrained=False, num_classes=10).eval()
    model = get_peft_model(copy.deepcopy(base), taps_peft.TAPSConfig(init_weights=False)).eval()
    layers = [m for m in model.modules() if isinstance(m, taps_peft.TAPSLayer)]
    active = set(random.Random(0).sample(range(len(layers)), round(args.active_frac * len(layers))))
    with torch.no_grad():
        for i, layer in enumerate(layers):
            layer.taps_scores["default"].fill_(0.15 if i in active else 0.05)
    x = torch.randn(1, 3, args.img_size, args.img_size)
    plain, taps = calls(base, x), calls(model, x)
    ours = sum(v[1] for k, v in taps.stats.items() if "taps_peft" in k[0])
    print(f"{args.model}, {len(active)}/{len(layers)} layers open: Python calls per forward: base {plain.total_calls}, "
          f"TAPS {taps.total_calls} (+{taps.total_calls - plain.total_calls}, {ours} in taps_peft)")
    taps.sort_stats("ncalls").print_stats("taps_peft", args.top)


if __name__ == "__main__":
    main()
