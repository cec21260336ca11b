"""Causal multi-head attention for hybrid stacks (mamba_ssm ``MHA`` names: ``in_proj``, ``out_proj``).

Grouped-query attention (num_heads_kv), optional rotary embedding on the first ``rotary_emb_dim`` channels of
each head, and a static KV cache. The backbone builds one ``AttnContext`` per forward (positions, the boolean
attention mask, the cache columns to write) shared by every attention layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .state import InferenceState, KVCache


@dataclass
class AttnContext:
    positions: torch.Tensor  # (B, L) rotary positions (real tokens before each one)
    attn_mask: torch.Tensor | None  # (B, 1, L, K) bool, True = attend; None = plain causal, no cache
    cols: torch.Tensor | None = None  # (L,) cache columns written by this call
    kv_len: int | None = None  # keys read from the cache: [:kv_len] (None: the whole cache)

    @staticmethod
    def build(batch: int, length: int, device, mask: torch.Tensor | None, state: InferenceState | None,
              step: bool) -> "AttnContext":
        steps = torch.arange(length, device=device)
        real = mask.long() if mask is not None else torch.ones(batch, length, dtype=torch.long, device=device)
        positions = (real.cumsum(1) - 1).clamp(min=0)
        if state is None:
            if mask is None:
                return AttnContext(positions, None)
            causal = steps[None, :] <= steps[:, None]
            allowed = (mask[:, None, None, :] & causal) | torch.eye(length, dtype=torch.bool, device=device)
            return AttnContext(positions, allowed)
        if step:  # graph-safe: static shapes, the offset read from its tensor
            kv_len, keys = None, torch.arange(state.max_seqlen, device=device)
        else:
            kv_len = state.seqlen_offset + length
            if kv_len > state.max_seqlen:
                raise ValueError(f"sequence of {kv_len} tokens exceeds the state's max_seqlen {state.max_seqlen}")
            keys = torch.arange(kv_len, device=device)
        positions = positions + state.positions[:, None]
        cols = state.offset + steps
        state.kv_valid.index_copy_(1, cols, mask if mask is not None else torch.ones_like(real, dtype=torch.bool))
        valid = state.kv_valid[:, None, None, : keys.shape[0]]
        allowed = (valid & (keys[None, :] <= cols[:, None])) | (keys[None, :] == cols[:, None])
        return AttnContext(positions, allowed, cols, kv_len)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    d = cos.shape[-1] * 2
    rot, rest = x[..., :d].float(), x[..., d:]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    else:
        x1, x2 = rot[..., : d // 2], rot[..., d // 2:]
        out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return torch.cat([out.to(x.dtype), rest], dim=-1)


class MHA(nn.Module):
    def __init__(self, embed_dim: int, num_heads: int, num_heads_kv: int | None = None, head_dim: int | None = None,
                 qkv_proj_bias: bool = True, out_proj_bias: bool = True, softmax_scale: float | None = None,
                 rotary_emb_dim: int = 0, rotary_emb_base: float = 10000.0, rotary_emb_interleaved: bool = False,
                 causal: bool = True, layer_idx: int | None = None, device=None, dtype=None, **unsupported) -> None:
        super().__init__()
        bad = {k: v for k, v in unsupported.items() if v}  # mamba_ssm's mlp_dim / d_conv options
        if bad or not causal:
            raise ValueError(f"attention options not supported by this backbone: {bad or {'causal': causal}}")
        fk = {"device": device, "dtype": dtype}
        self.num_heads = num_heads
        self.num_heads_kv = num_heads_kv or num_heads
        if num_heads % self.num_heads_kv:
            raise ValueError("num_heads must be divisible by num_heads_kv")
        if head_dim is None and embed_dim % num_heads:
            raise ValueError("embed_dim must be divisible by num_heads (or give head_dim)")
        self.head_dim = head_dim or embed_dim // num_heads
        self.softmax_scale, self.layer_idx = softmax_scale, layer_idx
        self.rotary_emb_dim, self.rotary_interleaved = rotary_emb_dim, rotary_emb_interleaved
        if rotary_emb_dim:
            inv = 1.0 / rotary_emb_base ** (torch.arange(0, rotary_emb_dim, 2, dtype=torch.float32) / rotary_emb_dim)
            self.register_buffer("inv_freq", inv.to(device) if device else inv, persistent=False)
        qkv = self.head_dim * (num_heads + 2 * self.num_heads_kv)
        self.in_proj = nn.Linear(embed_dim, qkv, bias=qkv_proj_bias, **fk)
        self.out_proj = nn.Linear(self.head_dim * num_heads, embed_dim, bias=out_proj_bias, **fk)

    def allocate_cache(self, batch_size: int, max_seqlen: int, dtype=None, device=None) -> KVCache:
        shape = (batch_size, max_seqlen, self.num_heads_kv, self.head_dim)
        kw = {"dtype": dtype or self.out_proj.weight.dtype, "device": device or self.out_proj.weight.device}
        return KVCache(torch.zeros(shape, **kw), torch.zeros(shape, **kw))

    def forward(self, x: torch.Tensor, cache: KVCache | None, ctx: AttnContext) -> torch.Tensor:
        b, l, _ = x.shape
        hd, nh, nkv = self.head_dim, self.num_heads, self.num_heads_kv
        q, k, v = torch.split(self.in_proj(x), [nh * hd, nkv * hd, nkv * hd], dim=-1)
        q, k, v = q.view(b, l, nh, hd), k.view(b, l, nkv, hd), v.view(b, l, nkv, hd)
        if self.rotary_emb_dim:
            angles = ctx.positions[..., None].float() * self.inv_freq  # (b, l, rot/2)
            cos, sin = angles.cos()[:, :, None], angles.sin()[:, :, None]
            q = _rotate(q, cos, sin, self.rotary_interleaved)
            k = _rotate(k, cos, sin, self.rotary_interleaved)
        if cache is not None:
            cache.k.index_copy_(1, ctx.cols, k.detach().to(cache.k.dtype))
            cache.v.index_copy_(1, ctx.cols, v.detach().to(cache.v.dtype))
            k, v = cache.k, cache.v
            if ctx.kv_len is not None:
                k, v = k[:, : ctx.kv_len], v[:, : ctx.kv_len]
            k, v = k.to(q.dtype), v.to(q.dtype)
        if nkv != nh:
            k, v = k.repeat_interleave(nh // nkv, dim=2), v.repeat_interleave(nh // nkv, dim=2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=ctx.attn_mask, is_causal=ctx.attn_mask is None,
                                             scale=self.softmax_scale)
        return self.out_proj(out.transpose(1, 2).reshape(b, l, nh * hd))
