"""Model cards for TAPS adapters.

The card (README.md) says which base model the adapter belongs to, lam/tau, the active layers k/L, the adapter size,
a layer map (score and gate per layer) and that ``import taps_peft`` is needed to load it. Its TAPS part sits between
two HTML comments, so later saves refresh it and keep anything a user wrote around it. ``save_pretrained`` and
``push_to_hub`` write it (see ``taps_peft.hub.peft_model``).

Example:
    >>> from taps_peft.hub.card import build_model_card
    >>> print(build_model_card(model))  # doctest: +SKIP
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from torch import nn


BEGIN, END = "<!-- taps_peft:card:begin -->", "<!-- taps_peft:card:end -->"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_PAPER = "https://arxiv.org/abs/2203.16708"


@dataclass
class BaseModelInfo:
    """What the card says about the base model."""

    name: str  # shown in the card
    hub_id: Optional[str]  # for the `base_model` metadata (a Hub repo id), else None
    library: str  # "timm", "transformers" or "torch" (also a tag)
    load: str  # Python that builds the base model
    detail: str = ""  # shown after the library, e.g. the transformers model_type


def describe_base_model(model: nn.Module, adapter_name: Optional[str] = None) -> BaseModelInfo:
    """Identify the base model of a PeftModel: timm ``pretrained_cfg``, transformers ``config`` or the class name."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = _peft_config(model, adapter_name)
    saved_name = getattr(config, "base_model_name_or_path", None) or None
    pcfg = getattr(base, "pretrained_cfg", None)
    if isinstance(pcfg, dict) and type(base).__module__.startswith("timm.") and pcfg.get("architecture"):
        arch = pcfg["architecture"] + (f".{pcfg['tag']}" if pcfg.get("tag") else "")
        hub_id = saved_name or pcfg.get("hf_hub_id") or None
        classes = f", num_classes={base.num_classes}" if isinstance(getattr(base, "num_classes", None), int) else ""
        load = f'import timm\nbase = timm.create_model("{arch}", pretrained=True{classes})'
        return BaseModelInfo(arch, _hub_id(hub_id), "timm", load)
    hf_config = getattr(base, "config", None)
    if hasattr(hf_config, "model_type") and hasattr(hf_config, "to_dict"):
        cls = type(base).__name__
        name = saved_name or getattr(hf_config, "_name_or_path", "") or None
        if name:
            load = f'from transformers import {cls}\nbase = {cls}.from_pretrained("{name}")'
        else:
            load = f"from transformers import {cls}\nbase = {cls}(config)  # the base model's {type(hf_config).__name__}"
        detail = f", model_type `{hf_config.model_type}`"
        return BaseModelInfo(name or cls, _hub_id(name), "transformers", load, detail)
    name = saved_name or type(base).__name__
    return BaseModelInfo(name, _hub_id(saved_name), "torch", f"base = ...  # a {type(base).__name__}, as trained on")


def build_card_section(model: nn.Module, adapter_name: Optional[str] = None, repo_id: Optional[str] = None) -> str:
    """The TAPS part of the card (markdown between the two markers) for one adapter of a TAPS PeftModel."""
    summary = model.taps_summary(adapter_name)
    adapter = summary["adapter"]
    rows = model.taps_layer_report(adapter)
    config = _peft_config(model, adapter)
    info = describe_base_model(model, adapter)
    k, n = summary["active_layers"], summary["total_layers"]
    lam, tau = getattr(config, "lam", None), getattr(config, "tau", None)
    where = repo_id or "path/to/this/adapter"
    subfolder = "" if adapter == "default" else f', subfolder="{adapter}"'
    table = "\n".join(
        f"| `{r['name']}` | {r['score']:.4f} | {'yes' if r['active'] else 'no'} | {r['params']:,} |" for r in rows
    )
    versions = "\n".join(f"- {lib} {ver}" for lib, ver in _versions().items())
    return f"""{BEGIN}
# TAPS adapter for `{info.name}`

A [TAPS]({_PAPER}) (Task Adaptive Parameter Sharing) adapter made with `taps_peft` and 🤗 PEFT. Only the layers whose
gate is open carry a task-specific weight delta; every other layer is shared with the base model unchanged.

| | |
|---|---|
| Base model | `{info.name}` ({info.library}{info.detail}){f", [{info.hub_id}](https://huggingface.co/{info.hub_id})" if info.hub_id else ""} |
| Adapter | `{adapter}` |
| lam (sparsity weight) | {lam} |
| tau (gate threshold) | {tau} |
| Active layers (k/L) | {k}/{n} ({100.0 * k / max(n, 1):.1f}%) |
| Task-specific parameters | {summary['task_specific_params']:,} ({summary['task_specific_percent']:.2f}% of {summary['base_params']:,}) |
| Adapter size | {_size(summary['adapter_bytes'])} |

## How to load

`import taps_peft` is needed before loading: it registers TAPS with PEFT (otherwise PEFT fails with `KeyError: 'TAPS'`).

```python
import taps_peft  # registers TAPS with PEFT
from peft import PeftModel

{info.load}
model = PeftModel.from_pretrained(base, "{where}"{subfolder})
```

## Layer map

Gated layers of the base model: `active` layers use `W_base + dW` (their delta is in this adapter), the others
use `W_base` unchanged. A layer is active while its score is >= tau.

| layer | score | active | params |
|---|---:|:---:|---:|
{table}

### Framework versions

{versions}
{END}
"""


def build_model_card(model: nn.Module, adapter_name: Optional[str] = None, repo_id: Optional[str] = None) -> str:
    """The whole README.md (YAML front matter and TAPS section) for a TAPS adapter."""
    return _merge_card("", model, adapter_name, repo_id)


def save_model_card(
    model: nn.Module,
    directory: str | os.PathLike,
    adapter_name: Optional[str] = None,
    repo_id: Optional[str] = None,
    tags: Optional[list[str]] = None,
) -> Path:
    """Write or refresh ``directory/README.md``: keep its metadata and prose, (re)place the TAPS section."""
    path = Path(directory) / "README.md"
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_merge_card(old, model, adapter_name, repo_id, tags), encoding="utf-8")
    return path


# ----- helpers -----


def _merge_card(
    old: str, model: nn.Module, adapter_name: Optional[str], repo_id: Optional[str], tags: Optional[list[str]] = None
) -> str:
    from huggingface_hub import ModelCard

    card = ModelCard(old if old.lstrip().startswith("---") else "---\n{}\n---\n" + old)
    info = describe_base_model(model, adapter_name)
    section = build_card_section(model, adapter_name, repo_id)
    body = card.text
    if BEGIN in body and END in body:
        body = body[: body.index(BEGIN)] + section.strip() + body[body.index(END) + len(END) :]
    elif not body.strip() or "[More Information Needed]" in body:  # empty, or an untouched template
        body = section
    else:
        body = body.rstrip() + "\n\n" + section
    card.text = body
    data = card.data
    data["library_name"] = "peft"
    if info.hub_id:
        data["base_model"] = info.hub_id
    elif not data.get("base_model"):
        data.pop("base_model", None)
    extra = ["taps", "peft", info.library] + (tags or [])
    if info.hub_id:
        extra.append(f"base_model:adapter:{info.hub_id}")
    kept = [t for t in (data.get("tags") or []) if not str(t).endswith("base_model:adapter:")]
    data["tags"] = list(dict.fromkeys(kept + extra))
    return str(card)


def _peft_config(model: nn.Module, adapter_name: Optional[str]) -> Any:
    configs = getattr(model, "peft_config", None) or {}
    if adapter_name is None:
        active = getattr(model, "active_adapters", None) or list(configs)[:1]
        adapter_name = active[0] if active else None
    return configs.get(adapter_name)


def _hub_id(name: Optional[str]) -> Optional[str]:
    """``name`` if it looks like a Hub repo id (not a local path), else None."""
    if not name or not _HUB_ID.match(name) or os.path.exists(name):
        return None
    return name


def _size(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _versions() -> dict[str, str]:
    import peft
    import torch

    from .. import __version__

    return {"PEFT": peft.__version__, "taps_peft": __version__, "torch": torch.__version__.split("+")[0]}
