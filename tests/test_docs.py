"""The documentation's Python examples call taps_peft as it is: every ```python block of README.md and docs/*.md
parses, and every keyword it passes to a taps_peft function or class (``taps_peft.X(...)``, or ``X(...)`` after
``from taps_peft... import X``) is one that callable takes (a renamed or removed argument fails here, not in a
user's hands)."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

import taps_peft
import taps_peft.training

ROOT = Path(__file__).resolve().parents[1]
MODULES = {"taps_peft": taps_peft, "taps_peft.training": taps_peft.training}


def python_blocks() -> list:
    return [pytest.param(code, id=f"{doc.name}#{i}")
            for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
            for i, code in enumerate(re.findall(r"```python\n(.*?)```", doc.read_text(), re.S))]


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
