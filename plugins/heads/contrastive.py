"""``contrastive_text``: a small caption tower and the SigLIP loss, for pretraining the image encoder.

OmniMamba's encoders (SigLIP, DINOv2) come pretrained and stay frozen. A model trained from scratch (the quick
start) can pretrain its own encoder the same way SigLIP was trained: matching images to their captions with a
pairwise sigmoid loss. The tower is only used by a stage of kind ``contrastive``; it is saved with the model so
that such a stage resumes exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from omnicore.errors import OmnicoreError


class ContrastiveTower(nn.Module):
    def __init__(self, vocab_size: int, encoder_dim: int, dim: int = 64, max_tokens: int = 32, layers: int = 1,
                 num_heads: int = 2) -> None:
        super().__init__()
        if min(vocab_size, encoder_dim, dim, max_tokens, layers, num_heads) < 1 or dim % num_heads:
            raise OmnicoreError(f"head contrastive_text: sizes must be positive and dim ({dim}) a multiple of "
                                f"num_heads ({num_heads})")
        self.max_tokens = max_tokens
        self.embed = nn.Embedding(vocab_size, dim)
        self.positions = nn.Parameter(torch.randn(max_tokens, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, num_heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.text = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.text_proj = nn.Linear(dim, dim)
        self.image_proj = nn.Linear(encoder_dim, dim)
        # SigLIP's initialisation: scale 10, bias -10 (most pairs in a batch are negatives)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0))

    def embed_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``ids``/``mask`` (B, L) -> unit vectors (B, dim)."""
        ids, mask = ids[:, : self.max_tokens], mask[:, : self.max_tokens]
        h = self.text(self.embed(ids) + self.positions[: ids.shape[1]], src_key_padding_mask=~mask)
        pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return F.normalize(self.text_proj(pooled), dim=-1)

    def embed_image(self, features: torch.Tensor) -> torch.Tensor:
        """Encoder features (B, N, encoder_dim) -> unit vectors (B, dim)."""
        return F.normalize(self.image_proj(features.mean(1)), dim=-1)

    def loss(self, features: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
        """SigLIP: every image-caption pair is a binary decision; ``positive`` (B, B) marks the matching pairs
        (several when captions repeat in a batch)."""
        logits = self.embed_image(features) @ self.embed_text(ids, mask).T * self.logit_scale.exp() + self.logit_bias
        labels = positive.to(logits.dtype) * 2 - 1
        return -F.logsigmoid(labels * logits).sum() / logits.shape[0]


def contrastive_text(vocab_size: int, encoder_dim: int, dim: int = 64, max_tokens: int = 32, layers: int = 1,
                     num_heads: int = 2) -> ContrastiveTower:
    """Caption tower + SigLIP loss for pretraining the encoder (stage kind ``contrastive``)."""
    return ContrastiveTower(vocab_size, encoder_dim, dim, max_tokens, layers, num_heads)
