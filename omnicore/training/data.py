"""Turning raw samples (dicts from dataset plugins) into model batches, in a seeded, resumable order.

MMU sample: {"task": "mmu", "image": PIL | None, "turns": [{"question", "answer"}, ...]}
T2I sample: {"task": "t2i", "caption": str, "image": PIL | None, "codes": list[int] | None}
"""

from __future__ import annotations

import random
import zlib
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import OmnicoreError
from ..model.layout import IGNORE, Layout


def image_to_tensor(image, size: int) -> torch.Tensor:
    """PIL image -> (3, size, size) float in [-1, 1] (the VQ tokenizer's input range)."""
    from PIL import Image

    image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.BICUBIC)
    arr = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)
    return arr / 127.5 - 1.0


class MMUCollator:
    """Right-padded text with answer-only labels, plus encoder pixels (zeros and has_image=0 when absent).
    ``pad_multiple``: the text width rounded up to a multiple of it, so batches come in few shapes (a graphed
    training step captures one graph per shape); the padding is ignored by the loss and, coming last, changes no
    earlier position's output."""

    def __init__(self, layout: Layout, image_transform, image_size: int, pad_multiple: int = 1) -> None:
        self.layout, self.transform, self.image_size = layout, image_transform, image_size
        self.pad_multiple = pad_multiple

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        texts = [self.layout.mmu_text(s["turns"]) for s in samples]
        width = max(len(ids) for ids, _ in texts)
        width = -(-width // self.pad_multiple) * self.pad_multiple
        pad = self.layout.tokenizer.pad_id
        text_ids = torch.full((len(samples), width), pad, dtype=torch.long)
        labels = torch.full((len(samples), width), IGNORE, dtype=torch.long)
        for i, (ids, lab) in enumerate(texts):
            text_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(lab)] = torch.tensor(lab)
        batch = {"text_ids": text_ids, "labels": labels}
        if self.transform is not None:
            pixels, has_image = [], []
            for s in samples:
                if s.get("image") is not None:
                    pixels.append(self.transform(s["image"]))
                    has_image.append(1.0)
                else:
                    pixels.append(torch.zeros(3, self.image_size, self.image_size))
                    has_image.append(0.0)
            batch["pixels"] = torch.stack(pixels)
            batch["has_image"] = torch.tensor(has_image)
        return batch


class T2ICollator:
    """Left-padded caption prefixes (dropped to the unconditional prefix with some probability) and codes or images."""

    def __init__(self, layout: Layout, image_size: int, num_codes: int, caption_dropout: float = 0.0,
                 seed: int = 0) -> None:
        self.layout, self.image_size, self.num_codes, self.seed = layout, image_size, num_codes, seed
        self.caption_dropout = caption_dropout

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        # dropout decisions come from the sample order itself, so they are reproducible on resume
        key = "\x00".join(str(s.get("caption")) for s in samples).encode()
        rng = random.Random(zlib.crc32(key) ^ self.seed)
        prefixes = [self.layout.t2i_prefix(None if rng.random() < self.caption_dropout else s["caption"])
                    for s in samples]
        batch: dict[str, torch.Tensor] = {"prefix_ids": torch.tensor(prefixes, dtype=torch.long)}
        if all(s.get("codes") is not None for s in samples):
            codes = [list(s["codes"]) for s in samples]
            bad = [len(c) for c in codes if len(c) != self.num_codes]
            if bad:
                raise OmnicoreError(f"T2I sample has {bad[0]} codes; the model's tokenizer grid needs {self.num_codes}")
            batch["codes"] = torch.tensor(codes, dtype=torch.long)
        elif all(s.get("image") is not None for s in samples):
            batch["images"] = torch.stack([image_to_tensor(s["image"], self.image_size) for s in samples])
        else:
            raise OmnicoreError("T2I samples need either 'codes' or 'image'")
        return batch


class ResumableSampler(Sampler[int]):
    """Epoch-wise seeded permutations; ``start`` skips samples already consumed (for resume)."""

    def __init__(self, size: int, seed: int, shuffle: bool = True, start: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        self.size, self.seed, self.shuffle, self.start = size, seed, shuffle, start
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[int]:
        position = self.start
        while True:
            epoch, offset = divmod(position, self.size)
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                order = torch.randperm(self.size, generator=g).tolist()
            else:
                order = list(range(self.size))
            for i in order[offset:]:
                if position % self.world_size == self.rank:
                    yield i
                position += 1

    def __len__(self) -> int:  # infinite stream; DataLoader only needs it to exist
        return 2**62


def make_loader(dataset: Dataset, batch_size: int, collate, seed: int, start: int = 0, shuffle: bool = True,
                num_workers: int = 0, rank: int = 0, world_size: int = 1) -> Iterator[dict[str, Any]]:
    """An endless iterator of batches. ``start`` counts samples (global across ranks) already consumed."""
    if len(dataset) == 0:
        raise OmnicoreError("dataset is empty")
    sampler = ResumableSampler(len(dataset), seed, shuffle, start, rank, world_size)
    return iter(DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate,
                           num_workers=num_workers, persistent_workers=num_workers > 0,
                           worker_init_fn=_seed_worker if num_workers else None))


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
