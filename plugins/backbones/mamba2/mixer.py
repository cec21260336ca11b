"""The Mamba-2 mixer, with mamba_ssm ``Mamba2``'s parameter names, shapes and initialisation.

in_proj: d_model -> [z (d_inner) | xBC (d_inner + 2*ngroups*d_state) | dt (nheads)]; xBC goes through a causal
depthwise conv + SiLU and splits into x, B, C; the SSD scan mixes x over time; the result is gated by z
(gated RMSNorm) and projected back by out_proj. ``forward`` runs the chunked scan (training, prefill);
with a cache and one token it runs the recurrent step; both update the cache in place.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .lora_linear import fused_lora_linear
from .norm import RMSNormGated
from .ssd import ssd_chunked, ssd_step
from .state import MambaCache


def _up(t: torch.Tensor) -> torch.Tensor:
    """At least float32 (float64 stays float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class Mamba2(nn.Module):
    def __init__(self, d_model: int, d_state: int = 128, d_conv: int = 4, expand: int = 2, headdim: int = 64,
                 ngroups: int = 1, A_init_range: tuple[float, float] = (1.0, 16.0), D_has_hdim: bool = False,
                 rmsnorm: bool = True, norm_before_gate: bool = False, dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4, dt_limit: tuple[float, float] = (0.0, float("inf")),
                 bias: bool = False, conv_bias: bool = True, chunk_size: int = 256, layer_idx: int | None = None,
                 kernel: str = "auto", device=None, dtype=None) -> None:
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = expand * d_model
        self.headdim, self.ngroups, self.chunk_size = headdim, ngroups, chunk_size
        if self.d_inner % headdim:
            raise ValueError(f"d_inner {self.d_inner} (expand*d_model) is not a multiple of headdim {headdim}")
        self.nheads = self.d_inner // headdim
        if self.nheads % ngroups:
            raise ValueError(f"nheads {self.nheads} is not a multiple of ngroups {ngroups}")
        self.dt_limit = tuple(dt_limit)
        self.rmsnorm, self.D_has_hdim, self.layer_idx = rmsnorm, D_has_hdim, layer_idx
        kernels.check_kernel(kernel)
        self.kernel = kernel
        self.conv_dim = self.d_inner + 2 * ngroups * d_state

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner + 2 * ngroups * d_state + self.nheads, bias=bias, **fk)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, padding=d_conv - 1,
                                bias=conv_bias, **fk)
        # dt_bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max]
        dt = torch.exp(torch.rand(self.nheads, **fk) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        A = torch.empty(self.nheads, dtype=torch.float32, device=device).uniform_(*A_init_range)
        self.A_log = nn.Parameter(torch.log(A).to(dtype=dtype))
        self.D = nn.Parameter(torch.ones(self.d_inner if D_has_hdim else self.nheads, **fk))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True
        if rmsnorm:
            self.norm = RMSNormGated(self.d_inner, eps=1e-5, group_size=self.d_inner // ngroups,
                                     norm_before_gate=norm_before_gate, **fk)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **fk)

    # ---- shared pieces ------------------------------------------------------------------------------
    def _split(self, zxbcdt: torch.Tensor):
        return torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.nheads], dim=-1)

    def _in_proj(self, u: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        """in_proj (with its task adapter), or one product with ``weight`` (the merged LoRA weight) and its bias."""
        if weight is None:
            return self.in_proj(u)
        return F.linear(u, weight, getattr(self.in_proj, "base_layer", self.in_proj).bias)

    def _dt(self, dt: torch.Tensor) -> torch.Tensor:
        dt = F.softplus(_up(dt) + _up(self.dt_bias))
        if self.dt_limit != (0.0, float("inf")):
            dt = dt.clamp(*self.dt_limit)
        return dt

    def _out(self, y: torch.Tensor, z: torch.Tensor, fused_norm: bool = False) -> torch.Tensor:
        """Gate, norm, out_proj. ``fused_norm``: the gated RMSNorm as one Triton pass (mamba_ssm's), its output in
        y's dtype (what autocast rounds it to before out_proj anyway)."""
        if self.rmsnorm and fused_norm:
            n = self.norm
            y = kernels.fast_ops().gated_norm(y, n.weight, None, z=z, eps=n.eps, group_size=n.group_size,
                                              norm_before_gate=n.norm_before_gate)
        else:
            y = self.norm(y, z) if self.rmsnorm else y * F.silu(z)
        if not torch.is_autocast_enabled(y.device.type):  # under autocast out_proj takes y as it is
            y = y.to(self.out_proj.weight.dtype)
        return self.out_proj(y)

    def allocate_cache(self, batch_size: int, dtype=None, device=None) -> MambaCache:
        device = device or self.out_proj.weight.device
        conv = torch.zeros(batch_size, self.conv_dim, self.d_conv, device=device,
                           dtype=dtype or self.conv1d.weight.dtype)
        ssm = torch.zeros(batch_size, self.nheads, self.headdim, self.d_state, device=device,
                          dtype=dtype or self.in_proj.weight.dtype)
        return MambaCache(conv, ssm, empty=True)

    # ---- forward ------------------------------------------------------------------------------------
    def forward(self, u: torch.Tensor, cache: MambaCache | None = None, mask: torch.Tensor | None = None,
                use_kernels: bool | None = None, in_proj_weight: torch.Tensor | None = None,
                conv_kernel: bool | None = None, fused: frozenset[str] = frozenset()) -> torch.Tensor:
        """u (B, L, d_model) -> (B, L, d_model). mask (B, L) bool: False positions leave the cache untouched.
        ``in_proj_weight`` replaces in_proj (the backbone passes the task's merged LoRA weight,
        lora.decode_weight). One-token steps only: ``use_kernels`` None decides by ``kernel`` and the tensor,
        True/False as decided by the caller (the compiled step decides outside the compiled region);
        ``conv_kernel`` picks the one-pass conv update (None: where it can run). ``fused``: which of block.FUSED_OPS
        the chunked path may use with mamba_ssm's kernels ("gated_norm", "dt_softplus", "lora", "conv")."""
        if cache is not None and u.shape[1] == 1:
            return self.step(u, cache, None if mask is None else mask[:, 0], use_kernels, in_proj_weight, conv_kernel)
        b, l, _ = u.shape
        fast = kernels.use_fast(self.kernel, u)
        fused = fused if fast else frozenset()
        zxbcdt = fused_lora_linear(self.in_proj, u) if in_proj_weight is None and "lora" in fused else None
        z, xBC, dt_raw = self._split(self._in_proj(u, in_proj_weight) if zxbcdt is None else zxbcdt)
        # a short prompt from an empty state (the T2I prefix): one Triton kernel instead of the chunked scan's five,
        # with dt's softplus inside it and the final state written straight into the cache
        short = (mask is None and (cache is None or cache.empty) and self.kernel != "torch"
                 and kernels.short_scan_ok(u, l))
        # the chunked scan can take dt's bias and softplus itself (not under a mask, which zeroes dt afterwards)
        dt_in_scan = fast and mask is None and "dt_softplus" in fused
        dt = None if short else dt_raw if dt_in_scan else self._dt(dt_raw)
        m = None if mask is None else mask[..., None].to(xBC.dtype)
        if m is not None:
            xBC, dt = xBC * m, dt * m.to(dt.dtype)
        xBC = self._conv(xBC, cache, fast, train_conv="conv" in fused)
        if m is not None:
            xBC = xBC * m
        x, B, C = torch.split(xBC, [self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        x = x.reshape(b, l, self.nheads, self.headdim)
        B = B.reshape(b, l, self.ngroups, self.d_state)
        C = C.reshape(b, l, self.ngroups, self.d_state)
        D = self.D.reshape(self.nheads, self.headdim) if self.D_has_hdim else self.D
        if short:  # A = -exp(A_log) is taken inside the kernel
            y = kernels.short_scan(x, dt_raw, self.dt_bias, self.A_log, B, C, D,
                                   None if cache is None else cache.ssm_state, self.dt_limit)
            if cache is not None:
                cache.empty = False
            return self._out(y.reshape(b, l, self.d_inner), z, "gated_norm" in fused)
        A = -torch.exp(_up(self.A_log))
        init = None if cache is None or cache.empty else cache.ssm_state
        if fast:
            y, final = kernels.fast_ops().chunk_scan(
                x, dt, A, B, C, self.chunk_size, D=D, z=None, dt_bias=self.dt_bias if dt_in_scan else None,
                initial_states=None if init is None else init.float(), dt_softplus=dt_in_scan,
                dt_limit=self.dt_limit, return_final_states=True)
        else:
            y, final = ssd_chunked(x, dt, A, B, C, self.chunk_size, D=D, initial_state=init)
        if cache is not None:
            cache.ssm_state.copy_(final.detach())
            cache.empty = False
        return self._out(y.reshape(b, l, self.d_inner), z, "gated_norm" in fused)

    def _conv(self, xBC: torch.Tensor, cache: MambaCache | None, fast: bool, train_conv: bool = False) -> torch.Tensor:
        """Causal depthwise conv + SiLU over (B, L, conv_dim); with a cache, continue from and refill it.
        ``train_conv``: without a cache, the Triton conv with its backward (triton_conv_train.py)."""
        l = xBC.shape[1]
        w = self.conv1d.weight
        if cache is None and fast and train_conv and self.d_conv == 4:
            from .triton_conv_train import causal_conv_silu

            return causal_conv_silu(xBC, w.squeeze(1), self.conv1d.bias)
        if cache is not None and fast and not torch.is_grad_enabled() and kernels.causal_conv_ok(cache.conv_state):
            # one Triton pass in the (B, L, C) layout, reading the cache; then the last d_conv inputs refill it
            out = kernels.causal_conv(xBC, None if cache.empty else cache.conv_state, w.squeeze(1), self.conv1d.bias)
            if l >= self.d_conv:
                tail = xBC[:, -self.d_conv:].transpose(1, 2)
            else:
                tail = torch.cat([self._conv_window(cache, xBC.dtype), xBC.transpose(1, 2)], -1)[..., -self.d_conv:]
            cache.conv_state.copy_(tail)
            return out
        xt = xBC.transpose(1, 2)
        if cache is None:
            ops = kernels.fast_ops() if fast else None
            if ops is not None and ops.conv1d_fn is not None:
                return ops.conv1d_fn(xt, w.squeeze(1), self.conv1d.bias, activation="silu").transpose(1, 2)
            out = F.conv1d(xt, w, self.conv1d.bias, padding=self.d_conv - 1, groups=self.conv_dim)[..., :l]
        else:
            full = torch.cat([self._conv_window(cache, xt.dtype), xt], dim=-1)  # the last d_conv inputs, then these
            cache.conv_state.copy_(full[..., -self.d_conv:].detach())
            out = F.conv1d(full[..., 1:], w, self.conv1d.bias, groups=self.conv_dim)
        return F.silu(out).transpose(1, 2)

    def can_fold_norm(self) -> bool:
        """Whether ``step(fold_norm=True)`` applies: a gated RMSNorm over one group, gate before the norm."""
        return self.rmsnorm and not self.norm.norm_before_gate and self.ngroups == 1

    @staticmethod
    def _conv_window(cache: MambaCache, dtype: torch.dtype) -> torch.Tensor:
        """The conv state as the inputs before this prefill (zeros for an empty cache, whatever it holds)."""
        return torch.zeros_like(cache.conv_state, dtype=dtype) if cache.empty else cache.conv_state.to(dtype)

    def step(self, u: torch.Tensor, cache: MambaCache, mask: torch.Tensor | None = None,
             use_kernels: bool | None = None, in_proj_weight: torch.Tensor | None = None,
             conv_kernel: bool | None = None, fold_norm: bool = False):
        """One token: u (B, 1, d_model); conv and SSM states updated in place. mask (B,): False = skip.
        ``in_proj_weight``: one matrix product with it (and in_proj's bias) instead of calling in_proj.
        ``fold_norm`` (the one-pass kernel path, ``can_fold_norm``): returns (out, sumsq) where the output is
        out * kernels.norm_scale(sumsq, d_inner, eps): the gated norm's row scale is left to the caller."""
        fast = kernels.use_fast(self.kernel, u) if use_kernels is None else use_kernels
        ops = kernels.fast_ops() if fast else None
        cache.empty = False
        z, xBC, dt_raw = self._split(self._in_proj(u[:, 0], in_proj_weight))
        # the one-pass Triton state update can apply dt's softplus and A = -exp(A_log) itself (kernels.FUSE_DT_A)
        raw = ops is not None and mask is None and kernels.fuses_dt_a()
        dt = None if raw else self._dt(dt_raw)
        if conv_kernel is None:  # the kernel has no backward: never while recording gradients
            conv_kernel = not torch.is_grad_enabled() and kernels.conv_kernel_ok(cache.conv_state)
        if conv_kernel and mask is None:
            xBC = kernels.conv_update(cache.conv_state, xBC, self.conv1d.weight.squeeze(1), self.conv1d.bias)
        elif ops is not None and ops.conv1d_update is not None and mask is None:
            xBC = ops.conv1d_update(xBC, cache.conv_state, self.conv1d.weight.squeeze(1), self.conv1d.bias,
                                    activation="silu")
        else:
            old = cache.conv_state
            new = torch.cat([old[..., 1:], xBC[..., None].to(old.dtype)], dim=-1)
            if mask is not None:
                new = torch.where(mask[:, None, None], new, old)
            old.copy_(new.detach())
            xBC = (new * self.conv1d.weight.squeeze(1)).sum(-1)
            if self.conv1d.bias is not None:
                xBC = xBC + self.conv1d.bias
            xBC = F.silu(xBC).to(z.dtype)
        if mask is not None:
            xBC, dt = xBC * mask[:, None].to(xBC.dtype), dt * mask[:, None].to(dt.dtype)
        x, B, C = torch.split(xBC, [self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        b = x.shape[0]
        x = x.reshape(b, self.nheads, self.headdim)
        B = B.reshape(b, self.ngroups, self.d_state)
        C = C.reshape(b, self.ngroups, self.d_state)
        D = self.D.reshape(self.nheads, self.headdim) if self.D_has_hdim else self.D
        if fold_norm:
            if not (raw and self.can_fold_norm()):
                raise ValueError("Mamba2.step: fold_norm needs the one-pass kernel path and a one-group gated norm")
            g, sumsq = kernels.state_update_gated(cache.ssm_state, x, dt_raw, self.dt_bias, self.A_log, B, C, D,
                                                  z.reshape(b, self.nheads, self.headdim), self.norm.weight,
                                                  float(self.dt_limit[0]), float(self.dt_limit[1]))
            return self.out_proj(g.reshape(b, 1, self.d_inner).to(self.out_proj.weight.dtype)), sumsq
        if raw:
            y = kernels.state_update_raw(cache.ssm_state, x, dt_raw, self.dt_bias, self.A_log, B, C, D,
                                         float(self.dt_limit[0]), float(self.dt_limit[1]))
        else:
            A = -torch.exp(_up(self.A_log))
            step = kernels.state_update if ops is not None else ssd_step
            y = step(cache.ssm_state, x, dt, A, B, C, D)
        return self._out(y.reshape(b, 1, self.d_inner), z[:, None])
