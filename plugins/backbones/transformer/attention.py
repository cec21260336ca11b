"""Running transformers' decoder layers over omnicore's inference state: RoPE positions under left padding, a
static KV cache, one boolean mask shared by every layer.

transformers' own forward keeps its cache in objects whose interface changes between releases; these functions
use only the layers' modules (``input_layernorm``, ``self_attn.{q,k,v,o}_proj``, ``post_attention_layernorm``,
``mlp``) and ``apply_rotary_pos_emb``, so the weights, RoPE and grouped-query layout are transformers' and the
caching is omnicore's. A hybrid stack that keeps some teacher layers as attention runs them with
``decoder_layer`` and an ``AttentionContext`` of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .state import KVCache, TransformerState


@dataclass
class AttentionContext:
    positions: torch.Tensor  # (B, L) RoPE positions: real tokens before each one
    mask: torch.Tensor | None  # (B, 1, L, K) bool, True = attend; None = plain causal over the input alone
    cols: torch.Tensor | None = None  # (L,) cache columns this call writes
    kv_len: int | None = None  # cache columns read: [:kv_len] (None: all, the graph-safe one-token step)

    @staticmethod
    def build(batch: int, length: int, device, mask: torch.Tensor | None, state: TransformerState | None,
              step: bool) -> "AttentionContext":
        """``mask`` (B, L) marks real tokens (left padding is False); ``step``: a one-token step on ``state``
        with static shapes (the offset read from its tensor, no host sync)."""
        steps = torch.arange(length, device=device)
        real = mask.long() if mask is not None else torch.ones(batch, length, dtype=torch.long, device=device)
        positions = (real.cumsum(1) - 1).clamp(min=0)
        if state is None:
            if mask is None:
                return AttentionContext(positions, None)
            causal = steps[None, :] <= steps[:, None]
            # a padding row attends to itself only, so its softmax has a term (its output is never read)
            allowed = (mask[:, None, None, :] & causal) | torch.eye(length, dtype=torch.bool, device=device)
            return AttentionContext(positions, allowed)
        if step:
            kv_len, keys = None, torch.arange(state.max_seqlen, device=device)
        else:
            kv_len = state.seqlen_offset + length
            if kv_len > state.max_seqlen:
                raise ValueError(f"sequence of {kv_len} tokens exceeds the state's max_seqlen {state.max_seqlen}")
            keys = torch.arange(kv_len, device=device)
        positions = positions + state.positions[:, None]
        cols = state.offset + steps
        written = mask if mask is not None else torch.ones(batch, length, dtype=torch.bool, device=device)
        state.kv_valid.index_copy_(1, cols, written)
        valid = state.kv_valid[:, None, None, : keys.shape[0]]
        allowed = (valid & (keys[None, :] <= cols[:, None])) | (keys[None, :] == cols[:, None])
        return AttentionContext(positions, allowed, cols, kv_len)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def attention_heads(attn, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], ctx: AttentionContext,
                    cache: KVCache | None = None) -> torch.Tensor:
    """The attention of one of transformers' attention modules before its output projection: ``(B, L, H*d)``
    (per head, heads concatenated). ``rope``: (cos, sin) ``(B, L, d)`` from the stack's rotary embedding."""
    b, l, _ = x.shape
    d = attn.head_dim
    q = attn.q_proj(x).view(b, l, -1, d).transpose(1, 2)
    k = attn.k_proj(x).view(b, l, -1, d).transpose(1, 2)
    v = attn.v_proj(x).view(b, l, -1, d).transpose(1, 2)
    cos, sin = rope[0][:, None], rope[1][:, None]
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    if cache is not None:
        cache.k.index_copy_(2, ctx.cols, k.detach().to(cache.k.dtype))
        cache.v.index_copy_(2, ctx.cols, v.detach().to(cache.v.dtype))
        k, v = cache.k, cache.v
        if ctx.kv_len is not None:
            k, v = k[:, :, : ctx.kv_len], v[:, :, : ctx.kv_len]
        k, v = k.to(q.dtype), v.to(q.dtype)
    groups = q.shape[1] // k.shape[1]
    if groups > 1:  # query head h reads kv head h // groups (transformers' repeat_kv)
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask, is_causal=ctx.mask is None and l > 1,
                                         scale=attn.scaling)
    return out.transpose(1, 2).reshape(b, l, -1)


def decoder_layer(layer, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], ctx: AttentionContext,
                  cache: KVCache | None = None) -> torch.Tensor:
    """One of transformers' pre-norm decoder layers (Llama / Qwen2): attention and MLP, each added to ``h``."""
    attn = layer.self_attn
    h = h + attn.o_proj(attention_heads(attn, layer.input_layernorm(h), rope, ctx, cache))
    return h + layer.mlp(layer.post_attention_layernorm(h))
