"""Running transformers' decoder layers over omnicore's inference state: RoPE positions under left padding, a
static KV cache, one boolean mask shared by every layer.

transformers' own forward keeps its cache in objects whose interface changes between releases; these functions
use only the layers' modules (``input_layernorm``, ``self_attn.{q,k,v,o}_proj``, ``post_attention_layernorm``,
``mlp``) and ``apply_rotary_pos_emb``, so the weights, RoPE and grouped-query layout are transformers' and the
caching is omnicore's. A hybrid stack that keeps some teacher layers as attention runs them with
``decoder_layer`` and an ``AttentionContext`` of its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..mamba2.attention import AttnContext
from .state import KVCache


# the mask, positions and cache columns of one forward are the hybrid Mamba-2 stacks' (same static KV cache layout)
AttentionContext = AttnContext


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
    if l == 1 and cache is not None:
        return _one_token_attention(q, k, v, ctx.attn_mask, attn.scaling).reshape(b, 1, -1)
    if groups > 1:  # query head h reads kv head h // groups (transformers' repeat_kv)
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.attn_mask, is_causal=ctx.attn_mask is None and l > 1,
                                         scale=attn.scaling)
    return out.transpose(1, 2).reshape(b, l, -1)


_SPLIT = 1024  # keys per block of the split product in _one_token_attention


def _one_token_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
                         scale: float) -> torch.Tensor:
    """One query per row over a cache: q (B, H, 1, d), k/v (B, kv_heads, K, d), allowed (B, 1, 1, K) ->
    (B, H, d). The query heads of a group read their kv head in one product, so the cache is read once and
    never copied per query head (the repeat above would write and read it ``groups`` times more); a decode step
    is bound by that read at long contexts."""
    b, h, _, d = q.shape
    kv, n = k.shape[1], k.shape[2]
    qg = q.reshape(b, kv, h // kv, d)  # head h reads kv head h // groups, as repeat_kv orders them
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * scale  # (B, kv, groups, K)
    scores = scores.masked_fill(~allowed.reshape(b, 1, 1, -1), float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    # probs @ v reduces over the whole cache with a tiny output (groups x d per kv head): as one product it runs
    # on a handful of GPU blocks; split the cache into blocks of _SPLIT keys (one product each, batched) and sum
    whole = n // _SPLIT * _SPLIT
    out = torch.matmul(probs[..., whole:], v[:, :, whole:]).float()
    if whole:
        parts = torch.matmul(probs[..., :whole].unflatten(-1, (-1, _SPLIT)).transpose(2, 3),
                             v[:, :, :whole].unflatten(2, (-1, _SPLIT)))  # (B, kv, blocks, groups, d)
        out = out + parts.float().sum(2)
    return out.to(v.dtype).reshape(b, h, d)


def decoder_layer(layer, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], ctx: AttentionContext,
                  cache: KVCache | None = None) -> torch.Tensor:
    """One of transformers' pre-norm decoder layers (Llama / Qwen2): attention and MLP, each added to ``h``."""
    attn = layer.self_attn
    h = h + attn.o_proj(attention_heads(attn, layer.input_layernorm(h), rope, ctx, cache))
    return h + layer.mlp(layer.post_attention_layernorm(h))
