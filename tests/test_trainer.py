"""TAPS in the 🤗 Trainer: the stock Trainer with only the config swapped (penalty, score steps, gradient accumulation),
TAPSTrainer and TAPSCallback (training length, TAPS logs, checkpoints, resume).

Model: conftest's tiny random-init transformers ViT (image 32, 2 blocks, 12 gated layers); data: 64 in-memory 32x32
images, one fixed random pattern per class plus noise, so the task is learnable in a few steps. Nothing is downloaded.
Torch runs with one thread (a shared 2-core machine).
"""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from transformers import Trainer, TrainerCallback, TrainingArguments

import taps_peft
from conftest import HANG, subprocess_env, tiny_hf_vit
from taps_peft.training import TAPSCallback, TAPSTrainer, unwrap_taps_model

STEPS, SAVE_EVERY, LR = 20, 10, 1e-2


class PatternImages(torch.utils.data.Dataset):
    """``n`` images of ``k`` classes: the class's fixed random pattern plus noise; items are Trainer-ready dicts."""

    def __init__(self, n: int = 64, k: int = 5, seed: int = 1):
        g = torch.Generator().manual_seed(seed)
        patterns = torch.randn(k, 3, 32, 32, generator=g)
        self.labels = torch.arange(n) % k
        self.images = patterns[self.labels] + 0.5 * torch.randn(n, 3, 32, 32, generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.images[i], "labels": self.labels[i]}


def taps_vit(seed: int = 0, **config):
    torch.manual_seed(seed)  # the same seed gives the same base weights: what a reload needs
    return get_peft_model(tiny_hf_vit(), taps_peft.TAPSConfig(**config))


def base_vit(seed: int = 0):
    torch.manual_seed(seed)
    return tiny_hf_vit()


def training_args(out, **kwargs) -> TrainingArguments:
    defaults = dict(
        output_dir=str(out), max_steps=STEPS, save_steps=SAVE_EVERY, per_device_train_batch_size=8,
        learning_rate=LR, report_to=[], use_cpu=True, logging_steps=5, disable_tqdm=True, seed=3,
    )
    return TrainingArguments(**{**defaults, **kwargs})


def scores(model) -> list[float]:
    return [r["score"] for r in taps_peft.taps_layer_report(model)]


class RecordAt(TrainerCallback):
    """Keeps a copy of the scores and deltas after optimizer step ``step``."""

    def __init__(self, step: int):
        self.step, self.params = step, None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            self.params = {n: p.detach().clone() for n, p in model.named_parameters() if ".taps_" in n}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two TAPSTrainer runs on the same data: lam=0.5 with checkpoints every 10 steps, and lam=0 without."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = {}
        for lam in (0.5, 0.0):
            path = tmp_path_factory.mktemp(f"lam{lam}")
            model = taps_vit(lam=lam)
            record = RecordAt(SAVE_EVERY)
            args = training_args(path, save_strategy="steps" if lam else "no")
            trainer = TAPSTrainer(model=model, args=args, train_dataset=PatternImages(), callbacks=[record])
            trainer.train()
            out[lam] = {"model": model, "trainer": trainer, "dir": path, "at_save": record.params}
        yield out
    finally:
        torch.set_num_threads(threads)


def test_scores_move_and_the_penalty_closes_gates(runs):
    penalized, free = runs[0.5]["model"], runs[0.0]["model"]
    for model in (penalized, free):  # the task gradient (and for lam > 0 the penalty) moves every score
        assert all(abs(s - 0.15) > 1e-3 for s in scores(model)), scores(model)
    tau = penalized.peft_config["default"].tau
    closed = [s < tau for s in scores(penalized)]
    assert any(closed) and not all(closed), scores(penalized)  # some layers shared, some task-specific
    assert sum(scores(penalized)) < sum(scores(free)) - 0.1
    assert taps_peft.taps_summary(penalized)["active_layers"] < taps_peft.taps_summary(free)["active_layers"]
    # the gates the model computes with follow the scores (fused AdamW, the Trainer's default, leaves no trace)
    assert taps_peft.taps_summary(penalized)["active_layers"] == sum(not c for c in closed)
    assert runs[0.5]["trainer"].args.optim == "adamw_torch_fused"


def test_logs_carry_active_layers_and_penalty(runs):
    for lam, run in runs.items():
        history = run["trainer"].state.log_history
        train_logs = [h for h in history if "loss" in h]
        assert [h["step"] for h in train_logs] == [5, 10, 15, 20]
        for h in train_logs + [history[-1]]:  # the periodic logs and the final train summary
            assert h["taps_total_layers"] == 12 and 0 <= h["taps_active_layers"] <= 12
            assert (h["taps_penalty"] > 0) == (lam > 0)
        assert train_logs[-1]["taps_active_layers"] == taps_peft.taps_summary(run["model"])["active_layers"]
        if lam:  # the penalty rises with lam's ramp (the first half of the steps), then falls as the scores do
            assert train_logs[0]["taps_penalty"] < train_logs[1]["taps_penalty"]
            assert train_logs[-1]["taps_penalty"] < train_logs[1]["taps_penalty"]
    # TAPSTrainer puts its callback first, so reporters and the progress bar see the values
    assert isinstance(runs[0.5]["trainer"].callback_handler.callbacks[0], TAPSCallback)


def test_checkpoints_hold_the_adapter(runs):
    run = runs[0.5]
    for step in (SAVE_EVERY, STEPS):
        ckpt = run["dir"] / f"checkpoint-{step}"
        files = set(os.listdir(ckpt))
        assert {"adapter_model.safetensors", "adapter_config.json", "trainer_state.json"} <= files, files
        assert not {"model.safetensors", "pytorch_model.bin"} & files  # an adapter, not the full model
        assert json.loads((ckpt / "adapter_config.json").read_text())["peft_type"] == "TAPS"
    # checkpoint-10 holds the scores of step 10 and the deltas of the layers active then, bit for bit
    saved = load_file(str(run["dir"] / f"checkpoint-{SAVE_EVERY}" / "adapter_model.safetensors"))
    tau = run["model"].peft_config["default"].tau
    at_save = run["at_save"]
    score_keys = [k for k in saved if k.endswith(".taps_scores")]
    assert len(score_keys) == 12
    for key in score_keys:
        assert torch.equal(saved[key], at_save[key + ".default"])
        delta_key = key[: -len("taps_scores")] + "taps_delta"
        assert (delta_key in saved) == bool(at_save[key + ".default"].item() >= tau)
        if delta_key in saved:
            assert torch.equal(saved[delta_key], at_save[delta_key + ".default"])


def test_checkpoint_reloads_the_trained_model_exactly(runs):
    run = runs[0.5]
    trained = run["model"].eval()
    images = PatternImages(n=16, seed=7).images
    loaded = PeftModel.from_pretrained(base_vit(), str(run["dir"] / f"checkpoint-{STEPS}")).eval()
    with torch.no_grad():
        want, got = trained(pixel_values=images).logits, loaded(pixel_values=images).logits
    assert torch.equal(got, want)
    assert scores(loaded) == scores(trained)
    assert taps_peft.taps_summary(loaded)["active_layers"] == taps_peft.taps_summary(trained)["active_layers"]
    # the mid-training checkpoint is a different (earlier) adapter
    early = PeftModel.from_pretrained(base_vit(), str(run["dir"] / f"checkpoint-{SAVE_EVERY}")).eval()
    with torch.no_grad():
        assert not torch.equal(early(pixel_values=images).logits, want)


def stock_run(out, lam=0.5, config=None, callbacks=None, **kwargs) -> tuple[list[float], Trainer]:
    """The stock Trainer with its defaults (AdamW fused, lr 5e-5, linear schedule, 3 epochs), only the config swapped."""
    model = taps_vit(lam=lam, **(config or {}))
    args = TrainingArguments(output_dir=str(out), use_cpu=True, report_to=[], disable_tqdm=True, save_strategy="no",
                             **kwargs)
    trainer = Trainer(model=model, args=args, train_dataset=PatternImages(), callbacks=callbacks)
    trainer.train()
    return scores(model), trainer


def test_the_stock_trainer_does_taps_with_only_the_config_swapped(tmp_path):
    """PEFT's recipe with LoraConfig swapped for TAPSConfig, with the Trainer's default optimizer and learning rate:
    the penalty acts and gates close (the transformers model adds it to its loss). Without a TAPSCallback the model
    does not know the training length, so lam's warm-up is skipped with a warning; with one, the scores are
    TAPSTrainer's exactly (one mechanism)."""
    with pytest.warns(UserWarning, match="training length is unknown"):
        stock, trainer = stock_run(tmp_path / "stock")
    assert trainer.args.optim == "adamw_torch_fused" and trainer.args.learning_rate == 5e-5
    assert sum(s < 0.1 for s in stock) >= 6, stock  # the penalty closed gates (0 of 12 before the fix)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no TAPS warning (transformers' own FutureWarnings aside)
        ramped, _ = stock_run(tmp_path / "ramped", callbacks=[TAPSCallback()])
    model = taps_vit(lam=0.5)
    args = TrainingArguments(output_dir=str(tmp_path / "taps"), use_cpu=True, report_to=[], disable_tqdm=True,
                             save_strategy="no")
    TAPSTrainer(model=model, args=args, train_dataset=PatternImages(),  # gates fixed at 0.8, as the config's
                recalibrate_bn=False).train()
    assert scores(model) == ramped
    free, _ = stock_run(tmp_path / "free", lam=0.0, callbacks=[TAPSCallback()])
    assert sum(free) > sum(ramped) + 0.5  # without lam the scores stay up


def test_gradient_accumulation_gives_the_scores_of_one_big_batch(tmp_path):
    """4 micro-batches of 2 and one batch of 8 give the same scores: the penalty acts once per optimizer step."""
    big, _ = stock_run(tmp_path / "big", learning_rate=LR, max_steps=6, per_device_train_batch_size=8)
    small, _ = stock_run(tmp_path / "small", learning_rate=LR, max_steps=6, per_device_train_batch_size=2,
                         gradient_accumulation_steps=4)
    torch.testing.assert_close(small, big, rtol=1e-4, atol=1e-6)
    assert len({round(s, 4) for s in big}) > 3  # the task gradient differs per layer: a real comparison


@pytest.mark.parametrize("optim", ["adamw_torch_fused", "sgd"])
def test_the_scores_step_at_score_lr_whatever_the_optimizer(tmp_path, optim):
    """The first step (zero deltas: only the penalty's gradient) moves every score by exactly score_lr, for a fused
    AdamW at lr 1e-5 and for SGD at lr 1: the optimizer the loop built does not set the scores' step."""
    lr = 1e-5 if optim.startswith("adamw") else 1.0
    moved, _ = stock_run(tmp_path, optim=optim, learning_rate=lr, max_steps=1, config={"score_lr": 0.03})
    assert moved == pytest.approx([0.15 - 0.03] * 12, rel=1e-5)
    with pytest.raises(TypeError, match=r"TAPSConfig\(score_lr="):
        TAPSTrainer(model=taps_vit(), args=training_args(tmp_path), score_learning_rate=0.1)


def test_lam_warmup_without_the_training_length_warns_once(tmp_path):
    with pytest.warns(UserWarning, match=r"lam_warmup=0.5 .*training length is unknown.*TAPSCallback") as seen:
        stock_run(tmp_path, config={"lam_warmup": 0.5}, max_steps=3)
    assert sum("lam_warmup" in str(w.message) for w in seen) == 1


def test_the_warnings_callback_is_reachable_as_written_after_import_taps_peft():
    """The warning above (and the docs) write ``taps_peft.training.TAPSCallback()``: after a bare ``import taps_peft``
    that attribute loads the training package on first use, and only then."""
    script = ("import sys, taps_peft\nassert 'taps_peft.training' not in sys.modules\n"
              "print(taps_peft.training.TAPSCallback.__name__)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=HANG,
                         env=subprocess_env())
    assert out.returncode == 0 and out.stdout.split() == ["TAPSCallback"], out.stderr
    with pytest.raises(AttributeError, match="has no attribute 'trianing'"):
        taps_peft.trianing  # noqa: B018  (a typo stays an AttributeError)


def test_resume_from_a_checkpoint_is_exact_with_inactive_deltas(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trained = {}
        for name, resume in (("full", None), ("resumed", tmp_path / "full" / f"checkpoint-{SAVE_EVERY}")):
            model = taps_vit(lam=0.5, save_inactive_deltas=True)
            trainer = TAPSTrainer(model=model, args=training_args(tmp_path / name), train_dataset=PatternImages())
            trainer.train(resume_from_checkpoint=str(resume) if resume else None)
            trained[name] = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    finally:
        torch.set_num_threads(threads)
    assert trained["full"].keys() == trained["resumed"].keys()
    for name, value in trained["full"].items():
        assert torch.equal(value, trained["resumed"][name]), name


def test_activation_checkpointing_trains_like_without(tmp_path):
    """``TrainingArguments(activation_checkpointing=True)`` on a TAPS model: the same parameters after a few steps."""
    trained = {}
    for flag in (False, True):
        model = taps_vit(lam=0.5)
        args = training_args(tmp_path / str(flag), max_steps=4, save_strategy="no", activation_checkpointing=flag)
        TAPSTrainer(model=model, args=args, train_dataset=PatternImages()).train()
        assert model.base_model.model.is_activation_checkpointing == flag
        trained[flag] = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    for name, value in trained[False].items():
        torch.testing.assert_close(trained[True][name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_a_model_without_taps_is_refused(tmp_path):
    with pytest.raises(TypeError, match="get_peft_model"):
        TAPSTrainer(model=tiny_hf_vit(), args=training_args(tmp_path))
    assert unwrap_taps_model(torch.nn.parallel.DataParallel(taps_vit())) is not None


def test_callback_logs_with_a_plain_trainer(tmp_path):
    """Any Trainer logs the TAPS values with callbacks=[TAPSCallback()], which also gives the model its training
    length (total_step) for lam_warmup."""
    model = taps_vit(lam=0.5, lam_warmup=0.4)
    args = training_args(tmp_path, max_steps=5, save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=PatternImages(), callbacks=[TAPSCallback()])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the training length is known: no warning
        trainer.train()
    assert model.peft_config["default"].total_step == 5
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 1 and logged[0]["taps_total_layers"] == 12
    assert logged[0]["taps_penalty"] == pytest.approx(model.taps_penalty().item(), abs=1e-6)


def test_taps_trainer_never_adds_the_penalty_twice(tmp_path):
    """A loss function that already adds model.taps_penalty() (as the stock Trainer needs for a timm model) gives
    TAPSTrainer the scores of one that leaves the penalty to TAPSTrainer: it counts once (before: twice)."""
    import torch.nn.functional as F

    from conftest import tiny_timm_vit

    class XImages(PatternImages):  # a timm model takes its images as x
        def __getitem__(self, i: int) -> dict:
            return {"x": self.images[i], "label": self.labels[i]}  # the collator makes it "labels"

    def run(with_penalty: bool) -> list[float]:
        torch.manual_seed(0)
        model = get_peft_model(tiny_timm_vit(), taps_peft.TAPSConfig(lam=2.0, lam_warmup=0.0))

        def loss(outputs, labels, num_items_in_batch=None):
            return F.cross_entropy(outputs, labels) + (model.taps_penalty() if with_penalty else 0)

        TAPSTrainer(model=model, args=training_args(tmp_path / str(with_penalty), max_steps=4), train_dataset=XImages(),
                    compute_loss_func=loss, freeze_gates_at=None, recalibrate_bn=False).train()
        return scores(model)

    torch.testing.assert_close(run(True), run(False), rtol=1e-5, atol=1e-7)


def test_freeze_gates_at_none_never_fixes_the_gates(tmp_path):
    """TAPSTrainer(freeze_gates_at=None) hands its choice to the model's schedule: the scores still move in the last
    20% of training (before: TAPSConfig's default 0.8 fixed them anyway once the training length was known)."""
    model = taps_vit(lam=0.5, lam_warmup=0.0)
    record = RecordAt(4)
    TAPSTrainer(model=model, args=training_args(tmp_path, max_steps=5), train_dataset=PatternImages(),
                callbacks=[record], freeze_gates_at=None, recalibrate_bn=False).train()
    late = {n: p for n, p in model.named_parameters() if ".taps_scores" in n}
    assert all(model.peft_config[a].freeze_gates_at is None for a in model.peft_config)
    assert any(not torch.equal(late[n], record.params[n]) for n in late)  # step 5 moved them
