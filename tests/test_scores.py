"""How the scores learn in any loop (taps_peft.scores): the penalty's gradient and the scores' own Adam step at
every step of whatever torch optimizer holds them; its schedule (lam warm-up, lr ratio); gradient accumulation, a
GradScaler, optimizers that do not hold the scores, and the hook's lifetime."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model

import taps_peft
from conftest import tiny_timm_vit
from taps_peft import TAPSConfig
from taps_peft.tuner.model import taps_layers

X, Y = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.arange(8) % 5


def score_values(model) -> list[float]:
    return [r["score"] for r in taps_peft.taps_layer_report(model)]


def step(model, optimizer, x=X, y=Y) -> None:
    (F.cross_entropy(model(x), y) + model.taps_penalty()).backward()
    optimizer.step()
    optimizer.zero_grad()


def test_the_penalty_value_is_lam_over_L_sum_abs_scores():
    model = get_peft_model(tiny_timm_vit(), TAPSConfig(lam=0.6))
    layers = [m for _, m in taps_layers(model)]
    with torch.no_grad():
        for i, layer in enumerate(layers):
            layer.taps_scores["default"].fill_(0.1 * i - 0.2)
    penalty = model.taps_penalty()
    assert penalty.item() == pytest.approx(0.6 / len(layers) * sum(abs(0.1 * i - 0.2) for i in range(len(layers))))
    penalty.backward()
    assert layers[0].taps_scores["default"].grad.item() == pytest.approx(-0.6 / len(layers))


@pytest.mark.parametrize("make_optimizer", [
    lambda p: torch.optim.AdamW(p, lr=1e-5), lambda p: torch.optim.AdamW(p, lr=1e-3, fused=True),
    lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9), lambda p: torch.optim.Adagrad(p, lr=0.1),
], ids=["adamw-1e-5", "fused-adamw-1e-3", "sgd-momentum", "adagrad"])
def test_the_first_step_moves_every_score_by_score_lr_whatever_the_optimizer(make_optimizer):
    """Zero deltas give the scores no task gradient at step 1, only the penalty's: every score moves by exactly
    score_lr (Adam's first step), whatever optimizer and learning rate the loop built."""
    model = get_peft_model(tiny_timm_vit(), TAPSConfig(lam=0.5, score_lr=0.02))
    optimizer = make_optimizer(model.parameters())
    step(model, optimizer)
    assert score_values(model) == pytest.approx([0.15 - 0.02] * len(score_values(model)), rel=1e-5)
    assert all(m.taps_scores["default"].grad is None for _, m in taps_layers(model))  # the optimizer saw none


def test_a_loss_without_the_penalty_gets_it_at_the_step_and_a_warning_naming_the_line():
    runs = []
    for with_line in (True, False):
        torch.manual_seed(0)
        model = get_peft_model(tiny_timm_vit(), TAPSConfig(lam=0.5))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            for _ in range(3):
                loss = F.cross_entropy(model(X), Y)
                (loss + model.taps_penalty() if with_line else loss).backward()
                optimizer.step()
                optimizer.zero_grad()
        named = [w for w in seen if "loss = loss + model.taps_penalty()" in str(w.message)]
        assert len(named) == (0 if with_line else 1)  # once only
        runs.append(score_values(model))
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-5, atol=1e-7)  # the same penalty, applied at the step


def test_a_transformers_model_given_labels_adds_the_penalty_to_its_own_loss():
    """As models add their auxiliary losses: in training outputs.loss holds the penalty (its share of
    num_items_in_batch when the loss is normalised by it), in eval it does not, and asking for it again gives no second
    gradient."""
    from conftest import tiny_hf_vit

    model = get_peft_model(tiny_hf_vit(), TAPSConfig(lam=0.5, lam_warmup=0.0))  # lam in full from step 0
    x, y = X[:4], Y[:4]
    with torch.no_grad():
        value, logits = model.taps_penalty(), model.eval()(pixel_values=x).logits
    task = F.cross_entropy(logits, y)
    assert torch.equal(model(pixel_values=x, labels=y).loss, task)  # eval: the task loss alone
    model.train()
    shared = model(pixel_values=x, labels=y, num_items_in_batch=torch.tensor(16))  # 4 of the step's 16 items
    torch.testing.assert_close(shared.loss.detach(), task * 4 / 16 + value * 4 / 16)
    out = model(pixel_values=x, labels=y)
    torch.testing.assert_close(out.loss.detach(), task + value)
    with pytest.warns(UserWarning, match=r"already added the penalty to the loss it returned"):
        assert not model.taps_penalty().requires_grad  # no second gradient
    out.loss.backward()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the penalty was in the loss: no warning
        optimizer.step()


def test_the_step_follows_the_optimizer_schedule_as_a_ratio():
    model = get_peft_model(tiny_timm_vit(), TAPSConfig(lam=0.5, score_lr=0.02))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.25)  # a quarter of the initial lr
    step(model, optimizer)
    scheduler.step()
    assert score_values(model)[0] == pytest.approx(0.15 - 0.25 * 0.02, rel=1e-5)


def test_gradient_accumulation_applies_the_penalty_once_per_optimizer_step():
    """4 micro-batches of 2 (loss / 4, as the Trainer and Accelerate do) and one batch of 8: the same scores."""
    runs = []
    for micro in (1, 4):
        torch.manual_seed(0)
        model = get_peft_model(tiny_timm_vit(), TAPSConfig(lam=0.5))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for _ in range(5):
            for x, y in zip(X.chunk(micro), Y.chunk(micro)):
                ((F.cross_entropy(model(x), y) + model.taps_penalty()) / micro).backward()
            optimizer.step()
            optimizer.zero_grad()
        runs.append(score_values(model))
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-4, atol=1e-6)
    assert len({round(s, 4) for s in runs[0]}) > 3  # the layers' task gradients differ: a real comparison


def test_a_grad_scaler_step_matches_an_unscaled_one_and_a_skipped_step_moves_nothing():
    results = []
    for scaled in (False, True):
        torch.manual_seed(0)
        model = get_peft_model(tiny_timm_vit(), TAPSConfig(lam=0.5))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=scaled)
        for _ in range(3):
            scaler.scale(F.cross_entropy(model(X), Y) + model.taps_penalty()).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
        results.append(score_values(model))
    torch.testing.assert_close(results[1], results[0], rtol=1e-4, atol=1e-6)  # the penalty in unscaled units
    before = score_values(model)
    scaler.scale(F.cross_entropy(model(X), Y) * float("inf")).backward()  # an overflow: the scaler skips the step
    scaler.step(optimizer)
    optimizer.zero_grad()
    assert score_values(model) == before


def test_lam_warmup_ramps_the_penalty_from_zero():
    model = get_peft_model(tiny_timm_vit(), TAPSConfig(lam=0.5, lam_warmup=0.5, total_step=8))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    start = score_values(model)
    step(model, optimizer)
    assert score_values(model) == start  # step 1: lam 0, zero deltas: no gradient at all
    values = [model.taps_penalty().item() / sum(abs(s) for s in score_values(model))]
    for _ in range(5):
        step(model, optimizer)
        values.append(model.taps_penalty().item() / sum(abs(s) for s in score_values(model)))
    L = len(score_values(model))
    assert values == pytest.approx([0.5 / L * min(1, k / 4) for k in range(1, 7)], rel=1e-5)  # lam_t / L


def test_the_gates_are_fixed_after_freeze_gates_at_of_a_known_training_length():
    """From freeze_gates_at of total_step on, the scores stop (no late gate flips) while the deltas go on training,
    in any loop; without a known length nothing is fixed. Before: a stock Trainer run closed 48 of 49 gates in its
    last steps (docs/results.md)."""
    def run(**config):
        model = get_peft_model(tiny_timm_vit(), TAPSConfig(lam=2.0, lam_warmup=0.0, **config))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        seen = []
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # no "scores did not step" warning once they are fixed
            for _ in range(6):
                step(model, optimizer)
                seen.append(score_values(model))
        delta = taps_layers(model)[0][1].taps_delta["default"]
        return seen, delta

    seen, delta = run(total_step=6, freeze_gates_at=0.5)
    assert seen[0] != seen[1] != seen[2]  # steps 1-3 move the scores
    assert seen[2] == seen[3] == seen[4] == seen[5]  # from step 4 (3 of 6 done) they stay
    assert delta.abs().sum() > 0
    moving, _ = run(total_step=6, freeze_gates_at=None)
    assert moving[4] != moving[5]
    unknown, _ = run(freeze_gates_at=0.5)  # no total_step: nothing is fixed
    assert unknown[4] != unknown[5]
    with pytest.raises(ValueError, match=r"freeze_gates_at.*\(0, 1\]"):
        TAPSConfig(freeze_gates_at=0.0)


def test_an_optimizer_that_does_not_hold_the_scores_is_warned_once():
    model = get_peft_model(tiny_timm_vit(), TAPSConfig(lam=0.5))
    start = score_values(model)
    optimizer = torch.optim.AdamW([p for n, p in model.named_parameters() if p.requires_grad and "scores" not in n])
    with pytest.warns(UserWarning, match=r"updated the adapter's weights but not its scores.*model.parameters\(\)"):
        for _ in range(3):
            step(model, optimizer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step(model, optimizer)  # once only
    assert score_values(model) == start


def test_step_scores_serves_an_optimizer_of_another_kind():
    model = get_peft_model(tiny_timm_vit(), TAPSConfig(lam=0.5, score_lr=0.02))
    (F.cross_entropy(model(X), Y) + model.taps_penalty()).backward()
    assert taps_peft.step_scores(model) == len(score_values(model))
    assert score_values(model) == pytest.approx([0.13] * len(score_values(model)), rel=1e-5)
    assert taps_peft.step_scores(model) == 0  # nothing without gradients


def test_the_optimizer_state_resumes_exactly():
    """The scores' Adam state lives in the optimizer's state: a save/load of both resumes bit for bit."""
    def fresh():
        torch.manual_seed(0)
        model = get_peft_model(tiny_timm_vit(), TAPSConfig(lam=0.5))
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2)

    model, optimizer = fresh()
    for _ in range(6):
        step(model, optimizer)
    straight = score_values(model)
    model, optimizer = fresh()
    for _ in range(3):
        step(model, optimizer)
    state = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "opt": optimizer.state_dict()}
    model, optimizer = fresh()
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["opt"])
    for _ in range(3):
        step(model, optimizer)
    assert score_values(model) == straight


def test_budgets_move_lam_once_per_optimizer_step():
    lams = []
    for micro in (1, 4):
        model = get_peft_model(tiny_timm_vit(), TAPSConfig(lam=0.1, budget_layers=1))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for _ in range(3):
            for x, y in zip(X.chunk(micro), Y.chunk(micro)):
                ((F.cross_entropy(model(x), y) + model.taps_penalty()) / micro).backward()
            optimizer.step()
            optimizer.zero_grad()
        lams.append(model.peft_config["default"].lam)
    rate, excess = 0.05, (8 - 1) / 1  # 8 open layers against a budget of 1, for 3 steps
    assert lams == pytest.approx([0.1 + 3 * rate * excess] * 2)


_HOOK_LIFETIME = """
import gc, json, sys, torch, torch.nn.functional as F
sys.path.insert(0, "tests")
from conftest import tiny_resnet, tiny_timm_vit
import taps_peft
from peft import LoraConfig, get_peft_model
from taps_peft.scores import hook_installed

def lora_run():
    torch.manual_seed(0)
    model = get_peft_model(tiny_resnet(), LoraConfig(target_modules=["conv2"], init_lora_weights=False))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    F.cross_entropy(model(torch.ones(2, 3, 32, 32)), torch.tensor([0, 1])).backward()
    optimizer.step()
    return [p.detach().clone() for p in model.parameters() if p.requires_grad]

seen = {"after_import": hook_installed()}
alone = lora_run()
taps = get_peft_model(tiny_timm_vit(), taps_peft.TAPSConfig())
copied = __import__("copy").deepcopy(taps)
seen["with_taps"] = hook_installed()
seen["lora_identical"] = all(torch.equal(a, b) for a, b in zip(alone, lora_run()))
del taps
gc.collect()
seen["with_a_copy"] = hook_installed()
del copied
gc.collect()
seen["after_del"] = hook_installed()
print(json.dumps(seen))
"""


def test_the_hook_lives_with_the_models_and_leaves_lora_alone():
    """import taps_peft installs nothing; the optimizer-step hook exists while a TAPS model (or a copy) does, and an
    optimizer without TAPS scores (a LoRA model's) steps bit for bit as without it."""
    import json
    import subprocess
    import sys

    from conftest import HANG

    out = subprocess.run([sys.executable, "-c", _HOOK_LIFETIME], capture_output=True, text=True, check=True,
                         timeout=HANG, cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen == {"after_import": False, "with_taps": True, "lora_identical": True, "with_a_copy": True,
                    "after_del": False}
