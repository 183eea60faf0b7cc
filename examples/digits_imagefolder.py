"""Write scikit-learn's handwritten digits (bundled, offline) as an image folder for ``taps-peft train``.

``OUT/train/<digit>/<i>.png`` and ``OUT/test/<digit>/<i>.png``: 1797 8x8 grey images, a seeded 80/20 split. The CLI's
digits recipe trains on it (docs/training.md):

    python examples/digits_imagefolder.py runs/digits
    W=$(python -c "from taps_peft.training import efficientnet_lite0_weights as w; print(w())")
    taps-peft train --model timm:tf_efficientnet_lite0 --weights $W --dataset imagefolder:runs/digits \\
        --image-size 64 --max-steps 60 --output-dir runs/digits-taps            # add --r 8 for low-rank deltas
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def write_digits(out: Path, seed: int = 0, test_fraction: float = 0.2) -> Path:
    """The digits as PNG files under ``out/{train,test}/<digit>/`` (nothing is written twice)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    test = np.random.default_rng(seed).random(len(y)) < test_fraction
    for i, (pixels, label) in enumerate(zip(x, y)):
        folder = out / ("test" if test[i] else "train") / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray((pixels.reshape(8, 8) * (255 / 16)).astype("uint8"), mode="L")
        image.save(folder / f"{i}.png")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="folder to write (train/ and test/ go inside)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    write_digits(args.out, args.seed)
    print(f"wrote {sum(1 for _ in args.out.rglob('*.png'))} images to {args.out}")


if __name__ == "__main__":
    main()
