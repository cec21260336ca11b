"""HoVLE's image embedding (the image half of its holistic embedding): pixels -> 14 px patch convolution -> plus a
learned position table -> pixel shuffle at ratio 0.5 -> ``(B, (grid / 2)^2, 4 * width)``.

The MLP that follows it in HoVLE (Linear 4 width -> width, exact GELU, Linear width -> width) is the model's
``mlp_gelu`` projector (depth 2, hidden = width); HoVLE's decoder layers over the whole sequence are the first layers
of the backbone. So one 448 px tile gives (448 / 14 / 2)^2 = 256 image slots of the MMU layout.

Parameters keep HoVLE's names (``patch_embedding``, ``position_embedding`` with its class-token row first,
``class_embedding``, which HoVLE's forward does not read but its checkpoints hold). The position table is
resized bicubically (align_corners False) when the image grid differs from the table's. Preprocessing: one tile,
the image resized to ``image_size`` (bicubic), ImageNet mean/std; HoVLE's dynamic tiling (up to 12 tiles plus a
thumbnail) is not implemented.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from omnicore.errors import OmnicoreError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def pixel_shuffle_half(x: torch.Tensor, grid: int) -> torch.Tensor:
    """``(B, grid * grid, C)`` tokens in row-major order -> ``(B, (grid / 2)^2, 4C)``: output token (i, j), row-major,
    holds the channels of input tokens (2i, 2j), (2i, 2j + 1), (2i + 1, 2j), (2i + 1, 2j + 1) in that order
    (HoVLE's / InternVL's pixel shuffle at ratio 0.5)."""
    b, n, c = x.shape
    half = grid // 2
    return x.reshape(b, half, 2, half, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(b, half * half, 4 * c)


class HoVLEPatchEmbedding(nn.Module):
    """Pixels ``(B, 3, S, S)`` normalised with ImageNet mean/std -> ``(B, num_patches, embed_dim)``:
    ``num_patches = (S / patch_size / 2)^2``, ``embed_dim = 4 * width``."""

    def __init__(self, width: int, image_size: int = 448, patch_size: int = 14, position_grid: int | None = None,
                 downsample_ratio: float = 0.5, channels: int = 3, tiles: int = 1,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        super().__init__()
        if tiles != 1:
            raise OmnicoreError(f"hovle_patch: tiles={tiles}: only single-tile preprocessing (tiles: 1, one "
                                f"{image_size} px tile) is implemented; HoVLE's dynamic tiling is not")
        if downsample_ratio != 0.5:
            raise OmnicoreError(f"hovle_patch: downsample_ratio {downsample_ratio}: only HoVLE's 0.5 is implemented")
        if min(width, image_size, patch_size, channels) < 1 or image_size % patch_size:
            raise OmnicoreError(f"hovle_patch: image_size {image_size} must be a positive multiple of patch_size "
                                f"{patch_size}")
        grid = image_size // patch_size
        if grid % 2:
            raise OmnicoreError(f"hovle_patch: the patch grid {grid} (image_size / patch_size) must be even for the "
                                "pixel shuffle")
        position_grid = grid if position_grid is None else int(position_grid)
        if position_grid < 1:
            raise OmnicoreError(f"hovle_patch: position_grid must be positive (got {position_grid})")
        if len(mean) != 3 or len(std) != 3:
            raise OmnicoreError("hovle_patch: mean and std need 3 values each")
        self.width, self.patch_size, self.grid, self.position_grid = int(width), int(patch_size), grid, position_grid
        self.image_size = int(image_size)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.patch_embedding = nn.Conv2d(channels, width, kernel_size=patch_size, stride=patch_size, bias=True)
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, width))  # held by the checkpoint, never read
        self.position_embedding = nn.Parameter(torch.zeros(1, position_grid * position_grid + 1, width))
        nn.init.normal_(self.patch_embedding.weight, std=0.02)
        nn.init.zeros_(self.patch_embedding.bias)
        nn.init.normal_(self.position_embedding, std=0.02)
        self.embed_dim = 4 * self.width
        self.num_patches = (grid // 2) ** 2

    def image_transform(self) -> Callable[[Any], torch.Tensor]:
        from .timm_encoders import build_image_transform

        return build_image_transform(self.image_size, self.mean, self.std, "naive", "bicubic")

    def positions(self, grid: int) -> torch.Tensor:
        """``(1, grid * grid, width)``: the table without its class row, resized to ``grid`` when it differs."""
        table = self.position_embedding[:, 1:]
        if grid == self.position_grid:
            return table
        g = self.position_grid
        table = table.float().reshape(1, g, g, self.width).permute(0, 3, 1, 2)
        table = F.interpolate(table, size=(grid, grid), mode="bicubic", align_corners=False)
        return table.reshape(1, self.width, grid * grid).permute(0, 2, 1).to(self.position_embedding.dtype)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (self.patch_embedding.in_channels, self.image_size,
                                                            self.image_size):
            raise OmnicoreError(f"hovle_patch expects pixels (B, {self.patch_embedding.in_channels}, "
                                f"{self.image_size}, {self.image_size}); got {tuple(pixels.shape)}")
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))
        x = x.flatten(2).transpose(1, 2)  # (B, grid * grid, width), row-major
        x = x + self.positions(self.grid).to(x.dtype)
        return pixel_shuffle_half(x, self.grid)

    def extra_repr(self) -> str:
        return (f"image_size={self.image_size}, patch_size={self.patch_size}, width={self.width}, "
                f"position_grid={self.position_grid}, num_patches={self.num_patches}")


def hovle_patch(width: int, image_size: int = 448, patch_size: int = 14, position_grid: int | None = None,
                downsample_ratio: float = 0.5, channels: int = 3, tiles: int = 1) -> HoVLEPatchEmbedding:
    """HoVLE's image embedding: ``patch_size`` px patch convolution to ``width`` channels, a learned position table
    (``position_grid`` per side, default the image's grid; resized bicubically when it differs), pixel shuffle
    0.5 -> ``4 * width`` features per slot. Pair it with projector ``mlp_gelu`` (``hidden_dim: width``, depth 2).
    One ``image_size`` px tile per image (``tiles`` other than 1 is refused), ImageNet mean/std."""
    return HoVLEPatchEmbedding(width, image_size, patch_size, position_grid, downsample_ratio, channels, tiles)
