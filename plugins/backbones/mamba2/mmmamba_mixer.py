"""The mmMamba mixer: Mamba-2 in the form an attention layer maps into (a sibling of ``mixer.Mamba2``).

Training form (names as mmMamba's student layer): the attention's ``q_proj`` / ``k_proj`` / ``v_proj`` (grouped
query: ``num_kv_heads``) and ``o_proj``; a causal depthwise ``conv1d`` (width 2, bias) + SiLU over the channels
[v, k, q]; ``in_proj`` d_model -> heads (no bias) for dt = softplus(in_proj(u) + dt_bias); A = -exp(A_log_bias).
The SSD scan runs with x = v, B = k and C = q per head, the kv heads repeated (head h reads kv head h // G), so
d_state = headdim = head_dim and there are as many B/C groups as heads; no D skip, no RoPE, no 1/sqrt(d). The scan's
output goes through one RMSNorm per head (a single ``g_norm`` weight of head_dim shared by all heads), then the gate
silu(g_proj(u)), then o_proj.

With the decay off (A = 0) and the conv passing the current token, this is causal linear attention over the
attention's own projections (SiLU feature map, each step weighted by dt), which is why an attention layer seeds it
(``from_attention``). Same interface as ``Mamba2``: ``forward`` (chunked scan; with a cache it continues from and
refills it), ``step`` (one token), ``allocate_cache`` (``MambaCache``: conv (B, conv_dim, width), SSM state
(B, heads, head_dim, head_dim)).

The released inference checkpoints pack the input projections into one matrix, ``wvkqgdt.weight`` = rows
[v, k, q, g, dt]; ``pack_inference`` / ``unpack_inference`` convert between that form and this one.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from omnicore.convert.strict import check_tensors
from omnicore.errors import CheckpointError, ParamError

from . import kernels
from .mixer import Mamba2
from .norm import RMSNorm
from .ssd import ssd_chunked, ssd_step
from .state import MambaCache


def _up(t: torch.Tensor) -> torch.Tensor:
    """At least float32 (float64 stays float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class MMambaMixer(nn.Module):
    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int | None = None, head_dim: int | None = None,
                 conv_width: int = 2, chunk_size: int = 128, qkv_bias: bool = False, o_bias: bool = False,
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 0.001, A_log_init: float = 1.0,
                 gate_gain: float = 2 ** -2.5, norm_eps: float = 1e-5, layer_idx: int | None = None,
                 kernel: str = "auto", device=None, dtype=None) -> None:
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if head_dim is None:
            if d_model % num_heads:
                raise ValueError(f"mmmamba: d_model {d_model} is not a multiple of num_heads {num_heads}; "
                                 "give head_dim")
            head_dim = d_model // num_heads
        if min(d_model, num_heads, num_kv_heads, head_dim, conv_width, chunk_size) < 1:
            raise ValueError("mmmamba: d_model, num_heads, num_kv_heads, head_dim, conv_width and chunk_size must "
                             "be positive")
        if num_heads % num_kv_heads:
            raise ValueError(f"mmmamba: num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"mmmamba: need 0 < dt_min <= dt_max; got dt_min {dt_min}, dt_max {dt_max}")
        kernels.check_kernel(kernel)
        self.d_model, self.num_heads, self.num_kv_heads, self.head_dim = d_model, num_heads, num_kv_heads, head_dim
        self.groups = num_heads // num_kv_heads  # query heads per kv head
        self.chunk_size, self.kernel, self.layer_idx = chunk_size, kernel, layer_idx
        self.dt_range, self.dt_init_floor = (dt_min, dt_max), dt_init_floor
        self.A_log_init, self.gate_gain = A_log_init, gate_gain
        self.d_inner = num_heads * head_dim
        self.kv_dim = num_kv_heads * head_dim
        # names Mamba2's sequence conv (reused below) reads
        self.d_conv = conv_width
        self.conv_dim = 2 * self.kv_dim + self.d_inner  # [v, k, q]

        self.q_proj = nn.Linear(d_model, self.d_inner, bias=qkv_bias, **fk)
        self.k_proj = nn.Linear(d_model, self.kv_dim, bias=qkv_bias, **fk)
        self.v_proj = nn.Linear(d_model, self.kv_dim, bias=qkv_bias, **fk)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, conv_width, groups=self.conv_dim,
                                padding=conv_width - 1, bias=True, **fk)
        self.in_proj = nn.Linear(d_model, num_heads, bias=False, **fk)  # dt
        self.g_proj = nn.Linear(d_model, self.d_inner, bias=False, **fk)
        self.g_norm = RMSNorm(head_dim, eps=norm_eps, **fk)
        self.dt_bias = nn.Parameter(torch.empty(num_heads, **fk))
        self.A_log_bias = nn.Parameter(torch.empty(num_heads, **fk))
        for p in (self.dt_bias, self.A_log_bias):
            p._no_weight_decay = True
        self.o_proj = nn.Linear(self.d_inner, d_model, bias=o_bias, **fk)
        self.init_new_parameters()

    # ---- initialisation and seeding --------------------------------------------------------------------
    @torch.no_grad()
    def init_new_parameters(self, generator: torch.Generator | None = None) -> None:
        """mmMamba's initialisation of everything an attention layer does not provide: the conv passes the current
        token (last tap 1, others and bias 0), in_proj zero (dt = softplus(dt_bias)), dt log-uniform in
        [dt_min, dt_max] (at least dt_init_floor) stored as its inverse softplus, A_log_bias = A_log_init,
        g_proj xavier-uniform with gain ``gate_gain``, g_norm ones."""
        self.conv1d.weight.zero_()
        self.conv1d.weight[:, 0, -1] = 1.0
        self.conv1d.bias.zero_()
        self.in_proj.weight.zero_()
        lo, hi = self.dt_range
        u = torch.rand(self.num_heads, generator=generator, dtype=torch.float64,
                       device=None if generator is None else generator.device)
        dt = torch.exp(u * (math.log(hi) - math.log(lo)) + math.log(lo)).clamp(min=self.dt_init_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        self.A_log_bias.fill_(self.A_log_init)
        bound = self.gate_gain * math.sqrt(6.0 / (self.d_model + self.d_inner))  # xavier_uniform_'s bound
        w = torch.rand(self.g_proj.weight.shape, generator=generator, dtype=torch.float64,
                       device=None if generator is None else generator.device)
        self.g_proj.weight.copy_(w * (2 * bound) - bound)
        self.g_norm.weight.fill_(1.0)

    @classmethod
    def from_attention(cls, teacher_layer: nn.Module, conv_width: int = 2, chunk_size: int = 128,
                       dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 0.001,
                       A_log_init: float = 1.0, gate_gain: float = 2 ** -2.5, kernel: str = "auto",
                       layer_idx: int | None = None, generator: torch.Generator | None = None) -> "MMambaMixer":
        """A mixer seeded from a Transformer attention layer (transformers' LlamaAttention / Qwen2Attention form:
        q_proj, k_proj, v_proj, o_proj and a config with num_attention_heads, num_key_value_heads): q/k/v and o_proj
        copied (biases too), the rest as ``init_new_parameters``; same dtype and device as the teacher's q_proj."""
        shape = attention_shape(teacher_layer)
        w = teacher_layer.q_proj.weight
        mixer = cls(shape["d_model"], shape["num_heads"], shape["num_kv_heads"], shape["head_dim"],
                    conv_width=conv_width, chunk_size=chunk_size, qkv_bias=shape["qkv_bias"],
                    o_bias=shape["o_bias"], dt_min=dt_min, dt_max=dt_max, dt_init_floor=dt_init_floor,
                    A_log_init=A_log_init, gate_gain=gate_gain, layer_idx=layer_idx, kernel=kernel,
                    device=w.device, dtype=w.dtype)
        if generator is not None:
            mixer.init_new_parameters(generator)
        with torch.no_grad():
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                src, dst = getattr(teacher_layer, name), getattr(mixer, name)
                dst.weight.copy_(src.weight)
                if dst.bias is not None:
                    dst.bias.copy_(src.bias)
        return mixer

    # ---- shared pieces ------------------------------------------------------------------------------
    # the causal conv over a sequence, continuing from / refilling a cache: Mamba2's, which reads only conv1d,
    # d_conv and conv_dim (its Triton conv takes width 4 only, so width 2 runs causal-conv1d's kernel or PyTorch)
    _conv = Mamba2._conv
    _conv_window = staticmethod(Mamba2._conv_window)

    def can_fold_norm(self) -> bool:
        """The compiled decode step's folded gated norm (one group, gate first) is Mamba2's alone."""
        return False

    def _vkq(self, u: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.v_proj(u), self.k_proj(u), self.q_proj(u)], dim=-1)

    def _dt(self, u: torch.Tensor) -> torch.Tensor:
        return F.softplus(_up(self.in_proj(u)) + _up(self.dt_bias))

    def _heads(self, vkq: torch.Tensor):
        """[v, k, q] (..., conv_dim) -> x, B, C (..., heads, head_dim), v and k repeated from the kv heads."""
        v, k, q = torch.split(vkq, [self.kv_dim, self.kv_dim, self.d_inner], dim=-1)
        lead, d = vkq.shape[:-1], self.head_dim
        v = v.reshape(*lead, self.num_kv_heads, d).repeat_interleave(self.groups, dim=-2)
        k = k.reshape(*lead, self.num_kv_heads, d).repeat_interleave(self.groups, dim=-2)
        return v, k, q.reshape(*lead, self.num_heads, d)

    def _A(self) -> torch.Tensor:
        return -torch.exp(_up(self.A_log_bias))

    def _gated(self, y: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """y (..., heads, head_dim): per-head RMSNorm, then the gate silu(g_proj(u)); heads concatenated."""
        gate = F.silu(self.g_proj(u))
        return self.g_norm(y).reshape(*y.shape[:-2], self.d_inner) * gate.to(self.g_norm.weight.dtype)

    def _out(self, y: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """The gated heads (``_gated``) through o_proj."""
        return self.o_proj(self._gated(y, u).to(self.o_proj.weight.dtype))

    def allocate_cache(self, batch_size: int, dtype=None, device=None) -> MambaCache:
        device = device or self.o_proj.weight.device
        conv = torch.zeros(batch_size, self.conv_dim, self.d_conv, device=device,
                           dtype=dtype or self.conv1d.weight.dtype)
        ssm = torch.zeros(batch_size, self.num_heads, self.head_dim, self.head_dim, device=device,
                          dtype=dtype or self.in_proj.weight.dtype)
        return MambaCache(conv, ssm, empty=True)

    # ---- forward ------------------------------------------------------------------------------------
    def forward(self, u: torch.Tensor, cache: MambaCache | None = None, mask: torch.Tensor | None = None,
                use_kernels: bool | None = None, in_proj_weight: torch.Tensor | None = None,
                conv_kernel: bool | None = None) -> torch.Tensor:
        """u (B, L, d_model) -> (B, L, d_model). mask (B, L) bool: False positions leave the cache untouched (left
        padding). With a cache and one token: ``step``. ``use_kernels`` / ``conv_kernel``: as Mamba2.forward;
        ``in_proj_weight`` (a merged LoRA weight) does not apply here: the mixer carries no task adapters."""
        if in_proj_weight is not None:
            raise ValueError("MMambaMixer has no task adapters: in_proj_weight must be None")
        if cache is not None and u.shape[1] == 1:
            return self.step(u, cache, None if mask is None else mask[:, 0], use_kernels)
        return self._out(self._scan(u, cache, mask), u)

    def heads(self, u: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The output before o_proj over a whole sequence (no cache): ``(B, L, heads * head_dim)``, the gated,
        normalised heads that layerwise distillation compares with the teacher attention's heads."""
        return self._gated(self._scan(u, None, mask), u)

    def _scan(self, u: torch.Tensor, cache: MambaCache | None, mask: torch.Tensor | None) -> torch.Tensor:
        """Projections, conv and the chunked scan of a sequence: y (B, L, heads, head_dim)."""
        fast = kernels.use_fast(self.kernel, u)
        vkq, dt = self._vkq(u), self._dt(u)
        m = None if mask is None else mask[..., None].to(vkq.dtype)
        if m is not None:  # padded steps: no input, dt 0 (no decay)
            vkq, dt = vkq * m, dt * m.to(dt.dtype)
        vkq = self._conv(vkq, cache, fast)
        if m is not None:
            vkq = vkq * m
        x, B, C = self._heads(vkq)
        A = self._A()
        init = None if cache is None or cache.empty else cache.ssm_state
        if fast:
            y, final = kernels.fast_ops().chunk_scan(
                x, dt, A, B, C, self.chunk_size, D=None, z=None, dt_bias=None,
                initial_states=None if init is None else init.float(), dt_softplus=False, return_final_states=True)
        else:
            y, final = ssd_chunked(x, dt, A, B, C, self.chunk_size, initial_state=init)
        if cache is not None:
            cache.ssm_state.copy_(final.detach())
            cache.empty = False
        return y

    def step(self, u: torch.Tensor, cache: MambaCache, mask: torch.Tensor | None = None,
             use_kernels: bool | None = None) -> torch.Tensor:
        """One token: u (B, 1, d_model) -> (B, 1, d_model); conv and SSM states updated in place. mask (B,):
        False rows leave both states as they were."""
        fast = kernels.use_fast(self.kernel, u) if use_kernels is None else use_kernels
        ops = kernels.fast_ops() if fast else None
        cache.empty = False
        u0 = u[:, 0]
        vkq, dt = self._vkq(u0), self._dt(u0)
        w = self.conv1d.weight.squeeze(1)
        if ops is not None and ops.conv1d_update is not None and mask is None:
            vkq = ops.conv1d_update(vkq, cache.conv_state, w, self.conv1d.bias, activation="silu")
        else:
            old = cache.conv_state
            new = torch.cat([old[..., 1:], vkq[..., None].to(old.dtype)], dim=-1)
            if mask is not None:
                new = torch.where(mask[:, None, None], new, old)
            old.copy_(new.detach())
            vkq = F.silu((new * w).sum(-1) + self.conv1d.bias).to(vkq.dtype)
        if mask is not None:
            vkq, dt = vkq * mask[:, None].to(vkq.dtype), dt * mask[:, None].to(dt.dtype)
        x, B, C = self._heads(vkq)
        A = self._A()
        if ops is not None:  # the one-pass state update wants a D: zeros (this mixer has no skip)
            y = kernels.state_update(cache.ssm_state, x, dt, A, B, C, A.new_zeros(self.num_heads))
        else:
            y = ssd_step(cache.ssm_state, x, dt, A, B, C)
        return self._out(y[:, None], u)


# ---- the attention layer a mixer is seeded from ------------------------------------------------------------
def attention_shape(layer: nn.Module) -> dict:
    """d_model, num_heads, num_kv_heads, head_dim, qkv_bias, o_bias of a transformers attention module (Llama form);
    ParamError naming what does not fit."""
    kind = type(layer).__name__
    projs = {}
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        p = getattr(layer, name, None)
        if not isinstance(p, nn.Linear):
            raise ParamError(f"distill.seed: teacher layer {kind} has no linear {name}; an attention module in "
                             "Llama form (q_proj, k_proj, v_proj, o_proj) is needed")
        projs[name] = p
    for name in ("q_norm", "k_norm"):
        if getattr(layer, name, None) is not None:
            raise ParamError(f"distill.seed: teacher layer {kind} normalises queries/keys ({name}); the mmMamba "
                             "mixer has no q/k norm to carry it")
    config = getattr(layer, "config", None)
    heads = getattr(config, "num_attention_heads", None)
    if not isinstance(heads, int) or heads < 1:
        raise ParamError(f"distill.seed: teacher layer {kind} has no config.num_attention_heads")
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    d_model = projs["q_proj"].in_features
    head_dim = getattr(layer, "head_dim", None) or getattr(config, "head_dim", None) or d_model // heads
    want = {"q_proj": (heads * head_dim, d_model), "k_proj": (kv_heads * head_dim, d_model),
            "v_proj": (kv_heads * head_dim, d_model), "o_proj": (d_model, heads * head_dim)}
    for name, shape in want.items():
        got = tuple(projs[name].weight.shape)
        if got != shape:
            raise ParamError(f"distill.seed: teacher layer {kind}: {name}.weight is {got}, but num_attention_heads "
                             f"{heads}, num_key_value_heads {kv_heads}, head_dim {head_dim} and hidden size "
                             f"{d_model} need {shape}")
    if heads % kv_heads:
        raise ParamError(f"distill.seed: teacher layer {kind}: num_attention_heads {heads} is not a multiple of "
                         f"num_key_value_heads {kv_heads}")
    biases = [projs[n].bias is not None for n in ("q_proj", "k_proj", "v_proj")]
    if len(set(biases)) > 1:
        raise ParamError(f"distill.seed: teacher layer {kind}: q/k/v biases {biases}: all or none are needed")
    return {"d_model": d_model, "num_heads": heads, "num_kv_heads": kv_heads, "head_dim": head_dim,
            "qkv_bias": biases[0], "o_bias": projs["o_proj"].bias is not None}


# ---- the released checkpoints' packed form -----------------------------------------------------------------
def pack_inference(mixer: MMambaMixer) -> dict[str, torch.Tensor]:
    """The mixer's weights in the released inference layout (keys under a layer's ``attention.``):
    ``wvkqgdt.weight`` = rows [v, k, q, g, dt] (a bias of the same rows when q/k/v have biases, zero for g and dt),
    ``conv1d.weight``/``.bias``, ``g_norm_swish_gate.weight``, ``dt_bias``, ``A_log_bias``, ``o_proj.weight``
    (and ``o_proj.bias`` when present)."""
    m = mixer
    out = {"wvkqgdt.weight": torch.cat([m.v_proj.weight, m.k_proj.weight, m.q_proj.weight, m.g_proj.weight,
                                        m.in_proj.weight]),
           "conv1d.weight": m.conv1d.weight, "conv1d.bias": m.conv1d.bias,
           "g_norm_swish_gate.weight": m.g_norm.weight, "dt_bias": m.dt_bias, "A_log_bias": m.A_log_bias,
           "o_proj.weight": m.o_proj.weight}
    if m.q_proj.bias is not None:
        zeros = m.q_proj.bias.new_zeros(m.d_inner + m.num_heads)
        out["wvkqgdt.bias"] = torch.cat([m.v_proj.bias, m.k_proj.bias, m.q_proj.bias, zeros])
    if m.o_proj.bias is not None:
        out["o_proj.bias"] = m.o_proj.bias
    return {k: v.detach().clone() for k, v in out.items()}


def _packed_shapes(m: MMambaMixer) -> dict[str, torch.Size]:
    rows = 2 * m.kv_dim + 2 * m.d_inner + m.num_heads
    shapes = {"wvkqgdt.weight": torch.Size([rows, m.d_model]), "conv1d.weight": m.conv1d.weight.shape,
              "conv1d.bias": m.conv1d.bias.shape, "g_norm_swish_gate.weight": m.g_norm.weight.shape,
              "dt_bias": m.dt_bias.shape, "A_log_bias": m.A_log_bias.shape, "o_proj.weight": m.o_proj.weight.shape}
    if m.q_proj.bias is not None:
        shapes["wvkqgdt.bias"] = torch.Size([rows])
    if m.o_proj.bias is not None:
        shapes["o_proj.bias"] = m.o_proj.bias.shape
    return shapes


def unpack_inference(packed: Mapping[str, torch.Tensor], mixer: MMambaMixer,
                     where: str = "mmMamba weights") -> dict[str, torch.Tensor]:
    """``pack_inference``'s inverse: the mixer's own state dict (``q_proj.weight``, ...) from the packed tensors,
    checked against ``mixer``'s shapes (one-line CheckpointError starting with ``where``). A packed bias must be
    zero on the g and dt rows, which have no bias here."""
    m = mixer
    check_tensors(packed, {k: tuple(v) for k, v in _packed_shapes(m).items()}, where)
    sizes = [m.kv_dim, m.kv_dim, m.d_inner, m.d_inner, m.num_heads]
    v, k, q, g, dt = torch.split(packed["wvkqgdt.weight"], sizes)
    out = {"v_proj.weight": v, "k_proj.weight": k, "q_proj.weight": q, "g_proj.weight": g, "in_proj.weight": dt,
           "conv1d.weight": packed["conv1d.weight"], "conv1d.bias": packed["conv1d.bias"],
           "g_norm.weight": packed["g_norm_swish_gate.weight"], "dt_bias": packed["dt_bias"],
           "A_log_bias": packed["A_log_bias"], "o_proj.weight": packed["o_proj.weight"]}
    if "wvkqgdt.bias" in packed:
        vb, kb, qb, gb, dtb = torch.split(packed["wvkqgdt.bias"], sizes)
        if gb.count_nonzero() or dtb.count_nonzero():
            raise CheckpointError(f"{where}: wvkqgdt.bias is not zero on its g and dt rows; the mixer's g_proj and "
                                  "in_proj have no bias")
        out.update({"v_proj.bias": vb, "k_proj.bias": kb, "q_proj.bias": qb})
    if "o_proj.bias" in packed:
        out["o_proj.bias"] = packed["o_proj.bias"]
    return {k: t.contiguous() for k, t in out.items()}


def inference_config(packed: Mapping[str, torch.Tensor], where: str = "mmMamba weights") -> dict:
    """The mixer options a packed layer describes (d_model, num_heads, num_kv_heads, head_dim, conv_width,
    qkv_bias, o_bias), read from its shapes; CheckpointError when they do not describe one."""
    need = ("wvkqgdt.weight", "conv1d.weight", "g_norm_swish_gate.weight", "dt_bias", "o_proj.weight")
    missing = [k for k in need if k not in packed]
    if missing:
        raise CheckpointError(f"{where}: missing tensor {missing[0]!r} of the packed mmMamba layer")
    rows, d_model = packed["wvkqgdt.weight"].shape
    heads, head_dim = packed["dt_bias"].shape[0], packed["g_norm_swish_gate.weight"].shape[0]
    conv_dim, _, width = packed["conv1d.weight"].shape
    kv_dim2 = conv_dim - heads * head_dim
    if (heads < 1 or head_dim < 1 or kv_dim2 <= 0 or kv_dim2 % (2 * head_dim)
            or rows != conv_dim + heads * head_dim + heads):
        raise CheckpointError(f"{where}: wvkqgdt.weight {tuple(packed['wvkqgdt.weight'].shape)}, conv1d.weight "
                              f"{tuple(packed['conv1d.weight'].shape)}, dt_bias ({heads},) and g_norm_swish_gate."
                              f"weight ({head_dim},) do not describe one mmMamba layer")
    return {"d_model": d_model, "num_heads": heads, "num_kv_heads": kv_dim2 // (2 * head_dim), "head_dim": head_dim,
            "conv_width": width, "qkv_bias": "wvkqgdt.bias" in packed, "o_bias": "o_proj.bias" in packed}
