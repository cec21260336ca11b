"""Scoring generated shape images: which colour, and on which side of the image.

A pixel belongs to the shape when its distance from white exceeds a threshold (the larger of an absolute floor
and a fraction of the image's strongest pixels, so faint blurry shapes still count and background noise does
not). Blending a colour with white keeps the direction of ``white - pixel``, so the colour is the reference
colour whose direction from white is closest (cosine) to the shape pixels' summed ``white - pixel``; this holds
for blurred edges, noise and washed-out VQ reconstructions. The side is the weighted centroid's x against the
image centre. No shape pixels: ``None`` for both.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .synthetic import COLORS

_REF_NAMES = list(COLORS)
_REF_DIRS = np.array([[255.0 - v for v in COLORS[n]] for n in _REF_NAMES])
_REF_DIRS /= np.linalg.norm(_REF_DIRS, axis=1, keepdims=True)


def _to_array(image: Any) -> np.ndarray:
    """PIL image / HWC or CHW array / torch tensor -> float (H, W, 3) in [0, 255]."""
    if hasattr(image, "convert") and hasattr(image, "size") and not isinstance(image, np.ndarray):
        image = image.convert("RGB")
    if hasattr(image, "detach"):  # torch tensor
        image = image.detach().float().cpu().numpy()
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim != 3:
        raise ValueError(f"expected an image of shape (H, W, 3) or (3, H, W), got shape {arr.shape}")
    if arr.shape[-1] not in (3, 4) and arr.shape[0] in (3, 4):
        arr = np.moveaxis(arr, 0, -1)
    arr = arr[..., :3]
    if np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
        if arr.min() < -1e-6:  # [-1, 1] (the VQ tokenizer's range)
            arr = (arr + 1.0) * 127.5
        elif arr.max() <= 1.0 + 1e-6:  # [0, 1]
            arr = arr * 255.0
    return np.clip(arr.astype(np.float64), 0.0, 255.0)


def analyze_shape_image(image: Any, threshold: float = 60.0, relative: float = 0.4, chroma: float = 45.0,
                        min_fraction: float = 0.01) -> dict[str, str | None]:
    """``{"color": str | None, "position": "left" | "right" | None}`` for a shape on white.

    ``threshold``: least distance from white (RGB Euclidean, 0-441) of a shape pixel; ``relative``: a pixel
    must also reach this fraction of the 99th-percentile distance; ``chroma``: least distance of a shape pixel
    from the grey axis (all four reference colours are far from it; white, grey noise and dark smudges are
    not); ``min_fraction``: fewer shape pixels than this fraction of the image (at least 2) means no shape.
    """
    arr = _to_array(image)
    h, w = arr.shape[:2]
    diff = 255.0 - arr  # >= 0; direction identifies the colour regardless of blending with white
    dist = np.linalg.norm(diff, axis=-1)
    strong = float(np.percentile(dist, 99))
    cut = max(threshold, relative * strong)
    grey_free = diff - diff.mean(axis=-1, keepdims=True)
    colourful = np.linalg.norm(grey_free, axis=-1)
    mask = (dist > cut) & (colourful > chroma)
    count = int(mask.sum())
    if count < max(2, int(min_fraction * h * w)):
        return {"color": None, "position": None}
    weights = dist[mask]
    total = diff[mask].sum(axis=0)  # sum of (white - pixel): dominated by the saturated core
    norm = np.linalg.norm(total)
    if norm == 0:
        return {"color": None, "position": None}
    color = _REF_NAMES[int(np.argmax(_REF_DIRS @ (total / norm)))]
    xs = np.nonzero(mask)[1].astype(np.float64) + 0.5  # pixel centres
    cx = float((xs * weights).sum() / weights.sum())
    position = "left" if cx < w / 2 else "right"
    return {"color": color, "position": position}


def score_t2i(images: Sequence[Any], metas: Sequence[dict]) -> dict[str, float]:
    """Fractions of images whose colour, position, and both match ``metas``.

    ``metas`` holds meta dicts with "color" and "position", or whole samples carrying such a "meta".
    Returns ``color_acc``, ``position_acc``, ``both_acc`` and ``detected`` (fraction with a shape found).
    """
    if len(images) != len(metas):
        raise ValueError(f"score_t2i: {len(images)} images but {len(metas)} metas")
    if not images:
        return {"color_acc": 0.0, "position_acc": 0.0, "both_acc": 0.0, "detected": 0.0}
    color_ok = position_ok = both = found = 0
    for image, meta in zip(images, metas):
        if "meta" in meta and isinstance(meta["meta"], dict):
            meta = meta["meta"]
        got = analyze_shape_image(image)
        c = got["color"] is not None and got["color"] == meta.get("color")
        p = got["position"] is not None and got["position"] == meta.get("position")
        color_ok += c
        position_ok += p
        both += c and p
        found += got["color"] is not None
    n = float(len(images))
    return {"color_acc": color_ok / n, "position_acc": position_ok / n, "both_acc": both / n, "detected": found / n}
