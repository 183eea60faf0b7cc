#!/usr/bin/env bash
# Train a TAPS adapter for a timm ViT on an image folder, with Accelerate, on one or several GPUs.
#
#   bash examples/train_imagefolder.sh /data/birds runs/birds [NUM_PROCESSES]
#
# DATA is an image folder: DATA/train/<class>/*.jpg (and optionally DATA/validation|test/<class>/*.jpg for the
# accuracy at the end). The adapter is saved to OUT (adapter_config.json + adapter_model.safetensors).
# Per-process batch 32: with 4 GPUs the global batch is 128. Interrupted? Run again with --resume-from latest.
set -euo pipefail
DATA=${1:?image folder}
OUT=${2:-runs/taps-imagefolder}
NPROC=${3:-1}

MULTI=()
if [ "$NPROC" -gt 1 ]; then MULTI=(--multi_gpu); fi

accelerate launch ${MULTI[@]+"${MULTI[@]}"} --num_processes "$NPROC" --num_machines 1 --mixed_precision bf16 \
  --dynamo_backend no -m taps_peft train \
  --model timm:vit_small_patch16_224 \
  --dataset "imagefolder:$DATA" \
  --output-dir "$OUT" \
  --lam 0.5 --tau 0.1 --score-init 0.15 --taps-warmup-steps 100 \
  --optimizer sgd --lr 0.01 --momentum 0.9 --score-lr 0.01 \
  --epochs 30 --batch-size 32 --lr-warmup-steps 100 \
  --checkpoint-every 500 --keep-checkpoints 2 \
  "${@:4}"

# Load it later:
#   import taps_peft, timm; from peft import PeftModel
#   base = timm.create_model("vit_small_patch16_224", pretrained=True, num_classes=N)
#   model = PeftModel.from_pretrained(base, "runs/taps-imagefolder")
