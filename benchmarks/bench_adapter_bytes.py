#!/usr/bin/env python
"""Adapter bytes on an LLM-sized block: TAPS with full-size deltas, TAPS with rank-r deltas and PEFT LoRA r.

A transformers ``LlamaDecoderLayer`` at real width (hidden 4096, intermediate 11008, 32 heads) is built on the meta
device (no memory), every linear (q, k, v, o, gate, up, down) is targeted, and the bytes each method's adapter file
would hold are counted from the tensors the methods create (fp32, as with PEFT's ``autocast_adapter_dtype`` on a
16-bit base): for TAPS with every layer active and with a fraction ``--active`` of them (the gate's whole point),
for LoRA always every layer. Trainable state in training is the same count (TAPS keeps every layer's delta or factors
while the gates learn).

    python benchmarks/bench_adapter_bytes.py [--r 16] [--active 0.3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Optional

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


def build_block():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32)
    with torch.device("meta"):
        return LlamaDecoderLayer(config, layer_idx=0)


def adapter_tensors(method: str, r: int) -> dict[str, int]:
    """Elements of the method's own tensors per targeted layer, built on the meta device."""
    import peft

    import taps_peft

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    if method == "lora":
        config = peft.LoraConfig(r=r, lora_alpha=r, target_modules=targets)
    else:
        config = taps_peft.TAPSConfig(target_modules=targets, train_norms=False, modules_to_save=[],
                                      r=None if method == "taps" else r)
    model = peft.get_peft_model(build_block(), config)
    per_layer: dict[str, int] = {}
    for name, p in model.named_parameters():
        if ".lora_" in name or ".taps_delta." in name or ".taps_A." in name or ".taps_B." in name:
            layer = name.split(".lora_")[0].split(".taps_")[0].removeprefix("base_model.model.")
            per_layer[layer] = per_layer.get(layer, 0) + p.numel()
    return per_layer


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--r", type=int, default=16, help="rank of TAPS low-rank and LoRA")
    p.add_argument("--active", type=float, default=0.3, help="fraction of TAPS layers active (score >= tau)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    rows = {}
    for method in ("taps", "taps_lowrank", "lora"):
        per_layer = adapter_tensors(method, args.r)
        layers = len(per_layer)
        total = sum(per_layer.values()) * 4  # fp32 bytes
        active = total if method == "lora" else total * round(args.active * layers) / layers
        rows[method] = {"layers": layers, "bytes_all_active": total, "bytes_at_fraction": active}
    res = {"benchmark": "adapter_bytes", "block": "LlamaDecoderLayer hidden 4096, intermediate 11008", "r": args.r,
           "active_fraction": args.active, "results": rows,
           "lowrank_over_lora_at_fraction": rows["taps_lowrank"]["bytes_at_fraction"] / rows["lora"]["bytes_at_fraction"],
           "full_over_lora_at_fraction": rows["taps"]["bytes_at_fraction"] / rows["lora"]["bytes_at_fraction"]}
    print(f"{res['block']}, 7 linears targeted, fp32 adapter tensors, r = {args.r}")
    print(f"{'method':<14} {'all layers active':>18} {f'{args.active:.0%} of layers active':>24}")
    names = {"taps": "TAPS (full)", "taps_lowrank": f"TAPS r={args.r}", "lora": f"LoRA r={args.r}"}
    for method, r in rows.items():
        note = " (LoRA: every layer)" if method == "lora" else ""
        print(f"{names[method]:<14} {r['bytes_all_active'] / 2**20:>15.1f} MiB {r['bytes_at_fraction'] / 2**20:>21.1f} MiB"
              + note)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()
