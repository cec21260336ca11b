"""Are the image codes a held-out caption needs ever seen in training, at the grid positions where it needs them?

Tokenizes rendered shapes of every (colour, shape, side) with a trained model's image tokenizer and, for each
held-out combination, counts its shape-covering patches whose code (and whose (position, code) pair, also with the
same colour) occurs in the training combinations. High fractions mean the generator's vocabulary is not what
stops composition: the codes are there, only the model must choose them.

Run: python benchmarks/code_sharing.py MODEL_DIR [--images 64] [--coverage 0.1]
"""

from __future__ import annotations

import argparse
import random
from collections import Counter, defaultdict

import numpy as np
import torch

import omnicore
from omnicore.plugins.datasets.synthetic import ALL_COMBOS, HELDOUT, render


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a model directory (a run's model/)")
    ap.add_argument("--images", type=int, default=64, help="rendered images per combination")
    ap.add_argument("--coverage", type=float, default=0.1, help="least fraction of shape pixels in a counted patch")
    args = ap.parse_args()
    model = omnicore.load(args.model)
    size = model.image_size
    occurrences: dict[tuple, Counter] = defaultdict(Counter)  # combination -> (position, code) of covered patches
    for combo in ALL_COMBOS:
        pixels = np.stack([np.array(render(*combo, size, random.Random(i))) for i in range(args.images)])
        with torch.no_grad():
            codes = model.image_tokenizer.encode(torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1)
        h, w = codes.shape[1:]
        patch = size // w
        covered = (255.0 - pixels.astype(np.float64)).sum(-1) > 60  # shape pixels
        for image_covered, image_codes in zip(covered, codes):
            for r in range(h):
                for c in range(w):
                    if image_covered[r * patch:(r + 1) * patch, c * patch:(c + 1) * patch].mean() >= args.coverage:
                        occurrences[combo][(r * w + c, int(image_codes[r, c]))] += 1
    train = [c for c in ALL_COMBOS if c not in HELDOUT]
    pairs = set().union(*(occurrences[c] for c in train))
    codes_seen = {code for _, code in pairs}
    print(f"grid {h}x{w}; patches covered >= {args.coverage:.0%} by the shape; fractions of a held-out "
          f"combination's patches")
    print(f"{'held out':28s} {'patches':>7s} {'code seen':>9s} {'(pos, code) seen':>16s} {'same colour':>11s}")
    for combo in HELDOUT:
        same_colour = set().union(*(occurrences[c] for c in train if c[0] == combo[0]))
        counts = occurrences[combo]
        total = sum(counts.values())

        def share(keep) -> float:
            return sum(n for key, n in counts.items() if keep(key)) / total

        print(f"{' '.join(combo):28s} {total:7d} {share(lambda k: k[1] in codes_seen):9.2f} "
              f"{share(lambda k: k in pairs):16.2f} {share(lambda k: k in same_colour):11.2f}")


if __name__ == "__main__":
    main()
