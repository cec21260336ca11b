"""Image codes computed once per stage when the image tokenizer is frozen.

A T2I sample that has an image but no codes is otherwise run through the VQ tokenizer every time it is drawn
(on the quick start's CPU, a quarter of a T2I step). When a stage draws each sample at least once on average,
encoding the whole dataset up front costs no more than the encoding it replaces and takes it out of every step.
Datasets that are larger than what a stage draws are better pretokenized once (``omni pretokenize``).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.data import Dataset

from .data import image_to_tensor

ENCODE_BATCH = 256


class WithCodes(Dataset):
    """``dataset`` with each sample's precomputed ``codes`` added (the image stays for anything else that reads it)."""

    def __init__(self, dataset: Dataset, codes: torch.Tensor) -> None:
        if len(codes) != len(dataset):
            raise ValueError(f"{len(codes)} code rows for {len(dataset)} samples")
        self.dataset, self.codes = dataset, codes

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        sample = dict(self.dataset[index])
        sample["codes"] = self.codes[index].tolist()
        return sample


def worth_caching(setting: bool | None, dataset: Dataset, samples_drawn: int, tokenizer_frozen: bool) -> bool:
    """``setting`` True/False: as given. None: when the tokenizer is frozen, the samples carry images but no codes,
    and the stage draws at least as many samples as the dataset holds."""
    if setting is False or not tokenizer_frozen or len(dataset) == 0:
        return False
    first = dataset[0]
    if first.get("codes") is not None or first.get("image") is None:
        return False
    return setting is True or samples_drawn >= len(dataset)


@torch.no_grad()
def encode_dataset(dataset: Dataset, image_size: int, images_to_codes: Callable[[torch.Tensor], torch.Tensor],
                   advance: Callable[[int], None] | None = None) -> torch.Tensor:
    """Codes ``(len(dataset), h*w)`` (int32, on the CPU) of every sample's image, in dataset order."""
    rows = []
    for start in range(0, len(dataset), ENCODE_BATCH):
        indices = range(start, min(start + ENCODE_BATCH, len(dataset)))
        images = torch.stack([image_to_tensor(dataset[i]["image"], image_size) for i in indices])
        rows.append(images_to_codes(images).to("cpu", torch.int32))
        if advance is not None:
            advance(len(indices))
    return torch.cat(rows)
