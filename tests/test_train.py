"""The Accelerate training entry point (taps_peft.training.cli): single process, resume, 2-process DDP, CLI.

Data: a tiny imagefolder built here (red horizontal vs blue vertical stripes, 32x32 PNGs); model: a random-init
timm ViT (img 32, patch 8, depth 2, width 32), so nothing is downloaded. Torch runs with one thread: on a shared
2-core machine two OpenMP threads per process make a step of this model ~100x slower.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import warnings

import pytest
import torch
import taps_peft  # noqa: E402
from peft import PeftModel

pytest.importorskip("timm")
pytest.importorskip("datasets")
pytest.importorskip("PIL")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from taps_peft.training.cli import STATE_PREFIX, TrainArgs, main, parse_args, train  # noqa: E402

from conftest import HANG, REPO, subprocess_env


VIT = '{"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}'


def make_imagefolder(root: Path, n_train: int = 64, n_test: int = 16) -> Path:
    """``root/{train,test}/c{0,1}/*.png``: class 0 red horizontal stripes, class 1 blue vertical, random phase."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:32, 0:32]
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            c = i % 2
            stripes = (((yy if c == 0 else xx) + rng.integers(0, 4)) // 2) % 2
            tint = np.array([1.0, 0.3, 0.3]) if c == 0 else np.array([0.3, 0.3, 1.0])
            img = (0.4 + 0.6 * stripes[..., None]) * tint * 220 + rng.normal(0, 20, (32, 32, 3))
            (root / split / f"c{c}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(img, 0, 255).astype("uint8")).save(root / split / f"c{c}" / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("imagefolder"))



def vit_args(data: Path, out: Path, **kw) -> TrainArgs:
    base = dict(model="timm:vit_tiny_patch16_224", pretrained=False, model_kwargs=json.loads(VIT),
                dataset=f"imagefolder:{data}", cache_dir=str(data.parent / "hf_cache"), output_dir=str(out), cpu=True)
    return TrainArgs(**{**base, **kw})


def test_train_single_process(data, tmp_path, capsys):
    import taps_peft  # noqa: F401
    import timm
    from peft import PeftModel

    m = train(vit_args(data, tmp_path / "run", optimizer="adamw", lr=3e-3, score_lr=1e-2, lam=0.2, epochs=6,
                       batch_size=16, log_every=2))
    assert (tmp_path / "run/adapter_config.json").is_file() and (tmp_path / "run/adapter_model.safetensors").is_file()
    assert json.loads((tmp_path / "run/train_results.json").read_text())["step"] == m["step"] == 24
    assert m["train_loss"] < 0.5 * m["first_loss"], m["history"]
    assert m["eval_accuracy"] >= 0.9 and m["eval_loss"] < m["first_loss"]
    s = m["summary"]
    assert s["total_layers"] == 8 and 0 <= s["active_layers"] == m["active_layers"] <= 8
    assert {"task_specific_params", "adapter_bytes"} <= set(s)
    out = capsys.readouterr().out  # not a terminal: progress lines (loss, acc, active k/L), not a tqdm bar
    assert re.search(r"^step 24/24 loss [\d.]+ acc [\d.]+ active \d/8 lr ", out, re.M), out

    base = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=2, **json.loads(VIT))
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "run"))
    assert taps_peft.taps_summary(loaded)["active_layers"] == s["active_layers"]
    assert [r["score"] for r in taps_peft.taps_layer_report(loaded)] == pytest.approx(m["state"]["scores"])
    assert_card_rebuilds_the_base(tmp_path / "run", "torch.manual_seed(42)", "img_size=32")


def assert_card_rebuilds_the_base(folder: Path, *expected: str) -> None:
    """The card's load code, run as a user would paste it, builds a base with the trained base's fingerprint."""
    from taps_peft import BaseModelMismatchWarning

    card = (folder / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", card, re.S)[1]
    assert all(e in code for e in expected), code
    scope: dict = {}
    exec("\n".join(line for line in code.splitlines() if "PeftModel" not in line), scope)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BaseModelMismatchWarning)
        loaded = PeftModel.from_pretrained(scope["base"], str(folder))
    saved = json.loads((folder / "adapter_config.json").read_text())["base_model_info"]
    assert loaded.peft_config["default"].base_model_info["fingerprint"] == saved["fingerprint"]
    assert saved["pretrained"] is False
    assert "| Dataset | `imagefolder:" in card and "| Labels | c0, c1 |" in card


def test_transformers_model_bf16(data, tmp_path, monkeypatch, capsys):
    """A transformers ViT built from a config (model type 'vit'), bf16 autocast, gradient accumulation, push."""
    kwargs = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64)
    import taps_peft.hub.save

    pushed = []  # the real push is tested against the loopback Hub in test_hub.py
    monkeypatch.setattr(taps_peft.hub.save, "push_to_hub", lambda model, repo_id, **kw: pushed.append(repo_id))
    m = train(vit_args(data, tmp_path / "hf", model="hf:vit", model_kwargs=kwargs, mixed_precision="bf16",
                       gradient_accumulation_steps=2, max_steps=3, batch_size=8, eval_split="none",
                       push_to_hub=True, hub_model_id="user/taps-hf-vit"))
    assert pushed == ["user/taps-hf-vit"] == [m["hub_model_id"]]
    assert m["step"] == 3 and m["total_layers"] == 12 and torch.isfinite(torch.tensor(m["train_loss"]))
    assert "eval_accuracy" not in m and (tmp_path / "hf/adapter_model.safetensors").is_file()
    out = capsys.readouterr().out
    assert "no eval split" in out and "nan" not in out and "pushed to the Hub: user/taps-hf-vit" in out
    assert_card_rebuilds_the_base(tmp_path / "hf", "torch.manual_seed(42)", 'AutoConfig.for_model("vit", num_labels=2')


def test_resume_matches_uninterrupted(data, tmp_path):
    # 64 images, batch 12, accumulation 2: 6 micro-batches = 3 steps per epoch; step 4 is mid-epoch 1.
    kw = dict(optimizer="sgd", lr=0.05, score_lr=0.2, lam=0.5, max_steps=7, batch_size=12,
              gradient_accumulation_steps=2, lr_warmup_steps=2, checkpoint_every=2, eval_split="none", log_every=1)
    full = train(vit_args(data, tmp_path / "full", **kw))
    ckpts = sorted(p.name for p in (tmp_path / "full/checkpoints").iterdir())
    assert ckpts == ["step_2", "step_4", "step_6", "step_7"]  # and no leftover .tmp_* folder

    (tmp_path / "resumed/checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full/checkpoints/step_4", tmp_path / "resumed/checkpoints/step_4")
    resumed = train(vit_args(data, tmp_path / "resumed", resume_from="latest", **kw))
    assert resumed["step"] == 7 and [h["step"] for h in resumed["history"]] == [5, 6, 7]  # it trained 5..7 only
    assert resumed["state"]["scores"] == pytest.approx(full["state"]["scores"], abs=1e-6)
    assert resumed["state"]["active"] == full["state"]["active"]
    assert resumed["state"]["trainable_sum"] == pytest.approx(full["state"]["trainable_sum"], rel=1e-6)
    assert resumed["state"]["delta_abs_sum"] == pytest.approx(full["state"]["delta_abs_sum"], rel=1e-6)
    assert [(h["step"], h["active"], h["acc"]) for h in resumed["history"]] == [
        (h["step"], h["active"], h["acc"]) for h in full["history"][4:]
    ]
    assert [h["loss"] for h in resumed["history"]] == pytest.approx([h["loss"] for h in full["history"][4:]], rel=1e-5)  # same batches, same losses
    with pytest.raises(ValueError, match=r"arguments differ from the checkpoint's: --lam 1\.0 \(was 0\.5\), "
                                         r"--batch-size 8 \(was 12\)\. A resumed run must train"):
        train(vit_args(data, tmp_path / "resumed", resume_from="latest", **{**kw, "lam": 1.0, "batch_size": 8}))


def test_a_local_weights_file_for_a_timm_model(data, tmp_path):
    """--weights: the pretrained EfficientNet-Lite0 from its package file (nothing downloaded); the card rebuilds it."""
    from taps_peft.training import efficientnet_lite0_weights

    weights = efficientnet_lite0_weights()
    m = train(TrainArgs(model="timm:tf_efficientnet_lite0", weights=weights, dataset=f"imagefolder:{data}",
                        cache_dir=str(data.parent / "hf_cache"), output_dir=str(tmp_path / "run"), cpu=True,
                        max_steps=2, batch_size=8, image_size=64, eval_split="none"))
    assert m["total_layers"] == 49
    assert_card_rebuilds_the_base(tmp_path / "run", "base = efficientnet_lite0(num_classes=2)")
    card = (tmp_path / "run" / "README.md").read_text()
    assert weights not in card and str(data) not in card and f"imagefolder:{data.name}" in card  # no local paths


def test_cli_usage_errors_are_messages_not_tracebacks(data, tmp_path, monkeypatch, capsys):
    cli = ["--model", "timm:vit_tiny_patch16_224", "--no-pretrained", "--model-kwargs", VIT, "--dataset",
           f"imagefolder:{data}", "--cache-dir", str(data.parent / "hf_cache"), "--cpu", "--max-steps", "1"]

    def fails(*extra: str) -> str:
        with pytest.raises(SystemExit) as exit_info:
            main(["train", *cli, "--output-dir", str(tmp_path / "out"), *extra])
        assert exit_info.value.code == 2
        return capsys.readouterr().err

    assert "holds no checkpoint yet" in fails("--resume-from", "latest")
    offline = ["--model", "timm:resnet18", "--pretrained"]  # HF_HUB_OFFLINE=1 (conftest) and nothing cached
    assert "pretrained weights are not in the local cache and must be downloaded, but HF_HUB_OFFLINE is set. Pass " \
           "--weights PATH" in fails(*offline)
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets for 2 processes that Accelerate then runs alone
    assert "launched as 2 processes, but Accelerate runs each one alone" in fails()
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setitem(sys.modules, "datasets", None)  # the minimal install: no `datasets`
    assert "needs `datasets`, which the minimal install lacks: pip install 'taps_peft[hub]'" in fails()
    assert not list(tmp_path.glob("out/*"))  # nothing was written


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("freeze", ["1", "0.5"])
def test_ddp_two_processes_match_single_process(data, tmp_path, freeze):
    """2 CPU processes x batch 8 through the real launcher == 1 process x batch 16 (same data order).

    DDP averages the ranks' gradients of their mean losses, which is the gradient of the mean over the global batch;
    the penalty's gradient is the same on both ranks, so the average keeps it. SGD with momentum and cosine decay.
    Gates close and reopen during these 8 steps (the history shows it), so while the gates learn (freeze 1: never
    frozen) closed-gate layers must still hand DDP a (zero) gradient: find_unused_parameters=False. With the gates
    frozen half-way, closed layers get none, and the launcher tells DDP so.
    """
    cli = ["--model", "timm:vit_tiny_patch16_224", "--no-pretrained", "--model-kwargs", VIT,
           "--dataset", f"imagefolder:{data}", "--cache-dir", str(data.parent / "hf_cache"),
           "--optimizer", "sgd", "--lr", "0.05", "--score-lr", "0.2", "--lam", "0.5", "--max-steps", "8",
           "--log-every", "1", "--eval-split", "none", "--freeze-gates-at", freeze]
    env = subprocess_env(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(_free_port())]
    proc = subprocess.run(
        [*launch, "-m", "taps_peft", "train", *cli, "--batch-size", "8", "--output-dir", str(tmp_path / "ddp"),
         "--print-state", "--checkpoint-every", "2", "--keep-checkpoints", "2"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=HANG,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    states = {s["rank"]: s for s in (json.loads(line[len(STATE_PREFIX):]) for line in proc.stdout.splitlines()
                                     if line.startswith(STATE_PREFIX))}
    assert sorted(states) == [0, 1] and all(s["world"] == 2 and s["step"] == 8 for s in states.values())
    assert states[0]["wrapper"] == "DistributedDataParallel"
    assert states[0]["find_unused_parameters"] is (freeze != "1")
    assert {k: v for k, v in states[0].items() if k != "rank"} == {k: v for k, v in states[1].items() if k != "rank"}
    ckpts = tmp_path / "ddp/checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_6", "step_8"]  # pruned, no .tmp_* left
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in (ckpts / "step_8").iterdir()}
    history = json.loads((tmp_path / "ddp/train_results.json").read_text())["history"]
    assert min(h["active"] for h in history) < 8  # some gates were closed during DDP steps

    single = train(parse_args([*cli, "--batch-size", "16", "--output-dir", str(tmp_path / "single"), "--cpu"]))
    ref, ddp = single["state"], states[0]
    assert ddp["delta_abs_sum"] > 0  # the deltas were found and trained
    assert ddp["active"] == ref["active"]
    assert ddp["scores"] == pytest.approx(ref["scores"], abs=1e-5)
    for key in ("delta_sum", "delta_abs_sum", "trainable_sum"):
        assert ddp[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-5), key
    assert [h["loss"] for h in history] == pytest.approx([h["loss"] for h in single["history"]], rel=1e-4)


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--model", "--dataset", "--lam", "--score-lr", "--resume-from", "--push-to-hub", "--mixed-precision",
                 "--gradient-accumulation-steps", "--no-pretrained"):
        assert flag in text
    args = parse_args(["--model", "timm:resnet18", "--dataset", "beans", "--model-kwargs", '{"img_size": 64}',
                       "--target-modules", "qkv", "proj", "--no-shuffle"])
    assert args.model_kwargs == {"img_size": 64} and args.target_modules == ["qkv", "proj"] and not args.shuffle
    assert "taps-peft=taps_peft.training.cli:main" in (REPO / "setup.py").read_text()
    script = shutil.which("taps-peft")  # from `pip install -e .`; the DDP test runs `python -m taps_peft train`
    if script:
        proc = subprocess.run([script, "train", "--help"], capture_output=True, text=True, timeout=HANG)
        assert proc.returncode == 0 and "usage: taps-peft train" in proc.stdout, proc.stderr[-2000:]


def test_cli_parser_is_transformers_hf_argument_parser(capsys):
    """The flags are HfArgumentParser's over TrainArgs: dashed and underscored spellings, a value for a switch, every
    --no-X kept; --model-kwargs is JSON (a dict or its text, as TrainingArguments' dict fields); mistakes are one
    argparse-style line with exit status 2."""
    from transformers import HfArgumentParser

    from taps_peft.training.cli import build_parser

    assert isinstance(build_parser(), HfArgumentParser)
    cli = ["--model", "timm:resnet18", "--dataset", "beans"]
    args = parse_args([*cli, "--score_lr", "0.1", "--shuffle", "false", "--cpu", "--no-cpu", "--no-print-state",
                       "--recalibrate-bn", "no", "--output-dir", "o"])
    assert (args.score_lr, args.shuffle, args.cpu, args.print_state, args.recalibrate_bn, args.output_dir) == (
        0.1, False, False, False, False, "o")
    assert TrainArgs(model="m", dataset="d", model_kwargs='{"img_size": 64}').model_kwargs == {"img_size": 64}
    help_text = build_parser().format_help()
    assert "[0.5]" in help_text and "Turn --shuffle off." in help_text  # defaults shown as before; --no-X says so
    for extra, message in ((["--model-kwargs", "{bad"], "--model-kwargs '{bad' is not JSON"),
                           (["--model-kwargs", "[1]"], "pass a JSON object"),
                           (["--frobnicate"], "unrecognized arguments: --frobnicate"),
                           (["--optimizer", "adam"], "invalid choice: 'adam'")):
        with pytest.raises(SystemExit) as exit_info:
            main(["train", *cli, *extra])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "taps-peft train: error: " in err and message in err and "Traceback" not in err, err
