"""A budget instead of lam: training adapts lam (dual ascent) until the active layers fit."""

import pytest
import torch
import torch.nn.functional as F

import taps_peft
from peft import get_peft_model

from taps_peft import TAPSConfig
from conftest import optimizer_for, tiny_timm_vit


def train(config, steps=60, record=0):
    """``steps`` AdamW steps; the budget usage after each of the last ``record`` steps is kept on the model."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_timm_vit(), config)
    opt = optimizer_for(model, torch.optim.AdamW, lr=1e-3, score_lr=2e-2)
    x, y = torch.randn(16, 3, 32, 32), torch.arange(16) % 5
    model.usage = []
    for step in range(steps):  # TAPS moves lam once per optimizer step itself
        loss = F.cross_entropy(model(x), y) + model.taps_penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step >= steps - record:
            model.usage.append({**taps_peft.budget_usage(model), "lam": model.peft_config["default"].lam})
    return model


@pytest.mark.parametrize("budget", [{"budget_layers": 3}, {"budget_mib": 0.8}])
def test_training_lands_within_the_budget(budget, capsys):
    """Dual ascent settles at the budget: lam rose, and over the last 20 steps the active layers fit the budget most
    of the time (a gate at the boundary may open for a step or two) without switching everything off."""
    model = train(TAPSConfig(lam=0.0, **budget), steps=120, record=20)
    within = [u["layers"] <= budget.get("budget_layers", 8) and u["mib"] <= budget.get("budget_mib", 100.0)
              for u in model.usage]
    assert sum(within) >= 12, model.usage
    assert max(u["layers"] for u in model.usage) >= 1  # the budget binds without switching everything off
    summary = taps_peft.taps_summary(model)
    assert max(u["lam"] for u in model.usage) > 0  # the budget raised lam (it may fall back once within)
    assert summary["budget"] == {k.removeprefix("budget_"): v for k, v in budget.items()}
    taps_peft.print_taps_summary(model)
    assert ("(within, lam=" if within[-1] else "(over, lam=") in capsys.readouterr().out


def test_a_loose_budget_brings_lam_down():
    model = train(TAPSConfig(lam=0.3, budget_layers=8), steps=10)  # 8 = every layer: the budget never binds
    assert taps_peft.taps_summary(model)["lam"] < 0.3


def test_without_a_budget_lam_is_fixed():
    model = train(TAPSConfig(lam=0.3), steps=3)
    from taps_peft.budget import adapt_lam

    assert adapt_lam(model) is None
    assert taps_peft.taps_summary(model)["lam"] == 0.3 and taps_peft.taps_summary(model)["budget"] == {}


@pytest.mark.parametrize("kwargs", [{"budget_layers": -1}, {"budget_layers": 0}, {"budget_layers": 2.5}, {"budget_mib": 0.0},
                                    {"budget_rate": 0.0}])
def test_bad_budgets_name_the_field(kwargs):
    with pytest.raises(ValueError, match=rf"TAPSConfig\.{next(iter(kwargs))}=.*invalid: use"):
        TAPSConfig(**kwargs)
