"""How well a model's frozen image encoder separates shape, colour and side on combinations it never saw.

For each saved model directory: encode synthetic-shapes images (training combinations and the held-out ones),
fit a linear classifier per attribute on the training combinations' patch features (all patches, flattened,
standardised), and print its accuracy on both. On the quick start, a model's held-out MMU accuracy on "What shape
is it?" follows this probe's held-out shape accuracy, so an encoder stage can be screened in seconds without the
stages after it (train only the encoder: `omni recipe run quickstart --run-dir DIR '~stages.4' '~stages.3'
'~stages.2' '~stages.1' '~evaluation'`).

Run: python benchmarks/probe_encoder.py MODEL_DIR [MODEL_DIR ...] [--train 3000 --heldout 512]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import omnicore

ATTRIBUTES = ("shape", "color", "position")


@torch.no_grad()
def features(encoder, split: str, n: int, seed: int) -> tuple[torch.Tensor, dict[str, list[str]]]:
    data = omnicore.create("dataset", "synthetic_shapes", task="t2i", split=split, size=n, image_size=encoder.image_size,
                           seed=seed)
    transform = encoder.image_transform()
    pixels, labels = [], {a: [] for a in ATTRIBUTES}
    for i in range(n):
        sample = data[i]
        pixels.append(transform(sample["image"]))
        for a in ATTRIBUTES:
            labels[a].append(sample["meta"][a])
    feats = torch.cat([encoder(torch.stack(pixels[i:i + 256])) for i in range(0, n, 256)])
    return feats.flatten(1), labels


def probe(train_x: torch.Tensor, train_y: torch.Tensor, classes: int, steps: int = 300) -> torch.nn.Linear:
    torch.manual_seed(0)  # the same classifier start for every model
    linear = torch.nn.Linear(train_x.shape[1], classes)
    opt = torch.optim.AdamW(linear.parameters(), lr=1e-2, weight_decay=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(linear(train_x), train_y).backward()
        opt.step()
    return linear


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="model directories (omnicore.load)")
    ap.add_argument("--train", type=int, default=3000, help="training-combination images to fit on")
    ap.add_argument("--heldout", type=int, default=512, help="held-out-combination images to score")
    args = ap.parse_args()
    for directory in args.models:
        model = omnicore.load(directory)
        model = getattr(model, "model", model)
        if model.encoder is None:
            raise SystemExit(f"{directory}: the model has no image encoder")
        encoder = model.encoder.eval()
        train_x, train_labels = features(encoder, "train", args.train, seed=5)
        test_x, test_labels = features(encoder, "heldout", args.heldout, seed=6)
        mean, std = train_x.mean(0), train_x.std(0) + 1e-5
        train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
        scores = []
        for a in ATTRIBUTES:
            names = sorted(set(train_labels[a]))
            y_train = torch.tensor([names.index(v) for v in train_labels[a]])
            y_test = torch.tensor([names.index(v) for v in test_labels[a]])
            linear = probe(train_x, y_train, len(names))
            with torch.no_grad():
                fit = (linear(train_x).argmax(1) == y_train).float().mean().item()
                held = (linear(test_x).argmax(1) == y_test).float().mean().item()
            scores.append(f"{a} {fit:.3f} / {held:.3f}")
        print(f"{directory}: (training / held-out combinations) " + ", ".join(scores), flush=True)


if __name__ == "__main__":
    main()
