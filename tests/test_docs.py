"""The documentation's Python examples call taps_peft as it is: every ```python block of README.md and docs/*.md
parses, and every keyword it passes to a taps_peft function or class (``taps_peft.X(...)``, or ``X(...)`` after
``from taps_peft... import X``) is one that callable takes (a renamed or removed argument fails here, not in a
user's hands); the README's example and docs/adapters.md's many-tasks and LoRA-export examples run as written, on a
tiny random-init ViT with the objects their text names."""

from __future__ import annotations

import ast
import inspect
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model

import taps_peft
import taps_peft.training
from conftest import tiny_timm_vit

ROOT = Path(__file__).resolve().parents[1]
MODULES = {"taps_peft": taps_peft, "taps_peft.training": taps_peft.training}


def blocks(doc: Path) -> list[str]:
    """The ```python blocks of a Markdown file, in order."""
    return re.findall(r"```python\n(.*?)```", doc.read_text(), re.S)


def python_blocks() -> list:
    return [pytest.param(code, id=f"{doc.name}#{i}")
            for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
            for i, code in enumerate(blocks(doc))]


def block(doc: str, containing: str) -> str:
    """The ```python block of ``doc`` (relative to the checkout) that contains ``containing``."""
    return next(code for code in blocks(ROOT / doc) if containing in code)


def dotted(node: ast.AST) -> str:
    """``taps_peft.training`` for that attribute chain, '' for anything else."""
    if isinstance(node, ast.Name):
        return node.id
    return f"{dotted(node.value)}.{node.attr}" if isinstance(node, ast.Attribute) and dotted(node.value) else ""


def unknown_keywords(code: str) -> list[str]:
    """Each call in ``code`` to a taps_peft callable with a keyword its signature lacks (and no ``**kwargs``)."""
    tree = ast.parse(code)
    imported = {alias.asname or alias.name: getattr(MODULES[node.module], alias.name)
                for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module in MODULES
                for alias in node.names if hasattr(MODULES[node.module], alias.name)}
    problems = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        if isinstance(node.func, ast.Attribute) and dotted(node.func.value) in MODULES:
            target = getattr(MODULES[dotted(node.func.value)], node.func.attr, None)
        else:
            target = imported.get(node.func.id) if isinstance(node.func, ast.Name) else None
        if not callable(target):
            continue
        params = inspect.signature(target).parameters
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            continue
        problems += [f"line {node.lineno}: {target.__name__}() takes no {k.arg}=" for k in node.keywords
                     if k.arg and k.arg not in params]
    return problems


@pytest.mark.parametrize("code", python_blocks())
def test_doc_examples_pass_only_keywords_the_api_takes(code):
    assert unknown_keywords(code) == []


def test_the_check_finds_a_removed_keyword():
    code = ("import taps_peft\nfrom taps_peft.training import train_joint as tj\n"
            "tj(vit, tasks, taps_peft.TAPSConfig(lam=0.2, warmup_steps=5), steps=3, score_lr=1e-2)\n"
            "taps_peft.export_lora(model, 'out', rank=16, tolerance=0.1)\n")
    assert unknown_keywords(code) == ["line 3: train_joint() takes no score_lr=", "line 3: TAPSConfig() takes no "
                                      "warmup_steps="]


def trained(seed: int, steps: int = 3) -> torch.nn.Module:
    """A TAPS model on the tiny ViT of seed 0, a few steps into training on data of ``seed``."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_timm_vit(), taps_peft.TAPSConfig(total_step=steps))
    torch.manual_seed(seed)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 5, (8,))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        (F.cross_entropy(model(x), y) + model.taps_penalty()).backward()
        opt.step()
        opt.zero_grad()
    return model


@pytest.mark.filterwarnings("error::taps_peft.BaseModelMismatchWarning")
def test_readme_example_runs_as_written(tmp_path, monkeypatch, recwarn):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    names = {"vit": tiny_timm_vit(), "x": torch.randn(4, 3, 32, 32), "y": torch.randint(0, 5, (4,)), "torch": torch,
             "F": F}
    exec(block("README.md", "get_peft_model(vit"), names)
    assert not [w for w in recwarn if "lam_warmup" in str(w.message)]  # total_step given: lam's warm-up is known
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(tiny_timm_vit(), "my-task")  # "PeftModel.from_pretrained loads it"
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(names["x"]), names["model"].eval()(names["x"]), rtol=0, atol=0)


@pytest.mark.filterwarnings("error::taps_peft.BaseModelMismatchWarning")  # both adapters belong to this base
def test_adapters_many_tasks_and_lora_export_examples_run_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for seed, name in ((1, "flowers"), (2, "cars")):
        trained(seed).save_pretrained(f"runs/{name}")
    torch.manual_seed(0)
    base = tiny_timm_vit()  # the base both adapters were trained on
    images = torch.randn(4, 3, 32, 32)
    expected = {}
    with torch.no_grad():
        for name in ("flowers", "cars"):
            torch.manual_seed(0)
            expected[name] = PeftModel.from_pretrained(tiny_timm_vit(), f"runs/{name}").eval()(images)
        expected["__base__"] = base.eval()(images)
    names = {"base": base, "images": images, "PeftModel": PeftModel}
    exec(block("docs/adapters.md", 'model.load_adapter("runs/cars"'), names)
    for i, task in enumerate(["cars", "__base__", "flowers", "cars"]):  # each sample through its own task
        torch.testing.assert_close(names["logits"][i], expected[task][i], rtol=1e-4, atol=1e-5)
    assert "flowers" not in names["model"].peft_config  # deleted after the mixed batch

    torch.manual_seed(0)
    names = {"model": PeftModel.from_pretrained(tiny_timm_vit(), "runs/flowers"), "taps_peft": taps_peft,
             "val_images": images}
    with pytest.raises(ValueError, match="over tolerance=0.1.*Nothing was written"):  # rank 16 of 192: 0.22 here
        exec(block("docs/adapters.md", "taps_peft.export_lora(model"), names)
    assert json.loads((tmp_path / "runs/flowers-lora/adapter_config.json").read_text())["peft_type"] == "LORA"
    assert not (tmp_path / "runs/flowers-lora16").exists()
