"""``synthetic_shapes``: one coloured shape on a white background, generated on the fly.

Sample ``i`` depends only on ``(seed, split, i)``. A fixed set of (colour, shape, position) triples,
``HELDOUT``, never appears in ``split="train"`` and is all that ``split="heldout"`` contains, so evaluation
measures composition: every colour, shape and position, and every pair of them, is still seen in training.
"""

from __future__ import annotations

import random
from typing import Literal, Sequence

from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from omnicore.errors import ParamError

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 200, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 220, 0),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
POSITIONS: tuple[str, ...] = ("left", "right")
BACKGROUND = (255, 255, 255)

ALL_COMBOS: tuple[tuple[str, str, str], ...] = tuple(
    (c, s, p) for c in COLORS for s in SHAPES for p in POSITIONS)
# Distinct (colour, shape) pairs, so each pair of attributes still appears in training with the other value.
HELDOUT: tuple[tuple[str, str, str], ...] = (
    ("red", "circle", "right"),
    ("green", "square", "left"),
    ("blue", "triangle", "right"),
    ("yellow", "circle", "left"),
)
TRAIN_COMBOS: tuple[tuple[str, str, str], ...] = tuple(c for c in ALL_COMBOS if c not in HELDOUT)
SPLITS: dict[str, tuple[tuple[str, str, str], ...]] = {"train": TRAIN_COMBOS, "heldout": HELDOUT}

QUESTIONS: dict[str, str] = {
    "color": "What color is the shape?",
    "shape": "What shape is it?",
    "position": "Is the shape on the left or the right?",
}


def caption_for(color: str | None, shape: str | None, position: str | None) -> str:
    """The caption naming the given attributes; ``None`` leaves one unnamed ("a green shape on the left")."""
    text = " ".join(w for w in ("a", color, shape or "shape") if w)
    return text + (f" on the {position}" if position else "")


# The attributes a partial caption names: every non-empty proper subset of (colour, shape, position).
PARTIAL_SUBSETS: tuple[tuple[bool, bool, bool], ...] = tuple(
    (c, s, p) for c in (True, False) for s in (True, False) for p in (True, False) if 0 < c + s + p < 3)
# Component prompts for composable guidance: captions naming one attribute, or two, of the caption's
COMPONENT_SUBSETS: dict[str, tuple[tuple[bool, bool, bool], ...]] = {
    "singles": ((True, False, False), (False, True, False), (False, False, True)),
    "pairs": ((True, True, False), (True, False, True), (False, True, True)),
    # the colour alone: shape and side components carry the colours training showed with them (README)
    "color": ((True, False, False),),
}


def components_for(attrs: tuple[str, str, str], named: tuple[bool, bool, bool] = (True, True, True),
                   kind: str = "color") -> list[str | None]:
    """The component prompts of the caption naming ``named`` of ``attrs`` (singles: "a blue shape", "a triangle",
    "a shape on the right" for "a blue triangle on the right"); the same number for every caption, ``None`` (the
    unconditional prompt, which adds nothing) where the caption does not name a component's attributes."""
    return [caption_for(*(a if keep else None for a, keep in zip(attrs, sub)))
            if all(n for n, keep in zip(named, sub) if keep) else None
            for sub in COMPONENT_SUBSETS[kind]]


def _as_rng(rng: random.Random | int | None) -> random.Random | None:
    if rng is None or isinstance(rng, random.Random):
        return rng
    return random.Random(rng)


def render(color: str, shape: str, position: str, image_size: int = 32,
           rng: random.Random | int | None = None) -> Image.Image:
    """Draw one shape on white, fully inside the left or right half. ``rng=None``: no jitter.

    The shape's side is 55-80% of the half width (65% without jitter); its centre is jittered by at most
    15% of the half width around the half's centre (clipped so it stays inside the half, 1 px margin).
    """
    if color not in COLORS:
        raise ValueError(f"unknown color {color!r}; choose from {', '.join(COLORS)}")
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
    if position not in POSITIONS:
        raise ValueError(f"unknown position {position!r}; choose from {', '.join(POSITIONS)}")
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8, got {image_size}")
    rng = _as_rng(rng)
    S = int(image_size)
    half = S // 2
    lo, hi = (0, half) if position == "left" else (S - half, S)  # [lo, hi) columns of the half
    margin = 1
    room = half - 2 * margin  # largest side that fits
    frac = rng.uniform(0.55, 0.8) if rng else 0.65
    d = max(3, min(room, int(round(frac * half))))
    jitter = 0.15 * half

    def place(start: int, end: int) -> int:  # top-left coordinate in [start+margin, end-margin-d]
        first, last = start + margin, end - margin - d
        centre = (start + end) / 2 - d / 2
        if rng:
            centre += rng.uniform(-jitter, jitter)
        return int(min(max(round(centre), first), last))

    x0, y0 = place(lo, hi), place(0, S)
    x1, y1 = x0 + d - 1, y0 + d - 1  # PIL boxes include the end pixel
    image = Image.new("RGB", (S, S), BACKGROUND)
    draw = ImageDraw.Draw(image)
    fill = COLORS[color]
    if shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    elif shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=fill)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
    return image


class SyntheticShapes(Dataset):
    """One coloured shape on white: MMU questions about it, or its caption for T2I."""

    def __init__(self, task: str, size: int, split: str = "train", image_size: int = 32, seed: int = 0,
                 questions_per_sample: int = 1, partial_captions: float = 0.0, components: str = "color") -> None:
        if task not in ("mmu", "t2i"):
            raise ParamError(f"synthetic_shapes: task must be 'mmu' or 't2i', got {task!r}")
        if split not in SPLITS:
            raise ParamError(f"synthetic_shapes: split must be one of {', '.join(SPLITS)}, got {split!r}")
        if int(size) < 1:
            raise ParamError(f"synthetic_shapes: size must be at least 1, got {size}")
        if int(image_size) < 8:
            raise ParamError(f"synthetic_shapes: image_size must be at least 8, got {image_size}")
        if questions_per_sample not in (1, 2, 3):
            raise ParamError(f"synthetic_shapes: questions_per_sample must be 1, 2 or 3, got {questions_per_sample!r}")
        if not 0.0 <= float(partial_captions) <= 1.0:
            raise ParamError(f"synthetic_shapes: partial_captions must be a probability in [0, 1], got {partial_captions!r}")
        if partial_captions and task != "t2i":
            raise ParamError("synthetic_shapes: partial_captions applies to task 't2i' only")
        if components not in COMPONENT_SUBSETS:
            raise ParamError(f"synthetic_shapes: components must be one of {', '.join(COMPONENT_SUBSETS)}, "
                             f"got {components!r}")
        self.components = components
        self.task, self.split, self.size = task, split, int(size)
        self.image_size, self.seed, self.questions_per_sample = int(image_size), int(seed), int(questions_per_sample)
        self.partial_captions = float(partial_captions)
        self.combos = SPLITS[split]

    def __len__(self) -> int:
        return self.size

    def _rng(self, index: int) -> random.Random:
        # str seeds are hashed with SHA-512: stable across processes and PYTHONHASHSEED
        return random.Random(f"synthetic_shapes/{self.seed}/{self.split}/{index}")

    def attributes(self, index: int) -> tuple[str, str, str]:
        """(colour, shape, position) of sample ``index`` without rendering it."""
        return self._rng(self._check_index(index)).choice(self.combos)

    def _check_index(self, index: int) -> int:
        index = int(index)
        if index < 0:
            index += self.size
        if not 0 <= index < self.size:
            raise IndexError(f"synthetic_shapes: index {index} out of range for size {self.size}")
        return index

    def __getitem__(self, index: int) -> dict:
        index = self._check_index(index)
        rng = self._rng(index)
        color, shape, position = rng.choice(self.combos)
        image = render(color, shape, position, self.image_size, rng)
        meta = {"color": color, "shape": shape, "position": position, "split": self.split, "index": index}
        if self.task == "t2i":
            named = (True, True, True)
            # drawn after rendering, so the images (and full captions) of a seed do not depend on this setting
            if self.partial_captions and rng.random() < self.partial_captions:
                named = rng.choice(PARTIAL_SUBSETS)
            attrs = (color, shape, position)
            tags = tuple(f"{k}={v}" for k, v in zip(("color", "shape", "position"), attrs))
            # tags / caption_tags: which images a (partial) caption is true of, for contrastive pretraining
            return {"task": "t2i", "caption": caption_for(*(a if keep else None for a, keep in zip(attrs, named))),
                    "image": image, "codes": None, "meta": meta, "tags": tags,
                    "caption_tags": tuple(t for t, keep in zip(tags, named) if keep),
                    # for composable guidance in evaluation (evaluation.component_scale)
                    "components": components_for(attrs, named, self.components),
                    # the caption without its colour, for guidance away from it (evaluation.negative_prompts)
                    "negative": caption_for(*(a if keep and k != 0 else None
                                              for k, (a, keep) in enumerate(zip(attrs, named))))}
        answers = {"color": color, "shape": shape, "position": position}
        # random order, also for all three: a fixed order would let a model answer by turn number
        keys = rng.sample(list(QUESTIONS), self.questions_per_sample)
        turns = [{"question": QUESTIONS[k], "answer": answers[k]} for k in keys]
        return {"task": "mmu", "image": image, "turns": turns, "meta": meta}

    def score_images(self, images: Sequence, samples: Sequence[dict]) -> dict[str, float]:
        """Score generated images against the samples' captions (colour and position)."""
        from .shape_analysis import score_t2i

        return score_t2i(images, samples)


def build_synthetic_shapes(task: Literal["mmu", "t2i"], size: int, split: Literal["train", "heldout"] = "train",
                           image_size: int = 32, seed: int = 0,
                           questions_per_sample: Literal[1, 2, 3] = 1,
                           partial_captions: float = 0.0,
                           components: Literal["singles", "pairs", "color"] = "color") -> SyntheticShapes:
    """Synthetic coloured shapes (MMU questions or T2I captions) with held-out attribute combinations.

    ``partial_captions``: the probability that a T2I sample's caption names only some of its attributes
    ("a green shape", "a square on the left"); the image is always a training combination.
    ``components``: the component prompts a T2I sample carries for composable guidance: captions naming one
    attribute of its caption each ("singles": "a blue shape", "a triangle", "a shape on the right") or two
    ("pairs": "a blue triangle", "a blue shape on the right", "a triangle on the right"), or the colour alone
    ("color": "a blue shape", the default: singles and pairs lowered held-out colour in a measurement, README).
    """
    return SyntheticShapes(task=task, size=size, split=split, image_size=image_size, seed=seed,
                           questions_per_sample=questions_per_sample, partial_captions=partial_captions,
                           components=components)
