"""The Mamba-2 state-space dual (SSD) recurrence in plain PyTorch: chunked scan and one-token step.

Per head h the recurrence is (state ``S`` of shape (headdim, d_state))::

    S_t = exp(dt_t * A_h) * S_{t-1} + dt_t * x_t B_t^T          y_t = S_t C_t + D_h * x_t

The chunked form splits the sequence into chunks of ``chunk_size``: inside a chunk the output is a masked
(decay-weighted) attention-like product, memory ~ L * chunk_size; the states passed between chunks follow the
same recurrence at chunk granularity. Shapes: x (b, l, h, p), dt (b, l, h) (already softplus'ed), A (h,),
B and C (b, l, g, n) with h divisible by g (heads share their group's B/C), state (b, h, p, n).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _segment_decay(cs: torch.Tensor) -> torch.Tensor:
    """exp(cs[..., i] - cs[..., j]) for i >= j, else 0: the decay from step j to step i. cs (..., T) -> (..., T, T)."""
    T = cs.shape[-1]
    diff = cs[..., :, None] - cs[..., None, :]
    keep = torch.ones(T, T, dtype=torch.bool, device=cs.device).tril()
    return torch.exp(torch.where(keep, diff, torch.full_like(diff, float("-inf"))))


def ssd_chunked(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                chunk_size: int, D: torch.Tensor | None = None, initial_state: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (y (b, l, h, p) in x's dtype, final state (b, h, p, n) in float32/float64)."""
    b, l, h, p = x.shape
    g, n = B.shape[-2:]
    r = h // g
    ct = torch.promote_types(x.dtype, torch.float32)  # compute type: at least float32
    pad = (-l) % chunk_size
    if pad:  # zero dt and x: padded steps neither decay nor feed the state
        x, dt, B, C = (F.pad(t, (0,) * (2 * (t.dim() - 2)) + (0, pad)) for t in (x, dt, B, C))
    c, s = (l + pad) // chunk_size, chunk_size
    xs = x.to(ct).reshape(b, c, s, g, r, p)
    dts = dt.to(ct).reshape(b, c, s, g, r)
    Bs = B.to(ct).reshape(b, c, s, g, n)
    Cs = C.to(ct).reshape(b, c, s, g, n)
    dA = dts * A.to(ct).reshape(g, r)
    cs = torch.cumsum(dA, dim=2)  # (b, c, s, g, r): log-decay from the chunk start
    xdt = xs * dts[..., None]

    # 1. inside each chunk: y_i = sum_{j<=i} (C_i . B_j) exp(cs_i - cs_j) dt_j x_j
    CB = torch.einsum("bcign,bcjgn->bcgij", Cs, Bs)
    decay = _segment_decay(cs.permute(0, 1, 3, 4, 2))  # (b, c, g, r, s, s)
    y = torch.einsum("bcgrij,bcjgrp->bcigrp", CB[:, :, :, None] * decay, xdt)

    # 2. each chunk's own contribution to the state at its end
    to_end = torch.exp(cs[:, :, -1:] - cs)  # (b, c, s, g, r)
    chunk_states = torch.einsum("bcsgn,bcsgrp->bcgrpn", Bs, xdt * to_end[..., None])

    # 3. states entering each chunk (and the final one): the recurrence at chunk granularity
    if initial_state is None:
        init = chunk_states.new_zeros(b, 1, g, r, p, n)
    else:
        init = initial_state.to(ct).reshape(b, 1, g, r, p, n)
    stacked = torch.cat([init, chunk_states], dim=1)  # (b, c+1, g, r, p, n)
    totals = F.pad(cs[:, :, -1].permute(0, 2, 3, 1).cumsum(-1), (1, 0))  # (b, g, r, c+1)
    passed = torch.einsum("bgrkj,bjgrpn->bkgrpn", _segment_decay(totals), stacked)
    entering, final = passed[:, :-1], passed[:, -1]

    # 4. the entering state's contribution inside each chunk
    y = y + torch.einsum("bcign,bcgrpn->bcigrp", Cs, entering) * torch.exp(cs)[..., None]

    y = y.reshape(b, c * s, h, p)[:, :l]
    if D is not None:
        y = y + x[:, :l].to(ct) * (D.to(ct).reshape(h, -1))
    return y.to(x.dtype), final.reshape(b, h, p, n)


def ssd_step(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
             C: torch.Tensor, D: torch.Tensor | None = None) -> torch.Tensor:
    """One token: update ``state`` (b, h, p, n) in place; x (b, h, p), dt (b, h), B/C (b, g, n) -> y (b, h, p)."""
    b, h, p, n = state.shape
    g = B.shape[1]
    ct = torch.promote_types(state.dtype, torch.float32)
    dt = dt.to(ct)
    Bh = B.to(ct).repeat_interleave(h // g, dim=1)  # (b, h, n)
    Ch = C.to(ct).repeat_interleave(h // g, dim=1)
    dA = torch.exp(dt * A.to(ct))  # (b, h)
    new = state.to(ct) * dA[..., None, None] + (dt[..., None] * x.to(ct))[..., None] * Bh[:, :, None, :]
    state.copy_(new.detach())
    # a broadcast product and sum, not einsum: einsum becomes a batched matmul that re-reads ``new`` from memory,
    # while Inductor fuses this reduction with the update above into one pass over the state
    y = (new * Ch[:, :, None, :]).sum(-1)
    if D is not None:
        y = y + x.to(ct) * D.to(ct).reshape(h, -1)
    return y.to(x.dtype)
