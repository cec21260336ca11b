"""What the core expects of each kind of component. Plugins satisfy these structurally (no base class).

Shapes: B batch, L sequence length, D the backbone width (d_model).
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

import torch


@runtime_checkable
class Encoder(Protocol):
    """An understanding encoder: pixels -> per-patch features ``(B, num_patches, embed_dim)``."""

    embed_dim: int
    num_patches: int
    image_size: int

    def image_transform(self) -> Callable[[Any], torch.Tensor]:
        """A callable turning one PIL image into a ``(3, image_size, image_size)`` float tensor."""
        ...

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class ImageTokenizer(Protocol):
    """A VQ image tokenizer: images in [-1, 1] ``(B, 3, H, W)`` <-> codes ``(B, h, w)``."""

    codebook_size: int
    downsample: int  # H / h

    def encode(self, images: torch.Tensor) -> torch.Tensor: ...

    def decode(self, codes: torch.Tensor) -> torch.Tensor: ...

    def training_losses(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Losses for tokenizer training; the key ``loss`` is the total to minimise."""
        ...


@runtime_checkable
class TextTokenizer(Protocol):
    vocab_size: int  # padded size, including special tokens: the text embedding's row count
    pad_id: int
    eos_id: int
    special_ids: dict[str, int]  # "<|soi|>" -> id, for every OmniMamba special token

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int], skip_special: bool = True) -> str: ...


@runtime_checkable
class Backbone(Protocol):
    """A sequence mixer stack: ``(B, L, D)`` embeddings -> ``(B, L, D)`` final normalised hidden states.

    ``task`` selects a LoRA adapter (None: none). ``state`` (from ``allocate_inference_state``) continues a
    sequence: its per-layer caches are read and updated in place and its offset advances by L. ``mask``
    ``(B, L)`` bool marks real tokens; masked (padding) positions leave every state untouched.
    """

    d_model: int

    def __call__(self, inputs_embeds: torch.Tensor, task: str | None = None, state: Any = None,
                 mask: torch.Tensor | None = None) -> torch.Tensor: ...

    def allocate_inference_state(self, batch_size: int, max_seqlen: int, dtype: torch.dtype | None = None,
                                 device: torch.device | str | None = None) -> Any: ...


SPECIAL_TOKENS = ("<|soi|>", "<|eoi|>", "<|sot|>", "<|eot|>", "<|t2i|>", "<|mmu|>", "<|soc|>", "<|eoc|>", "<|lvg|>")
