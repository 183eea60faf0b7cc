"""What ``taps-peft train`` trains on: the model (timm or transformers, pretrained, local weights or random) and the
images (a Hub dataset or an image folder), built from its arguments.

Example:
    >>> model, is_hf, size, mean, std = load_model(args, num_classes=10, labels=names)  # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from .args import TrainArgs

_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def load_model(args: TrainArgs, num_classes: int, labels: list[str]):
    """(model, is_transformers, image_size, mean, std) for ``args.model``."""
    source, _, name = args.model.partition(":") if ":" in args.model else ("", "", args.model)
    if source not in ("", "timm", "hf"):
        raise ValueError(f"--model {args.model!r}: use timm:NAME, hf:NAME or a bare name.")
    if source == "timm" or (source == "" and timm_knows(name)):
        timm = require("timm", "timm")

        kwargs = dict(args.model_kwargs)
        download = args.pretrained and not args.weights
        if download:
            pcfg = timm.models.get_pretrained_cfg(name)
            check_download(args.model, getattr(pcfg, "hf_hub_id", None), getattr(pcfg, "url", None),
                            ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"),
                            "--weights PATH (a local weights file)")
        model = timm.create_model(name, pretrained=download, num_classes=num_classes, **kwargs)
        if args.weights:
            from .weights import load_weights

            load_weights(model, args.weights)
        cfg = timm.data.resolve_model_data_config(model)
        size = kwargs.get("img_size") or getattr(getattr(model, "patch_embed", None), "img_size", None)
        size = size or cfg["input_size"][1:]
        return model, False, pair(size), cfg["mean"], cfg["std"]

    if args.weights:
        raise ValueError(f"--weights {args.weights}: for a transformers model, pass its local folder as --model hf:PATH.")
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    label_kwargs = dict(num_labels=num_classes, id2label=dict(enumerate(labels)),
                        label2id={n: i for i, n in enumerate(labels)})
    if args.pretrained:
        if not os.path.isdir(name):
            check_download(args.model, name, None, ("config.json",), "a local folder as --model hf:PATH")
        model = AutoModelForImageClassification.from_pretrained(
            name, ignore_mismatched_sizes=True, **label_kwargs, **args.model_kwargs)
    else:
        if name in CONFIG_MAPPING and not os.path.isdir(name):
            config = AutoConfig.for_model(name, **label_kwargs, **args.model_kwargs)
        else:
            config = AutoConfig.from_pretrained(name, **label_kwargs, **args.model_kwargs)
        model = AutoModelForImageClassification.from_config(config)
    mean, std = _IMAGENET_MEAN, _IMAGENET_STD
    try:
        processor = AutoImageProcessor.from_pretrained(name)
        mean, std = processor.image_mean, processor.image_std
    except Exception:  # no processor (a bare config or model type): ImageNet statistics
        pass
    return model, True, pair(getattr(model.config, "image_size", 224)), mean, std


def check_download(model: str, repo_id: Optional[str], url: Optional[str], files: tuple[str, ...], local: str) -> None:
    """Fail in a second, with the way out, when pretrained weights are not cached and cannot be downloaded (offline
    mode, or no route to the Hub): the download itself would retry for about a minute and end in a traceback."""
    from urllib.parse import urlsplit

    from huggingface_hub import constants, try_to_load_from_cache

    if repo_id and any(isinstance(try_to_load_from_cache(repo_id, f), str) for f in files):
        return
    where = constants.ENDPOINT if repo_id else url
    if not where:
        return
    problem = "HF_HUB_OFFLINE is set" if repo_id and constants.HF_HUB_OFFLINE else None
    if problem is None:
        import socket

        parts = urlsplit(where)
        try:
            socket.create_connection((parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)),
                                     timeout=5).close()
            return
        except OSError as err:
            problem = f"{parts.hostname} cannot be reached ({err})"
    raise ValueError(
        f"--model {model}: its pretrained weights are not in the local cache and must be downloaded, but {problem}. "
        f"Pass {local} or --no-pretrained (random weights), or run once where the Hub is reachable to fill the cache."
    )


def timm_knows(name: str) -> bool:
    try:
        import timm
    except ImportError:
        return False
    return timm.is_model(name)


def pair(size: Any) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, (int, float)) else (int(size[0]), int(size[1]))


def require(module: str, extra: str) -> Any:
    """Import ``module`` or say which install brings it (the minimal install has neither datasets nor timm)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(
            f"taps-peft train needs `{module}`, which the minimal install lacks: pip install 'taps_peft[{extra}]' "
            f"(or pip install {module})."
        ) from None


def load_data(args: TrainArgs):
    """(train dataset, eval dataset or None, image column, label column, label names)."""
    datasets = require("datasets", "hub")

    name = args.dataset
    if name.startswith("imagefolder:"):
        folder = name.split(":", 1)[1]
        check_image_folder(folder)
        ds = datasets.load_dataset("imagefolder", data_dir=folder, cache_dir=args.cache_dir)
    elif os.path.isdir(name) and any(Path(name).glob("dataset_dict.json")):
        ds = datasets.load_from_disk(name)
    else:
        ds = datasets.load_dataset(name, args.dataset_config, cache_dir=args.cache_dir)
    if args.train_split not in ds:
        raise ValueError(f"--train-split {args.train_split!r} not in the dataset's splits {list(ds)}.")
    train_ds = ds[args.train_split]
    eval_name = args.eval_split
    if eval_name == "auto":
        eval_name = next((s for s in ("validation", "valid", "val", "test") if s in ds), None)
    elif eval_name in ("none", "", None):
        eval_name = None
    elif eval_name not in ds:
        raise ValueError(f"--eval-split {eval_name!r} not in the dataset's splits {list(ds)}.")
    eval_ds = ds[eval_name] if eval_name else None
    if args.max_train_samples:
        train_ds = train_ds.select(range(min(args.max_train_samples, len(train_ds))))

    features = train_ds.features
    image_col = args.image_column or next(
        (c for c, f in features.items() if isinstance(f, datasets.Image)),
        next((c for c in ("image", "img") if c in features), None))
    label_col = args.label_column or next(
        (c for c, f in features.items() if isinstance(f, datasets.ClassLabel)),
        next((c for c in ("label", "labels", "fine_label") if c in features), None))
    folder = name.split(":", 1)[1] if name.startswith("imagefolder:") else None
    if folder is not None and label_col is None:  # imagefolder gives labels only for two class subfolders or more
        raise ValueError(_single_class(folder, "its images are not in class subfolders, or all in one"))
    if image_col is None or label_col is None:
        raise ValueError(f"Cannot tell the image/label columns among {list(features)}: pass --image-column and "
                         "--label-column.")
    feature = features[label_col]
    if isinstance(feature, datasets.ClassLabel):
        labels = list(feature.names)
    else:
        labels = [str(i) for i in range(int(max(train_ds[label_col])) + 1)]
    if len(labels) < 2:
        raise ValueError(_single_class(folder or name, f"it has a single class {labels}"))
    # decoded by us (image_file), so that a damaged image is reported with its file name
    train_ds = train_ds.cast_column(image_col, datasets.Image(decode=False))
    eval_ds = eval_ds.cast_column(image_col, datasets.Image(decode=False)) if eval_ds is not None else None
    return train_ds, eval_ds, image_col, label_col, labels


def _single_class(where: str, why: str) -> str:
    return (f"--dataset {where}: {why}, and a classifier needs at least two classes. Put each class's images in a "
            "subfolder of its own (PATH/<class>/<image>, or PATH/train/<class>/<image> with a test split beside it).")


_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def check_image_folder(folder: str) -> None:
    """Fail with the fix when an image folder does not exist or holds no image."""
    path = Path(folder)
    if not path.is_dir():
        raise ValueError(f"--dataset imagefolder:{folder}: no such folder.")
    if not any(p.suffix.lower() in _IMAGE_SUFFIXES for p in path.rglob("*") if p.is_file()):
        raise ValueError(
            f"--dataset imagefolder:{folder}: the folder holds no image ({', '.join(sorted(_IMAGE_SUFFIXES))}). "
            "Lay it out as PATH/<class>/<image> (or PATH/train/<class>/<image> and PATH/test/<class>/<image>)."
        )


def image_file(value: Any) -> Any:
    """An RGB PIL image from a ``datasets`` image value (``{"path", "bytes"}`` or a PIL image): 16-bit and float images
    are scaled to 8 bits (PIL's own ``convert("RGB")`` saturates them to white), palette, alpha and CMYK images are
    converted. A file that cannot be decoded stops training with a ``ValueError`` naming it (a damaged image is a
    dataset to fix, not one to train on silently)."""
    import io

    import numpy as np
    from PIL import Image, UnidentifiedImageError

    if isinstance(value, dict):
        where = value.get("path") or "an image given as bytes"
        try:
            image = Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"])
            image.load()
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
            raise ValueError(f"cannot read the image {where} ({type(err).__name__}: {err}): fix or remove the "
                             "file.") from None
    else:
        image = value
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
        if image.mode == "F" and array.max(initial=0) <= 1.0:
            top = 1.0
        image = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    return image.convert("RGB")


def with_transform(ds, image_col: str, label_col: str, size: tuple[int, int], mean, std):
    from torchvision import transforms

    tf = transforms.Compose([transforms.Resize(size), transforms.ToTensor(), transforms.Normalize(mean, std)])

    def apply(batch: dict[str, list]) -> dict[str, list]:
        return {"pixel_values": [tf(image_file(im)) for im in batch[image_col]], "labels": batch[label_col]}

    return ds.with_transform(apply)


class EpochOrder:
    """Data order seeded by (seed, epoch), the same on every rank and for any number of processes.

    Deliberately without ``set_epoch``, so Accelerate's dataloader wrappers leave the epoch to the training loop.
    """

    def __init__(self, n: int, seed: int, shuffle: bool) -> None:
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        import torch

        if not self.shuffle:
            return iter(range(self.n))
        return iter(torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist())
