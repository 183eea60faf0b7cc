"""A stable end of training: frozen gates (no flip in the last steps, closed layers skip their weight gradient) and
BatchNorm statistics re-estimated after the last gate change."""

import copy

import pytest
import torch
import taps_peft  # noqa: E402
import torch.nn.functional as F
from peft import get_peft_model
from peft.utils.other import ModulesToSaveWrapper

from taps_peft import TAPSConfig, TAPSLayer
from taps_peft import recalibrate_batchnorm
from conftest import logits, optimizer_for, tiny_resnet


def taps_layers(model):
    return [m for m in model.modules() if isinstance(m, TAPSLayer)]


def test_frozen_gates_do_not_flip_and_closed_layers_get_no_gradient(images):
    model = get_peft_model(tiny_resnet(), TAPSConfig(lam=50.0))  # a penalty that would close every gate
    layers = taps_layers(model)
    with torch.no_grad():
        layers[0].taps_scores["default"].fill_(0.05)  # closed
    opt = optimizer_for(model, torch.optim.SGD, lr=0.1, score_lr=0.1)
    model.freeze_gates()
    before = [m.taps_scores["default"].clone() for m in layers]
    model.train()
    for step in range(3):
        opt.zero_grad()
        (F.cross_entropy(logits(model, images), torch.arange(4) % 5) + model.taps_penalty()).backward()
        if step == 0:
            assert layers[0].taps_delta["default"].grad is None  # the closed layer ran as its base layer
            assert all(m.taps_delta["default"].grad is not None for m in layers[1:])
            assert all(m.taps_scores["default"].grad is None for m in layers)
        opt.step()
    assert all(torch.equal(m.taps_scores["default"], b) for m, b in zip(layers, before))
    assert [m.is_active("default") for m in layers] == [False] + [True] * (len(layers) - 1)
    model.set_adapter("default")  # PEFT's set_adapter makes the scores trainable again
    assert all(m.taps_scores["default"].requires_grad for m in layers)


@pytest.mark.parametrize("checkpointing", ["timm", "reentrant", "non_reentrant"])
def test_frozen_gates_under_activation_checkpointing_give_closed_deltas_no_gradient(images, checkpointing):
    """Issue 24: under activation checkpointing too, a closed layer of frozen gates runs as its base layer: its delta
    gets no gradient (None, so AdamW's weight decay leaves it alone), the open ones the gradients of the plain run."""
    base = tiny_resnet()
    model = get_peft_model(base, TAPSConfig(init_weights=False)).train()
    names = [n for n, m in model.named_modules() if isinstance(m, TAPSLayer)]
    first = next(i for i, n in enumerate(names) if ".layer1." in n)  # inside a block timm checkpoints
    with torch.no_grad():
        taps_layers(model)[first].taps_scores["default"].fill_(0.05)  # closed
    model.freeze_gates()
    plain = copy.deepcopy(model)
    if checkpointing == "timm":
        model.base_model.model.set_grad_checkpointing(True)
        out = logits(model, images)
    else:
        x = images.clone().requires_grad_()
        out = torch.utils.checkpoint.checkpoint(model, x, use_reentrant=checkpointing == "reentrant")
    out.square().sum().backward()
    logits(plain, images).square().sum().backward()
    layers, ref = taps_layers(model), taps_layers(plain)
    assert ref[first].taps_delta["default"].grad is None
    assert layers[first].taps_delta["default"].grad is None  # not zeros: AdamW's decay would move the closed delta
    for i, (m, r) in enumerate(zip(layers, ref)):
        if i != first:
            torch.testing.assert_close(m.taps_delta["default"].grad, r.taps_delta["default"].grad)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.1)
    closed = layers[first].taps_delta["default"].detach().clone()
    opt.step()
    assert torch.equal(layers[first].taps_delta["default"], closed)


def test_recalibrate_batchnorm_averages_the_batches_and_changes_no_weight(images):
    model = get_peft_model(tiny_resnet(), TAPSConfig(init_weights=False))
    wrapper = model.base_model.model.bn1
    assert isinstance(wrapper, ModulesToSaveWrapper)
    batches = [torch.randn(4, 3, 32, 32) for _ in range(3)]
    seen = []
    hook = wrapper.modules_to_save["default"].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    model.train()
    n = recalibrate_batchnorm(model, batches)
    hook.remove()
    assert n == sum(1 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)) // 2  # the task's copies
    expected = torch.stack([x.mean(dim=(0, 2, 3)) for x in seen]).mean(0)
    torch.testing.assert_close(wrapper.modules_to_save["default"].running_mean, expected)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    assert model.training and wrapper.modules_to_save["default"].momentum == 0.1
    stats = copy.deepcopy(wrapper.modules_to_save["default"].state_dict())
    recalibrate_batchnorm(model, batches)  # idempotent
    assert all(torch.equal(v, wrapper.modules_to_save["default"].state_dict()[k]) for k, v in stats.items())


def test_trainer_and_cli_fix_the_gates_and_recalibrate(tmp_path, monkeypatch):
    """TAPSTrainer(freeze_gates_at=0.5, recalibrate_bn=True): no gate changes after half the steps; the statistics
    change after training, no weight does; they are re-estimated on the first training images in order, unsharded
    (every DDP rank sees the same ones and ends with the same statistics)."""
    from transformers import TrainingArguments

    import taps_peft.batchnorm
    from taps_peft.training import TAPSTrainer

    recalibrated = []
    real = taps_peft.batchnorm.recalibrate_batchnorm

    def spy(model, batches, *args):
        batches = list(batches)
        recalibrated.extend(b["x"] for b in batches)
        return real(model, batches, *args)

    monkeypatch.setattr(taps_peft.batchnorm, "recalibrate_batchnorm", spy)

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 32

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            return {"x": torch.randn(3, 32, 32, generator=g) + i % 2, "labels": i % 2}

    class Net(torch.nn.Module):  # a BatchNorm model with a loss, as the Trainer expects
        def __init__(self):
            super().__init__()
            self.net = tiny_resnet(num_classes=2)

        def forward(self, x, labels=None):
            out = self.net(x)
            return {"loss": F.cross_entropy(out, labels), "logits": out} if labels is not None else {"logits": out}

    torch.manual_seed(0)
    model = get_peft_model(Net(), TAPSConfig(lam=3.0, target_modules=None, score_lr=0.05))
    args = TrainingArguments(str(tmp_path), max_steps=8, per_device_train_batch_size=8, learning_rate=1e-3,
                             report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no", logging_steps=1)
    seen = []

    class Record(__import__("transformers").TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            seen.append([r["active"] for r in taps_peft.taps_layer_report(model)])

    trainer = TAPSTrainer(model=model, args=args, train_dataset=Data(), freeze_gates_at=0.5,
                          recalibrate_bn=True, callbacks=[Record()])
    weights = {}

    class Before(__import__("transformers").TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            weights.update({k: v.clone() for k, v in model.state_dict().items()})

    trainer.add_callback(Before())
    trainer.train()
    assert seen[0] != seen[-1] or len(set(map(tuple, seen[:4]))) > 1  # the gates moved before the freeze ...
    assert all(s == seen[4] for s in seen[4:])  # ... and never after it
    after = model.state_dict()
    stats = [k for k in after if "running_mean" in k and ".modules_to_save." in k]
    assert stats and any(not torch.equal(after[k], weights[k]) for k in stats)
    assert all(torch.equal(after[k], v) for k, v in weights.items() if "running" not in k and "num_batches" not in k)
    assert torch.equal(torch.cat(recalibrated), torch.stack([Data()[i]["x"] for i in range(32)]))


@pytest.mark.parametrize("reentrant", [False, True])
def test_frozen_gates_work_under_activation_checkpointing(images, reentrant):
    """The recompute in the backward runs after the forward's host gates are gone: both must take the same path."""
    model = get_peft_model(tiny_resnet(), TAPSConfig(lam=1.0))
    with torch.no_grad():
        taps_layers(model)[0].taps_scores["default"].fill_(0.05)
    model.freeze_gates()
    model.train()
    x = images.clone().requires_grad_(reentrant)
    out = torch.utils.checkpoint.checkpoint(model, x, use_reentrant=reentrant)
    out.square().mean().backward()
    assert taps_layers(model)[1].taps_delta["default"].grad is not None


def test_recalibrate_batchnorm_on_a_plain_model_re_estimates_every_batchnorm(images):
    model = tiny_resnet().eval()  # no adapters: e.g. the full fine-tuning baseline
    batches = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    seen = []
    hook = model.bn1.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    assert recalibrate_batchnorm(model, batches) == sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    hook.remove()
    torch.testing.assert_close(model.bn1.running_mean, torch.stack([x.mean(dim=(0, 2, 3)) for x in seen]).mean(0))
    assert not model.training and model.bn1.momentum == 0.1  # restored


def _statistics(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def test_recalibrate_batchnorm_finds_the_task_copies_inside_any_wrapper(images):
    """Through a DDP-like wrapper (``.module``) or a user's own module around the PeftModel, only the active adapter's
    BatchNorm copies are re-estimated; the shared base's statistics never move."""
    from torch import nn

    class Wrapper(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, x):
            return self.module(x)

    model = get_peft_model(tiny_resnet(), TAPSConfig(init_weights=False))
    before = _statistics(model)
    wrapped = Wrapper(Wrapper(model))
    count = recalibrate_batchnorm(wrapped, [torch.randn(4, 3, 32, 32)])
    after = _statistics(model)
    assert count > 0 and count == sum(1 for k in before if k.endswith("modules_to_save.default.running_mean"))
    for key, value in before.items():
        assert torch.equal(after[key], value) == (".modules_to_save." not in key), key  # base kept, copies moved


def test_recalibrate_batchnorm_is_all_or_nothing(images):
    model = get_peft_model(tiny_resnet(), TAPSConfig(init_weights=False))
    before = _statistics(model)
    with pytest.raises(ValueError, match="got no batch"):
        recalibrate_batchnorm(model, iter([]))

    def broken():
        yield torch.randn(4, 3, 32, 32)
        raise OSError("the data went away")

    with pytest.raises(OSError, match="went away"):
        recalibrate_batchnorm(model, broken())
    after = _statistics(model)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert all(m.momentum == 0.1 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
