"""`TrainArgs`: every option of ``taps-peft train`` (``transformers.HfArgumentParser`` makes its fields the CLI flags)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional, Union


@dataclass
class TrainArgs:
    """Every option of ``taps-peft train`` (the CLI flag is the field name with dashes).

    Example:
        >>> args = TrainArgs(model="timm:vit_tiny_patch16_224", dataset="imagefolder:data", lam=0.5, epochs=3)
    """

    model: str = field(metadata={"help": "timm:NAME, hf:NAME_OR_PATH (or a transformers model type with "
                                         "--no-pretrained, e.g. hf:vit), or a bare name (timm if it knows it)."})
    dataset: str = field(metadata={"help": "A Hub dataset name, a local dataset dir, or imagefolder:PATH."})
    output_dir: str = field(default="runs/taps", metadata={"help": "Adapter, checkpoints/ and results go here."})
    pretrained: bool = field(default=True, metadata={"help": "Load pretrained weights (--no-pretrained: random)."})
    weights: Optional[str] = field(default=None, metadata={
        "help": "A local weights file for a timm model (.safetensors or .pth, matched by name, never by position; a "
                "head of another size stays fresh; NaN/inf or integer tensors refused); nothing is downloaded."})
    # a dict, or its JSON on the command line (transformers' TrainingArguments convention for dict fields)
    model_kwargs: Optional[Union[dict, str]] = field(default_factory=dict, metadata={
        "help": "JSON passed to timm.create_model or the transformers config, e.g. '{\"img_size\": 32}'."})
    dataset_config: Optional[str] = field(default=None, metadata={"help": "Dataset configuration name."})
    train_split: str = field(default="train", metadata={"help": "Training split."})
    eval_split: Optional[str] = field(default="auto", metadata={
        "help": "Evaluation split; 'auto' picks validation/valid/val/test if present, 'none' skips evaluation."})
    image_column: Optional[str] = field(default=None, metadata={"help": "Image column (autodetected when unset)."})
    label_column: Optional[str] = field(default=None, metadata={"help": "Label column (autodetected when unset: a ClassLabel, label, labels)."})
    image_size: Optional[int] = field(default=None, metadata={"help": "Input size (the model's when unset)."})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Use only the first N samples."})
    cache_dir: Optional[str] = field(default=None, metadata={"help": "datasets cache directory."})
    num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes."})
    # TAPS
    lam: float = field(default=0.5, metadata={"help": "TAPS sparsity weight; larger shares more layers."})
    tau: float = field(default=0.1, metadata={"help": "Gate threshold on the scores."})
    score_init: float = field(default=0.15, metadata={"help": "Initial score (>= tau: every layer starts on)."})
    lam_warmup: Optional[float] = field(default=None, metadata={
        "help": "Fraction of the steps over which lam ramps from 0 (TAPSConfig.lam_warmup when unset)."})
    target_modules: Optional[list[str]] = field(default=None, metadata={"help": "Layers to gate (every Linear/Conv but head and patch embedding when unset)."})
    r: Optional[int] = field(default=None, metadata={
        "help": "Rank of each gated delta (alpha/r * B @ A, LoRA's factors under the TAPS gate; full-size deltas when "
                "unset). Grouped/depthwise convs and small layers keep full deltas."})
    alpha: Optional[float] = field(default=None, metadata={"help": "Low-rank scaling alpha / r (needs --r; r when "
                                                                   "unset, i.e. scaling 1)."})
    score_lr: Optional[float] = field(default=None, metadata={
        "help": "Adam learning rate of the scores, whatever --optimizer (TAPSConfig.score_lr when unset)."})
    freeze_gates_at: float = field(default=0.8, metadata={
        "help": "Fix the gates after this fraction of the steps: no late flips, and closed layers skip their weight "
                "gradient (1: never)."})
    recalibrate_bn: bool = field(default=True, metadata={
        "help": "At the end, re-estimate the task's BatchNorm statistics on up to 512 training images (no weight "
                "changes)."})
    # optimisation
    optimizer: str = field(default="adamw", metadata={
        "help": "adamw, or sgd (momentum, as in the paper; with --r also set --alpha, e.g. 4 * r).",
        "choices": ("adamw", "sgd")})
    lr: float = field(default=3e-3, metadata={"help": "Learning rate of deltas (full-size or low-rank), norms and "
                                                      "head (e.g. 0.01 with sgd)."})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum."})
    weight_decay: float = field(default=0.0, metadata={"help": "Weight decay (never on scores)."})
    lr_scheduler: str = field(default="cosine", metadata={"help": "cosine or constant (after the warm-up).",
                                                          "choices": ("cosine", "constant")})
    lr_warmup_steps: int = field(default=0, metadata={"help": "Linear learning-rate warm-up steps."})
    epochs: int = field(default=30, metadata={"help": "Training epochs."})
    max_steps: Optional[int] = field(default=None, metadata={"help": "Stop after N optimizer steps (overrides "
                                                                     "--epochs)."})
    batch_size: int = field(default=32, metadata={"help": "Batch size per process (global = x processes)."})
    eval_batch_size: Optional[int] = field(default=None, metadata={"help": "Eval batch size (--batch-size when unset)."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    max_grad_norm: Optional[float] = field(default=None, metadata={"help": "Clip gradients to this norm."})
    mixed_precision: Optional[str] = field(default=None, metadata={
        "help": "no, fp16 or bf16 (accelerate's config when unset).", "choices": ("no", "fp16", "bf16")})
    seed: int = field(default=42, metadata={"help": "Seed of the model init and the data order."})
    shuffle: bool = field(default=True, metadata={"help": "Shuffle the training data each epoch."})
    cpu: bool = field(default=False, metadata={"help": "Train on CPU even if a GPU is present."})
    # checkpoints, logging, output
    checkpoint_every: Optional[int] = field(default=None, metadata={"help": "Save a checkpoint every N steps."})
    keep_checkpoints: Optional[int] = field(default=None, metadata={"help": "Keep only the newest N checkpoints."})
    resume_from: Optional[str] = field(default=None, metadata={
        "help": "Checkpoint dir to resume from, or 'latest' (newest in OUTPUT_DIR/checkpoints)."})
    log_every: int = field(default=10, metadata={"help": "Update loss/acc on the progress bar every N steps."})
    push_to_hub: bool = field(default=False, metadata={"help": "Push the adapter to the Hub at the end."})
    hub_model_id: Optional[str] = field(default=None, metadata={"help": "Hub repo id (the output dir's name when unset)."})
    print_state: bool = field(default=False, metadata={
        "help": "Print one 'TAPS_STATE {json}' line per rank at the end (scores, active set, parameter hashes)."})

    def __post_init__(self) -> None:
        if self.model_kwargs is None:
            self.model_kwargs = {}
        elif isinstance(self.model_kwargs, str):
            try:
                self.model_kwargs = json.loads(self.model_kwargs)
            except json.JSONDecodeError as err:
                raise ValueError(f"--model-kwargs {self.model_kwargs!r} is not JSON ({err}). Pass a JSON object, e.g. "
                                 "'{\"img_size\": 32}'.") from None
        if not isinstance(self.model_kwargs, dict):
            raise ValueError(f"--model-kwargs {self.model_kwargs!r}: pass a JSON object of keyword arguments, e.g. "
                             "'{\"img_size\": 32}'.")
