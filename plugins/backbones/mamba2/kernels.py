"""Kernel choice for the Mamba-2 mixer: ``auto`` | ``torch`` | ``mamba_ssm``.

mamba_ssm's Triton kernels (``mamba_chunk_scan_combined`` for training/prefill, ``selective_state_update`` for
decoding) are used on CUDA when they import; causal-conv1d's kernels too when installed. Nothing here imports
mamba_ssm at module import time, and ``auto`` never fails: without CUDA or mamba_ssm it is the PyTorch path.

PyPI's mamba_ssm imports its compiled Mamba-1 extension ``selective_scan_cuda`` from the package ``__init__``,
which a pure-Python build (``MAMBA_SKIP_CUDA_BUILD=TRUE``) lacks although Mamba-2 needs only Triton. When that is
the only problem, a stand-in module takes that name (it raises if anything in it is called) and only the
``mamba_ssm.ops.triton`` modules are imported, through a bare package object that skips the heavy ``__init__``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional

import torch

KernelName = Literal["auto", "torch", "mamba_ssm"]
KERNELS = ("auto", "torch", "mamba_ssm")


@dataclass(frozen=True)
class FastOps:
    chunk_scan: Callable[..., Any]  # mamba_chunk_scan_combined
    state_update: Callable[..., Any]  # selective_state_update
    conv1d_fn: Callable[..., Any] | None  # causal_conv1d_fn (None: PyTorch conv)
    conv1d_update: Callable[..., Any] | None  # causal_conv1d_update
    add_norm: Callable[..., Any]  # layer_norm_fn: residual add + (RMS)norm, forward and backward in Triton
    gated_norm: Callable[..., Any]  # layernorm_gated.rmsnorm_fn: norm(x * silu(z)) in Triton


_cache: dict[str, Any] = {}


class _MissingExtension(types.ModuleType):
    """Stands in for a compiled extension that was not built; any use raises."""

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        raise RuntimeError(f"{self.__name__} is a stand-in installed by omnicore (mamba_ssm was built without its "
                           f"CUDA extensions); {self.__name__}.{attr} is not available. Mamba-2 needs only the "
                           "Triton kernels.")


def _import_triton_ops() -> FastOps:
    """Import the Triton ops, bypassing mamba_ssm/__init__.py when it cannot be imported."""
    if importlib.util.find_spec("mamba_ssm") is None:
        raise ImportError("the mamba_ssm package is not installed (pip install mamba-ssm; see README 'GPU install')")
    if importlib.util.find_spec("triton") is None:
        raise ImportError("triton is not installed")
    reason = None
    if "mamba_ssm" not in sys.modules:
        try:
            importlib.import_module("mamba_ssm")
        except ImportError as exc:
            reason = exc
            if getattr(exc, "name", None) == "selective_scan_cuda" or "selective_scan_cuda" in str(exc):
                sys.modules.setdefault("selective_scan_cuda", _MissingExtension("selective_scan_cuda"))
        except Exception as exc:  # e.g. an optional dependency of mamba_ssm's models failing
            reason = exc
    if "mamba_ssm" not in sys.modules:  # a bare package: submodules import without running __init__
        spec = importlib.util.find_spec("mamba_ssm")
        shell = types.ModuleType("mamba_ssm")
        shell.__path__ = list(spec.submodule_search_locations or [])
        shell.__spec__ = spec
        shell.__file__ = spec.origin
        sys.modules["mamba_ssm"] = shell
    try:
        ssd = importlib.import_module("mamba_ssm.ops.triton.ssd_combined")
        ssu = importlib.import_module("mamba_ssm.ops.triton.selective_state_update")
        ln = importlib.import_module("mamba_ssm.ops.triton.layer_norm")
        lng = importlib.import_module("mamba_ssm.ops.triton.layernorm_gated")
    except Exception as exc:
        extra = f" (import mamba_ssm said: {reason})" if reason else ""
        raise ImportError(f"mamba_ssm's Triton kernels do not import: {type(exc).__name__}: {exc}{extra}") from exc
    try:
        from causal_conv1d import causal_conv1d_fn, causal_conv1d_update
    except Exception:
        causal_conv1d_fn = causal_conv1d_update = None
    return FastOps(ssd.mamba_chunk_scan_combined, ssu.selective_state_update, causal_conv1d_fn, causal_conv1d_update,
                   ln.layer_norm_fn, lng.rmsnorm_fn)


def fast_ops() -> FastOps:
    """mamba_ssm's kernels, imported once; ImportError (one line, naming what is missing) when unusable."""
    if "ops" not in _cache:
        try:
            _cache["ops"] = _import_triton_ops()
        except ImportError as exc:
            _cache["ops"] = exc
    ops = _cache["ops"]
    if isinstance(ops, Exception):
        raise ImportError(str(ops))
    return ops


def mamba_ssm_available() -> bool:
    import torch

    if not torch.cuda.is_available():
        return False
    try:
        fast_ops()
        return True
    except ImportError:
        return False


def check_kernel(kernel: str) -> None:
    """Validate a kernel name; for an explicit ``mamba_ssm`` make sure it can be used."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(KERNELS)}; got {kernel!r}")
    if kernel == "mamba_ssm":
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("kernel='mamba_ssm' needs CUDA, which is not available here; use kernel='auto' or 'torch'")
        try:
            fast_ops()
        except ImportError as exc:
            raise RuntimeError(f"kernel='mamba_ssm' is not usable: {exc}") from None


def use_fast(kernel: str, tensor) -> bool:
    """Whether a call on ``tensor`` takes mamba_ssm's kernels."""
    if kernel == "torch":
        return False
    if not tensor.is_cuda:
        if kernel == "mamba_ssm":
            raise RuntimeError("kernel='mamba_ssm' needs CUDA tensors; move the model to a GPU or use kernel='auto'")
        return False
    if kernel == "mamba_ssm":
        fast_ops()
        return True
    return mamba_ssm_available()  # auto


# Which one-pass decode state update the kernel path runs: "triton" (triton_step.py, wider tiles) or "mamba_ssm"
# (its selective_state_update). benchmarks/profile_decode.py compares the two.
STATE_UPDATE_IMPL = "triton"


# The fused state update as a torch custom op: opaque to torch.compile (which would otherwise trace into the Triton
# launcher), so a compiled decode step keeps the one-pass kernel and fuses the element-wise work around it.
@torch.library.custom_op("omnicore::mamba2_state_update", mutates_args=("state",))
def state_update(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                 C: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """state (b, h, p, n) updated in place; x (b, h, p), dt (b, h), A (h,), B/C (b, g, n), D (h,) or (h, p)."""
    if STATE_UPDATE_IMPL == "triton":
        from .triton_step import state_update as triton_state_update

        return triton_state_update(state, x, dt, A, B, C, D)
    b, h, p = x.shape
    n = state.shape[-1]
    return fast_ops().state_update(state, x, dt[..., None].expand(b, h, p), A[:, None, None].expand(h, p, n), B, C,
                                   D=D if D.dim() == 2 else D[:, None].expand(h, p), z=None,
                                   dt_bias=dt.new_zeros(()).expand(h, p), dt_softplus=False)


@state_update.register_fake
def _(state, x, dt, A, B, C, D):
    return torch.empty_like(x)


# Whether the one-pass Triton state update also takes dt before its softplus and A as A_log (state_update_raw),
# so the compiled step has no separate element-wise kernels for them. benchmarks/profile_decode.py compares.
FUSE_DT_A = True


def fuses_dt_a() -> bool:
    return FUSE_DT_A and STATE_UPDATE_IMPL == "triton"


@torch.library.custom_op("omnicore::mamba2_state_update_raw", mutates_args=("state",))
def state_update_raw(state: torch.Tensor, x: torch.Tensor, dt_raw: torch.Tensor, dt_bias: torch.Tensor,
                     A_log: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor, dt_lo: float,
                     dt_hi: float) -> torch.Tensor:
    """``state_update`` with dt = clamp(softplus(dt_raw + dt_bias), dt_lo, dt_hi) and A = -exp(A_log) computed in
    the kernel (the Triton one-pass kernel only)."""
    from .triton_step import state_update as triton_state_update

    return triton_state_update(state, x, dt_raw, A_log, B, C, D, dt_bias=dt_bias, dt_limit=(dt_lo, dt_hi),
                               a_is_log=True)


@state_update_raw.register_fake
def _(state, x, dt_raw, dt_bias, A_log, B, C, D, dt_lo, dt_hi):
    return torch.empty_like(x)


# Below this batch the compiled step folds the mixer's gated RMSNorm into the state update (gate, weight and
# partial sums of squares in the kernel) and applies its per-row scale after out_proj, inside the next block's
# residual add: one kernel a layer fewer. Measured (H200, 1.3B shape, step in a CUDA graph): batch 1 1.586 ->
# 1.535 ms, but batch 64 3.412 -> 3.630 ms, so large batches keep the norm apart. 0: never.
# benchmarks/profile_decode.py compares.
FOLD_GATED_NORM_BELOW = 8


def folds_gated_norm(batch: int) -> bool:
    return batch < FOLD_GATED_NORM_BELOW and fuses_dt_a()


@torch.library.custom_op("omnicore::mamba2_state_update_gated", mutates_args=("state",))
def state_update_gated(state: torch.Tensor, x: torch.Tensor, dt_raw: torch.Tensor, dt_bias: torch.Tensor,
                       A_log: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor, z: torch.Tensor,
                       norm_weight: torch.Tensor, dt_lo: float, dt_hi: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``state_update_raw`` followed by the gated RMSNorm short of its row scale: (y * silu(z) * norm_weight,
    partial sums of (y * silu(z))^2 (b, k) float32); see triton_step.state_update and ``norm_scale``."""
    from .triton_step import state_update as triton_state_update

    return triton_state_update(state, x, dt_raw, A_log, B, C, D, dt_bias=dt_bias, dt_limit=(dt_lo, dt_hi),
                               a_is_log=True, z=z, norm_weight=norm_weight)


@state_update_gated.register_fake
def _(state, x, dt_raw, dt_bias, A_log, B, C, D, z, norm_weight, dt_lo, dt_hi):
    from .triton_step import STATE_BLOCK_P

    b, h, p = x.shape
    return torch.empty_like(x), x.new_empty(b, h * -(-p // STATE_BLOCK_P), dtype=torch.float32)


def norm_scale(sumsq: torch.Tensor, dim: int, eps: float) -> torch.Tensor:
    """The gated RMSNorm's per-row scale from ``state_update_gated``'s partial sums: (b, k) -> (b, 1, 1)."""
    return torch.rsqrt(sumsq.sum(-1) / dim + eps)[:, None, None]


# Programmatic dependent launch (Hopper and later): omnicore's decode kernels and, in the compiled step, Inductor's
# kernels are launched so that each may start while the kernel before it drains; each waits (griddepcontrol.wait)
# before it reads anything, then lets the next one launch. Measured (H200, 1.3B shape, step in a CUDA graph): the
# compiled step at batch 64 3.405 -> 3.297 ms, but the fused step at batch 1 1.166 -> 1.277 ms, hence PDL_MIN_BATCH
# (the fused step takes batches 1-2). Codes are bitwise those without it (tests/gpu/test_decode_engine.py::
# test_pdl_changes_no_code); a whole batch-64 generation 65.6 -> 67.0 images/s (bench_generation.py --ablate pdl).
PDL = True
PDL_MIN_BATCH = 3


def pdl_ok(device: torch.device, rows: int) -> bool:
    """Whether a decode kernel over ``rows`` batch rows on ``device`` launches with PDL: PDL on, rows at least
    PDL_MIN_BATCH, and ``pdl_supported``."""
    return PDL and rows >= PDL_MIN_BATCH and pdl_supported(device)


def pdl_supported(device: torch.device) -> bool:
    """CUDA of compute capability 9 or more, a triton whose launcher takes ``launch_pdl``, not Triton's CPU
    interpreter (looked up once a device)."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = ("pdl", index)
    if key not in _cache:
        ok = torch.cuda.get_device_capability(index)[0] >= 9 and triton_available()
        if ok:
            try:
                from triton.backends.nvidia.compiler import CUDAOptions
                from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: F401
            except ImportError:
                ok = False
            else:
                ok = "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})
        _cache[key] = ok
    return _cache[key]


# The decode step's conv-state shift + depthwise conv + SiLU: "triton" (one pass over the state, triton_step.py)
# or "torch" (the PyTorch step: window built, copied back, read again). benchmarks/profile_decode.py compares them.
CONV_UPDATE_IMPL = "triton"


def triton_available() -> bool:
    """Whether triton is installed (looked up once): omnicore's own decode kernels need only triton."""
    if "triton" not in _cache:
        _cache["triton"] = importlib.util.find_spec("triton") is not None
    return _cache["triton"]


def conv_kernel_ok(state: torch.Tensor) -> bool:
    """Whether the one-pass conv update can run on this conv state (CUDA, triton, d_conv 4)."""
    if CONV_UPDATE_IMPL != "triton" or not state.is_cuda or not triton_available():
        return False
    from .triton_step import conv_update_supported

    return conv_update_supported(state)


@torch.library.custom_op("omnicore::mamba2_conv_update", mutates_args=("state",))
def conv_update(state: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                bias: Optional[torch.Tensor]) -> torch.Tensor:
    """state (b, dim, 4) shifted in place with x (b, dim) appended -> silu(conv) (b, dim) in x's dtype; weight
    (dim, 4). An opaque op for torch.compile, like ``state_update``."""
    from .triton_step import conv_update as triton_conv_update

    return triton_conv_update(state, x, weight, bias, silu=True)


@conv_update.register_fake
def _(state, x, weight, bias):
    return x.new_empty(x.shape)


# The prefill's causal conv with a cache: "triton" (one pass in the (B, L, C) layout, triton_step.causal_conv) or
# "torch" (transpose, concatenation with the conv state, PyTorch depthwise conv, SiLU). benchmarks compare them.
PREFILL_CONV_IMPL = "triton"


def causal_conv_ok(state: torch.Tensor) -> bool:
    """Whether the Triton prefill conv can run with this conv state (CUDA, triton, d_conv 4)."""
    return PREFILL_CONV_IMPL == "triton" and conv_kernel_ok(state)


@torch.library.custom_op("omnicore::mamba2_causal_conv", mutates_args=())
def causal_conv(x: torch.Tensor, state: Optional[torch.Tensor], weight: torch.Tensor,
                bias: Optional[torch.Tensor]) -> torch.Tensor:
    """silu(causal depthwise conv) of x (b, l, dim) continuing from state (b, dim, 4) (None: zeros), which is only
    read -> (b, l, dim) contiguous; weight (dim, 4)."""
    from .triton_step import causal_conv as triton_causal_conv

    return triton_causal_conv(x, state, weight, bias, silu=True)


@causal_conv.register_fake
def _(x, state, weight, bias):
    return x.new_empty(x.shape)


# The prefill of a short prompt (at most triton_short_scan.MAX_LEN tokens) from an empty state, without a mask and
# without gradients: one Triton kernel (triton_short_scan.py) instead of mamba_ssm's chunked scan. False: the
# chunked scan as for longer prompts (benchmarks compare the two: bench_generation.py --ablate short-scan).
SHORT_SCAN = True


def short_scan_ok(x: torch.Tensor, seqlen: int) -> bool:
    """Whether the one-kernel short scan takes this prefill: SHORT_SCAN on, CUDA, triton, no gradients, a length
    and dtype it supports."""
    if not SHORT_SCAN or not x.is_cuda or not triton_available() or torch.is_grad_enabled():
        return False
    from .triton_short_scan import supported

    return supported(seqlen, x)


def short_scan(x, dt_raw, dt_bias, A_log, B, C, D, state_out, dt_limit):
    """triton_short_scan.short_scan: y (b, l, h, p); the final state written into ``state_out`` when given."""
    from .triton_short_scan import short_scan as triton_short_scan

    return triton_short_scan(x, dt_raw, dt_bias, A_log, B, C, D, state_out, dt_limit=tuple(dt_limit))
