"""Train a TAPS adapter with Accelerate: ``taps-peft train ...`` or ``accelerate launch -m taps_peft train ...``.

One process, several GPUs or several CPU processes: the same script, run through ``accelerate launch``. The model
comes from timm or transformers by name, the data from ``datasets`` (a Hub dataset or a local image folder); the
adapter is saved to ``--output-dir`` at the end (and pushed with ``--push-to-hub``).

Example:
    accelerate launch -m taps_peft train --model timm:vit_small_patch16_224 --dataset imagefolder:/data/birds \\
        --output-dir runs/birds --lam 0.5 --optimizer sgd --lr 0.01 --epochs 30 --batch-size 32

    >>> from taps_peft.training import TrainArgs, train
    >>> metrics = train(TrainArgs(model="timm:resnet18", dataset="imagefolder:/data/birds"))  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from .args import TrainArgs

if TYPE_CHECKING:
    from transformers import HfArgumentParser

STATE_PREFIX = "TAPS_STATE "  # the line ``--print-state`` writes on every rank, followed by JSON


@dataclass
class _Position:
    """Where training stands; saved in every checkpoint."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch: int = 0  # micro-batches of `epoch` consumed by this process

    def state_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step, self.epoch, self.batch = int(state["step"]), int(state["epoch"]), int(state["batch"])


# ----- state report -----


def taps_state(model) -> dict[str, Any]:
    """Scores, active set and parameter hashes of a TAPS model (to compare ranks or runs).

    Example:
        >>> taps_state(peft_model)["active"]  # doctest: +SKIP
        ['blocks.0.attn.qkv', ...]
    """
    import torch

    from ..tuner import TAPSLayer

    from ..report import taps_layer_report

    report = taps_layer_report(model)
    deltas = []
    for module in model.modules():
        if isinstance(module, TAPSLayer):
            shape = module.get_base_layer().weight.shape
            deltas += [p for p in module.parameters() if p.requires_grad and p.shape == shape]
            deltas += [p for f in (module.taps_A, module.taps_B) for p in f.values() if p.requires_grad]  # --r
    trainable = sorted((n, p) for n, p in model.named_parameters() if p.requires_grad)
    digest = hashlib.sha256()
    for _, p in trainable:
        digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    with torch.no_grad():
        return {
            "scores": [r["score"] for r in report],
            "active": [r["name"] for r in report if r["active"]],
            "score_sum": float(sum(r["score"] for r in report)),
            "delta_sum": float(sum(d.double().sum() for d in deltas)) if deltas else 0.0,
            "delta_abs_sum": float(sum(d.double().abs().sum() for d in deltas)) if deltas else 0.0,
            "trainable_sum": float(sum(p.double().sum() for _, p in trainable)),
            "trainable_sha256": digest.hexdigest(),
        }


# ----- training -----


def train(args: TrainArgs) -> dict[str, Any]:
    """Train a TAPS adapter as ``args`` says; the adapter is saved to ``args.output_dir``. Returns the metrics.

    Run it under ``accelerate launch`` for several processes. The metrics: ``step``, ``train_loss`` /
    ``train_accuracy`` (last logging window, all ranks), ``first_loss``, ``history``, ``eval_loss`` /
    ``eval_accuracy`` (if there is an eval split), ``summary`` (``taps_peft.taps_summary(model)``), ``active_layers``,
    ``total_layers`` and ``state`` (see ``taps_state``).

    Example:
        >>> m = train(TrainArgs(model="timm:resnet18", dataset="imagefolder:data", epochs=5))  # doctest: +SKIP
        >>> m["active_layers"], m["total_layers"], m["eval_accuracy"]  # doctest: +SKIP
    """
    from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
    from accelerate.state import AcceleratorState

    if not 0 <= args.freeze_gates_at <= 1:
        raise ValueError(f"--freeze-gates-at {args.freeze_gates_at}: use a fraction of the steps in [0, 1], e.g. 0.8.")
    accelerator = Accelerator(
        cpu=args.cpu,
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        dataloader_config=DataLoaderConfiguration(even_batches=True),
        # frozen gates: closed layers' deltas and every score then get no gradient, which DDP must be told
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=args.freeze_gates_at < 1)],
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes == 1:
        AcceleratorState._reset_state()
        raise ValueError(
            f"taps-peft train was launched as {launched} processes, but Accelerate runs each one alone (no GPU for "
            f"them, and ACCELERATE_USE_CPU is not set): they would train {launched} independent models into one "
            "output folder. For processes on CPU, set ACCELERATE_USE_CPU=1 (ACCELERATE_USE_CPU=1 accelerate launch "
            "--multi_gpu --num_processes N ...); on GPUs, check that every process sees one."
        )
    try:
        return _train(accelerator, args)
    finally:
        if accelerator.num_processes == 1:
            AcceleratorState._reset_state()  # so a later train() in this process may pick other precision settings


def _train(accelerator: Any, args: TrainArgs) -> dict[str, Any]:
    """The body of ``train``: data, model, loop, checkpoints, evaluation and the saved adapter."""
    import torch
    import torch.nn.functional as F
    from accelerate.utils import set_seed
    from peft import get_peft_model
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    from ..tuner import TAPSConfig
    from .build import EpochOrder, load_data, load_model, pair, with_transform
    from ..batchnorm import RECALIBRATION_IMAGES, recalibrate_batchnorm
    from ..hub import atomic_write
    from ..hub.card import dataset_name
    from ..hub.save import push_to_hub, save_adapter
    from ..report import taps_layer_report, taps_summary, taps_training_plan

    out = Path(args.output_dir)
    ckpt_root = out / "checkpoints"

    with accelerator.main_process_first():
        train_ds, eval_ds, image_col, label_col, labels = load_data(args)
    set_seed(args.seed)
    base, is_hf, size, mean, std = load_model(args, len(labels), labels)
    if args.image_size:
        size = pair(args.image_size)
    pretrained = args.pretrained and not args.weights
    defaults = {k: v for k, v in (("score_lr", args.score_lr), ("lam_warmup", args.lam_warmup)) if v is not None}
    config = TAPSConfig(
        lam=args.lam, tau=args.tau, score_init=args.score_init, target_modules=args.target_modules, r=args.r,
        alpha=args.alpha, freeze_gates_at=args.freeze_gates_at or None, **defaults,  # 0: fixed at once below
        base_model_info={"name": args.model.partition(":")[2] or args.model, "pretrained": pretrained,
                         "seed": None if pretrained else args.seed, "model_kwargs": args.model_kwargs or None,
                         "weights": weights_name(args.weights)},
        task_info={"dataset": dataset_name(args.dataset), "labels": labels},
    )
    model = get_peft_model(base, config)

    optimizer_cls, extra = (torch.optim.SGD, {"momentum": args.momentum}) if args.optimizer == "sgd" else (
        torch.optim.AdamW, {})
    trainable = [p for p in model.parameters() if p.requires_grad]  # the scores too: TAPS steps them itself
    optimizer = optimizer_cls(trainable, lr=args.lr, weight_decay=args.weight_decay, **extra)
    raw_optimizer = optimizer

    order = EpochOrder(len(train_ds), args.seed, args.shuffle)
    train_dl = DataLoader(with_transform(train_ds, image_col, label_col, size, mean, std), sampler=order,
                          batch_size=args.batch_size, num_workers=args.num_workers)
    eval_dl = None
    if eval_ds is not None:
        eval_dl = DataLoader(with_transform(eval_ds, image_col, label_col, size, mean, std),
                             batch_size=args.eval_batch_size or args.batch_size, num_workers=args.num_workers)
    model, optimizer, train_dl = accelerator.prepare(model, optimizer, train_dl)
    if eval_dl is not None:
        eval_dl = accelerator.prepare(eval_dl)
    peft_model = accelerator.unwrap_model(model)  # the penalty and the reports live here, outside DDP

    steps_per_epoch = math.ceil(len(train_dl) / args.gradient_accumulation_steps)
    total_steps = args.max_steps or args.epochs * steps_per_epoch
    peft_model.peft_config["default"].total_step = total_steps  # lam_warmup's length
    epochs = math.ceil(total_steps / steps_per_epoch)
    schedule = get_cosine_schedule_with_warmup if args.lr_scheduler == "cosine" else (
        lambda opt, warm, total: get_constant_schedule_with_warmup(opt, warm))
    # Stepped by hand once per optimizer step (a prepared scheduler would step once per process).
    scheduler = schedule(raw_optimizer, args.lr_warmup_steps, total_steps)
    pos = _Position()
    accelerator.register_for_checkpointing(scheduler, pos)

    if args.resume_from:
        path = _find_checkpoint(ckpt_root) if args.resume_from == "latest" else Path(args.resume_from)
        if path is None or not path.is_dir():
            raise FileNotFoundError(
                f"--resume-from {args.resume_from}: {path or ckpt_root} holds no checkpoint yet. Start without "
                "--resume-from (with --checkpoint-every N to write checkpoints), or name an existing step_N folder."
            )
        _check_same_arguments(path, args)
        accelerator.load_state(str(path))
        if pos.batch >= len(train_dl):
            pos.epoch, pos.batch = pos.epoch + 1, 0
        peft_model.base_model.note_score_step("default", pos.step)  # lam's ramp continues where it was
        accelerator.print(f"resumed from {path} at step {pos.step} (epoch {pos.epoch}, batch {pos.batch})")

    accelerator.print(
        f"{taps_training_plan(peft_model)}; {len(train_ds)} training images in {len(labels)} classes, "
        f"{accelerator.num_processes} process(es) x batch {args.batch_size} x accumulation "
        f"{args.gradient_accumulation_steps}, {total_steps} steps, {args.optimizer} lr {args.lr:g}")

    def forward(x: torch.Tensor) -> torch.Tensor:
        output = model(pixel_values=x) if is_hf else model(x)
        return output.logits if hasattr(output, "logits") else output

    lines = not sys.stderr.isatty()  # in a log file a bar is one long line: print a line per logged step instead
    bar = tqdm(total=total_steps, initial=pos.step, disable=lines or not accelerator.is_local_main_process,
               desc="taps train", dynamic_ncols=True)
    window = torch.zeros(3, device=accelerator.device, dtype=torch.float64)  # loss sum, correct, count
    history: list[dict[str, float]] = []
    done = pos.step >= total_steps
    freeze_step = None if args.freeze_gates_at >= 1 else int(args.freeze_gates_at * total_steps)
    for epoch in range(pos.epoch, epochs):
        if done:
            break
        order.epoch = epoch
        pos.epoch = epoch
        model.train()
        loader = accelerator.skip_first_batches(train_dl, pos.batch) if pos.batch else train_dl
        for batch in loader:
            if freeze_step is not None and pos.step >= freeze_step and accelerator.sync_gradients:
                peft_model.freeze_gates()  # idempotent: also right after a resume past the freeze step
            with accelerator.accumulate(model):
                logits = forward(batch["pixel_values"])
                task_loss = F.cross_entropy(logits.float(), batch["labels"])
                loss = task_loss + peft_model.taps_penalty()  # the one TAPS line of a loop that computes its loss
                if not torch.isfinite(loss.detach()):  # stop before a NaN/inf gradient reaches any weight
                    raise FloatingPointError(
                        f"loss is {loss.item()} at step {pos.step + 1} (epoch {epoch}, micro-batch {pos.batch}; task "
                        f"loss {task_loss.item()}): training stopped before this step's update. Lower --lr or "
                        "--score-lr, set --max-grad-norm, or prefer --mixed-precision bf16 to fp16; --resume-from "
                        "latest restarts from the last checkpoint.")
                accelerator.backward(loss)
                if args.max_grad_norm and accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            n = batch["labels"].numel()
            window += torch.stack([task_loss.detach().double() * n,
                                   (logits.argmax(-1) == batch["labels"]).sum().double(),
                                   torch.tensor(n, dtype=torch.float64, device=window.device)])
            pos.batch += 1
            if not accelerator.sync_gradients:
                continue
            if not accelerator.optimizer_step_was_skipped:
                scheduler.step()
            pos.step += 1
            bar.update(1)
            done = pos.step >= total_steps
            if pos.step % args.log_every == 0 or done or pos.step == 1:
                total = accelerator.reduce(window.clone(), reduction="sum")
                window.zero_()
                report = taps_layer_report(peft_model)
                entry = {"step": pos.step, "loss": float(total[0] / total[2]), "acc": float(total[1] / total[2]),
                         "active": sum(r["active"] for r in report)}
                history.append(entry)
                progress = dict(loss=f"{entry['loss']:.4f}", acc=f"{entry['acc']:.3f}",
                                active=f"{entry['active']}/{len(report)}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
                bar.set_postfix(progress)
                if lines:
                    accelerator.print(f"step {pos.step}/{total_steps} " + " ".join(f"{k} {v}" for k, v in
                                                                              progress.items()), flush=True)
            if args.checkpoint_every and (pos.step % args.checkpoint_every == 0 or done):
                _save_checkpoint(accelerator, ckpt_root, pos.step, args.keep_checkpoints, args)
            if done:
                break
        else:
            pos.batch = 0
    bar.close()
    if args.recalibrate_bn:  # the same images on every process: identical statistics everywhere
        images = DataLoader(with_transform(train_ds, image_col, label_col, size, mean, std),
                            batch_size=args.eval_batch_size or args.batch_size)
        batches = itertools.islice(images, max(1, RECALIBRATION_IMAGES // images.batch_size))
        with accelerator.autocast():
            recalibrate_batchnorm(peft_model, (b["pixel_values"].to(accelerator.device) for b in batches),
                                  lambda m, x: m(pixel_values=x) if is_hf else m(x))

    metrics: dict[str, Any] = {"step": pos.step, "history": history, "num_processes": accelerator.num_processes}
    if history:
        metrics.update(first_loss=history[0]["loss"], train_loss=history[-1]["loss"],
                       train_accuracy=history[-1]["acc"])
    if eval_dl is not None:
        metrics.update(_evaluate(accelerator, model, eval_dl, forward))
    summary = taps_summary(peft_model)
    state = taps_state(peft_model)
    metrics.update(summary=summary, active_layers=summary["active_layers"], total_layers=summary["total_layers"],
                   state=state, output_dir=str(out))
    if args.print_state:
        line = {"rank": accelerator.process_index, "world": accelerator.num_processes, "step": pos.step,
                "wrapper": type(model).__name__,
                "find_unused_parameters": getattr(model, "find_unused_parameters", None),
                **state}
        for rank in range(accelerator.num_processes):  # one rank at a time: the lines share one stdout pipe
            if rank == accelerator.process_index:
                sys.stdout.write(STATE_PREFIX + json.dumps(line) + "\n")
                sys.stdout.flush()
            accelerator.wait_for_everyone()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if "eval_accuracy" in metrics:
            peft_model.peft_config["default"].task_info["metrics"] = {
                k: metrics[k] for k in ("eval_accuracy", "eval_loss")}
        save_adapter(peft_model, out)
        results = {k: v for k, v in metrics.items() if k != "state"}
        atomic_write(out / "train_results.json", json.dumps(results, indent=2))
        atomic_write(out / ARGS_NAME, json.dumps(dataclasses.asdict(args), indent=2))
        evaluated = f"eval accuracy {metrics['eval_accuracy']:.4f}" if "eval_accuracy" in metrics else "no eval split"
        accelerator.print(
            f"done: step {pos.step}, active layers {summary['active_layers']}/{summary['total_layers']}, "
            f"{evaluated}, adapter saved to {out}")
        if args.push_to_hub:
            repo_id = args.hub_model_id or out.resolve().name
            commit = push_to_hub(peft_model, repo_id)
            metrics["hub_model_id"] = repo_id
            accelerator.print(f"pushed to the Hub: {repo_id} ({getattr(commit, 'commit_url', None) or commit})")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


def weights_name(path: Optional[str]) -> Optional[str]:
    """How an adapter records ``--weights`` (never a path of the trainer's machine): the pip package's name for the
    packaged ImageNet EfficientNet-Lite0 (its card then calls ``efficientnet_lite0``), else the file's name."""
    if path is None:
        return None
    from ..hub.card import PACKAGED_LITE0

    try:
        from .weights import efficientnet_lite0_weights

        if Path(path).resolve() == Path(efficientnet_lite0_weights()).resolve():
            return PACKAGED_LITE0
    except ImportError:  # the package is not installed: it cannot be that file
        pass
    return Path(path).name


def _evaluate(accelerator, model, loader, forward) -> dict[str, float]:
    import torch
    import torch.nn.functional as F

    model.eval()
    losses, correct = [], []
    with torch.no_grad():
        for batch in loader:
            logits = forward(batch["pixel_values"]).float()
            loss = F.cross_entropy(logits, batch["labels"], reduction="none")
            loss, hit = accelerator.gather_for_metrics((loss, logits.argmax(-1) == batch["labels"]))
            losses.append(loss.cpu())
            correct.append(hit.cpu())
    model.train()
    return {"eval_loss": float(torch.cat(losses).mean()), "eval_accuracy": float(torch.cat(correct).float().mean())}


def _save_checkpoint(accelerator, root: Path, step: int, keep: Optional[int], args: TrainArgs) -> None:
    """``accelerator.save_state`` (and the run's arguments) into a temporary folder, renamed once every rank has
    written its part."""
    final, tmp = root / f"step_{step}", root / f".tmp_step_{step}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / ARGS_NAME).write_text(json.dumps(dataclasses.asdict(args), indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep:
            for old in sorted(_checkpoints(root), key=lambda p: int(p.name[5:]))[:-keep]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()


ARGS_NAME = "train_args.json"
# Arguments a resumed run may change: they do not change what is trained.
_RESUMABLE = {"resume_from", "output_dir", "push_to_hub", "hub_model_id", "print_state", "log_every",
              "checkpoint_every", "keep_checkpoints", "num_workers", "cache_dir", "eval_batch_size", "eval_split"}


def _check_same_arguments(checkpoint: Path, args: TrainArgs) -> None:
    """A resumed run must train what the checkpoint's run trained: refuse other arguments (batch, lam, lr, ...)."""
    saved_file = checkpoint / ARGS_NAME
    if not saved_file.is_file():
        return  # a checkpoint written before arguments were recorded
    try:
        saved = json.loads(saved_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{saved_file} is not valid JSON ({err}): the checkpoint is damaged.") from None
    now = dataclasses.asdict(args)
    changed = {k: (saved[k], now[k]) for k in now if k in saved and k not in _RESUMABLE and saved[k] != now[k]}
    if changed:
        listed = ", ".join(f"--{k.replace('_', '-')} {new!r} (was {old!r})" for k, (old, new) in changed.items())
        raise ValueError(
            f"--resume-from {checkpoint}: this run's arguments differ from the checkpoint's: {listed}. A resumed run "
            "must train what the interrupted one trained: rerun with the same arguments, or start a new "
            "--output-dir."
        )


def _checkpoints(root: Path) -> list[Path]:
    return [p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()] if root.is_dir() else []


def _find_checkpoint(root: Path) -> Optional[Path]:
    found = _checkpoints(root)
    return max(found, key=lambda p: int(p.name[5:])) if found else None


# ----- command line -----


class _HelpFormatter(argparse.HelpFormatter):
    """Each flag's help ends with its default in brackets, e.g. ``[0.5]`` (none shown for None, False or {})."""

    def _get_help_string(self, action: argparse.Action) -> str:
        default = action.default
        if (not action.option_strings or action.required or default is argparse.SUPPRESS or default is None
                or default is False or default == {}):
            return action.help or ""
        return f"{action.help or ''} [{default}]"


def build_parser() -> "HfArgumentParser":
    """The ``taps-peft train`` parser: ``transformers.HfArgumentParser`` over [`TrainArgs`].

    Example:
        >>> build_parser().parse_args_into_dataclasses(["--model", "timm:resnet18", "--dataset", "beans"])[0].lam
        0.5
    """
    from transformers import HfArgumentParser

    parser = HfArgumentParser(
        TrainArgs,
        prog="taps-peft train",
        description="Train a TAPS adapter (Task Adaptive Parameter Sharing) with Accelerate. Several GPUs: "
                    "accelerate launch -m taps_peft train ARGS.",
        formatter_class=_HelpFormatter,
    )
    for action in parser._actions:  # HfArgumentParser gives --no-X the help of --X
        if action.option_strings and action.option_strings[0].startswith("--no_"):
            action.help = f"Turn --{action.dest.replace('_', '-')} off."
    for f in dataclasses.fields(TrainArgs):  # it adds --no-X only where X defaults to True: keep it for every switch
        if f.default is False:
            parser.add_argument(f"--no-{f.name.replace('_', '-')}", action="store_false", dest=f.name, default=False,
                                help=argparse.SUPPRESS)
    return parser


def parse_args(argv: Optional[list[str]] = None) -> TrainArgs:
    """[`TrainArgs`] from a command line (an optional leading ``train`` subcommand is accepted).

    Example:
        >>> parse_args(["train", "--model", "timm:resnet18", "--dataset", "beans"]).optimizer
        'adamw'
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        argv = argv[1:]
    parser = build_parser()
    args, rest = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True, look_for_args_file=False)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")  # argparse's own message and exit status 2
    return args


def main(argv: Optional[list[str]] = None) -> None:
    """Console script ``taps-peft train ...`` and ``python -m taps_peft train ...``.

    Multi-process runs end with a hard exit after everything is written and flushed: Gloo's threads can abort the
    interpreter at teardown, which would fail a run that already succeeded.
    """
    try:
        metrics = train(parse_args(argv))
    except (ValueError, FileNotFoundError, ImportError, FloatingPointError) as err:
        message = str(err)
        if "Original Traceback" in message:  # raised in a DataLoader worker: its last line is the error itself
            message = message.strip().splitlines()[-1].split(": ", 1)[-1]
        sys.stderr.write(f"taps-peft train: error: {message}\n")  # a message, not a traceback
        sys.stderr.flush()
        raise SystemExit(2) from None
    if metrics["num_processes"] > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
