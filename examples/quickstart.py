"""Quickstart: TAPS-adapt a small ViT to a new task, offline, in about a minute on a laptop CPU.

1. "Pretrain" a tiny timm ViT on digits 0-4 (scikit-learn's bundled 8x8 digits; nothing is downloaded).
2. Adapt it with TAPS to digits 5-9: only layers whose score stays >= tau become task-specific.
3. Print accuracy, active layers k/L and the adapter size, then save the adapter.

    python examples/quickstart.py [--lam 0.5] [--out runs/quickstart]
"""

import argparse

import timm
import torch
import torch.nn.functional as F
from peft import get_peft_model
from sklearn.datasets import load_digits

import taps_peft


def digits(labels: range, train: bool):
    x, y = load_digits(return_X_y=True)
    keep = torch.isin(torch.as_tensor(y), torch.tensor(list(labels)))
    x = torch.as_tensor(x, dtype=torch.float32)[keep].reshape(-1, 1, 8, 8).repeat(1, 3, 1, 1) / 16.0
    x = (x - 0.3) / 0.4  # roughly zero mean, unit variance
    y = torch.as_tensor(y)[keep] - labels.start
    split = int(0.8 * len(y))
    return (x[:split], y[:split]) if train else (x[split:], y[split:])


def fit(model, data, optimizer, epochs, penalty=None, batch=64):
    x, y = data
    step = 0
    for _ in range(epochs):
        model.train()
        for i in torch.randperm(len(y)).split(batch):
            loss = F.cross_entropy(model(x[i]), y[i])
            if penalty is not None:
                loss = loss + penalty(step)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
    return loss.item()


@torch.no_grad()
def accuracy(model, data):
    model.eval()
    x, y = data
    return (model(x).argmax(-1) == y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lam", type=float, default=0.2)
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--out", default="runs/quickstart")
    args = parser.parse_args()
    torch.manual_seed(0)

    base = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=8, patch_size=2, embed_dim=64,
        depth=4, num_heads=4, global_pool="avg",
    )
    fit(base, digits(range(0, 5), True), torch.optim.AdamW(base.parameters(), lr=1e-3), args.epochs)
    print(f"base model, digits 0-4: accuracy {accuracy(base, digits(range(0, 5), False)):.3f}")

    base.reset_classifier(5)  # a fresh head for the new task
    model = get_peft_model(base, taps_peft.TAPSConfig(lam=args.lam))
    optimizer = taps_peft.create_taps_optimizer(model, torch.optim.AdamW, lr=1e-3, score_lr=1e-2)
    fit(model, digits(range(5, 10), True), optimizer, args.epochs, penalty=model.taps_penalty)
    print(f"TAPS adapter, digits 5-9: accuracy {accuracy(model, digits(range(5, 10), False)):.3f}")
    model.print_taps_summary(show_layers=True)
    model.save_pretrained(args.out)
    print(f"adapter saved to {args.out}")


if __name__ == "__main__":
    main()
