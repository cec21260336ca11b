"""Built-in backbones: ``mamba2`` (pure PyTorch Mamba-2 with mamba_ssm's layout; hybrid attention optional; its
mixers Mamba-2's or mmMamba's), ``transformer`` (transformers' decoder layers) and ``student`` (a transformer stack
distilled into mmMamba mixers, some layers kept as attention). Built-in mixers: ``mmmamba`` (seeded from an
attention layer)."""

from __future__ import annotations

from typing import Any, Literal, Optional

from omnicore import hookimpl

from .transformer import build_text_lm, build_transformer
from .transformer.layouts import internvl_layout

# Public Mamba-2 checkpoints (state-spaces/mamba2-*), plus "tiny" for tests.
SIZES: dict[str, dict[str, int]] = {
    "tiny": {"d_model": 64, "n_layer": 2, "d_state": 16, "headdim": 16, "chunk_size": 16},
    "130m": {"d_model": 768, "n_layer": 24},
    "370m": {"d_model": 1024, "n_layer": 48},
    "780m": {"d_model": 1536, "n_layer": 48},
    "1.3b": {"d_model": 2048, "n_layer": 48},
    "2.7b": {"d_model": 2560, "n_layer": 64},
}


def build_mamba2(size: Optional[Literal["tiny", "130m", "370m", "780m", "1.3b", "2.7b"]] = None,
                 d_model: Optional[int] = None, n_layer: Optional[int] = None, d_state: Optional[int] = None,
                 d_conv: int = 4, expand: int = 2, headdim: Optional[int] = None, ngroups: int = 1,
                 chunk_size: Optional[int] = None, d_intermediate: int = 0, attn_layer_idx: list[int] = [],
                 attn_cfg: dict[str, Any] = {}, rms_norm: bool = True, residual_in_fp32: bool = True,
                 norm_epsilon: float = 1e-5, kernel: Literal["auto", "torch", "mamba_ssm"] = "auto",
                 compile_decode: Optional[bool] = None, lora: Optional[dict[str, Any]] = None, device: Optional[str] = None, dtype: Optional[str] = None,
                 mixer: Literal["mamba2", "mmmamba"] = "mamba2", mixer_cfg: dict[str, Any] = {},
                 fused_ops: Optional[list[Literal["add_norm", "gated_norm", "dt_softplus", "lora", "conv"]]] = None):
    """Mamba-2 backbone (mamba_ssm layout, PyTorch or Triton kernels, task LoRA, optional attention layers).

    ``compile_decode``: compile the one-token decode step with torch.compile (None: on CUDA for models at least
    1024 wide, unless the environment sets OMNICORE_COMPILE=0; the first generation then waits for compilation).
    ``mixer``: the non-attention layers' mixer, Mamba-2's (options d_state, d_conv, expand, headdim, ngroups,
    chunk_size) or ``mmmamba`` (mmMamba's, options in ``mixer_cfg``: num_heads, num_kv_heads, head_dim, conv_width,
    chunk_size, qkv_bias, o_bias).
    ``fused_ops``: the Triton kernels the chunked training path uses on CUDA with mamba_ssm (None:
    add_norm, gated_norm, dt_softplus, lora; also conv, the training conv, not yet measured; [] for none); the
    PyTorch path computes the same functions."""
    import torch

    from .mamba2 import Mamba2Backbone

    given = {"d_model": d_model, "n_layer": n_layer, "d_state": d_state, "headdim": headdim, "chunk_size": chunk_size}
    cfg = {"d_state": 128, "headdim": 64, "chunk_size": 256, **(SIZES[size] if size else {})}
    cfg.update({k: v for k, v in given.items() if v is not None})
    if "d_model" not in cfg or "n_layer" not in cfg:
        raise ValueError("mamba2: give a size (" + ", ".join(SIZES) + ") or both d_model and n_layer")
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if dtype is not None and not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"mamba2: unknown dtype {dtype!r}")
    ssm_cfg = {"d_state": cfg["d_state"], "d_conv": d_conv, "expand": expand, "headdim": cfg["headdim"],
               "ngroups": ngroups, "chunk_size": cfg["chunk_size"]}
    if mixer == "mmmamba":
        ssm_cfg = _mmmamba_cfg(mixer_cfg, given, lora)
    elif mixer_cfg:
        raise ValueError("mamba2: mixer_cfg is for mixer 'mmmamba'; Mamba-2 mixers take d_state, d_conv, expand, "
                         "headdim, ngroups and chunk_size")
    model = Mamba2Backbone(cfg["d_model"], cfg["n_layer"], ssm_cfg=ssm_cfg, d_intermediate=d_intermediate,
                           attn_layer_idx=list(attn_layer_idx), attn_cfg=dict(attn_cfg), rms_norm=rms_norm,
                           residual_in_fp32=residual_in_fp32, norm_epsilon=norm_epsilon, kernel=kernel,
                           compile_decode=compile_decode, mixer=mixer, device=device, dtype=torch_dtype,
                           **({} if fused_ops is None else {"fused_ops": tuple(fused_ops)}))
    if lora:
        unknown = set(lora) - {"tasks", "r", "alpha", "dropout", "target_modules"}
        if unknown:
            raise ValueError(f"mamba2: unknown lora keys {sorted(unknown)}; accepted: tasks, r, alpha, dropout, "
                             "target_modules")
        model.add_task_adapters(**lora)
    return model


MMAMBA_OPTIONS = ("num_heads", "num_kv_heads", "head_dim", "conv_width", "chunk_size", "qkv_bias", "o_bias")


def _mmmamba_cfg(mixer_cfg: dict[str, Any], given: dict[str, Any], lora: Optional[dict[str, Any]]) -> dict:
    unknown = sorted(set(mixer_cfg) - set(MMAMBA_OPTIONS))
    if unknown:
        raise ValueError(f"mamba2: unknown mixer_cfg keys {unknown} for mixer 'mmmamba'; accepted: "
                         + ", ".join(MMAMBA_OPTIONS))
    if "num_heads" not in mixer_cfg:
        raise ValueError("mamba2: mixer 'mmmamba' needs mixer_cfg.num_heads")
    ssm_only = [k for k in ("d_state", "headdim", "chunk_size") if given[k] is not None]
    if ssm_only:
        raise ValueError(f"mamba2: {', '.join(ssm_only)} set a Mamba-2 mixer; with mixer 'mmmamba' give its "
                         "options in mixer_cfg")
    if lora and "in_proj" in ([lora["target_modules"]] if isinstance(lora.get("target_modules"), str)
                              else list(lora.get("target_modules", ["in_proj"]))):
        raise ValueError("mamba2: lora on in_proj needs mixer 'mamba2' (mmMamba mixers carry no task adapters); "
                         "target fc1/fc2 instead")
    return dict(mixer_cfg)


def build_mmmamba(d_model: int, num_heads: int, num_kv_heads: Optional[int] = None, head_dim: Optional[int] = None,
                  conv_width: int = 2, chunk_size: int = 128, qkv_bias: bool = False, o_bias: bool = False,
                  kernel: Literal["auto", "torch", "mamba_ssm"] = "auto", device: Optional[str] = None,
                  dtype: Optional[str] = None):
    """mmMamba's mixer (Mamba-2 in an attention layer's form: q/k/v/o projections, GQA, conv width 2)."""
    import torch

    from .mamba2.mmmamba_mixer import MMambaMixer

    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if dtype is not None and not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"mmmamba: unknown dtype {dtype!r}")
    return MMambaMixer(d_model, num_heads, num_kv_heads, head_dim, conv_width=conv_width, chunk_size=chunk_size,
                       qkv_bias=qkv_bias, o_bias=o_bias, kernel=kernel, device=device, dtype=torch_dtype)


def seed_mmmamba(teacher_layer: Any, conv_width: Optional[int] = None, chunk_size: Optional[int] = None,
                 dt_min: Optional[float] = None, dt_max: Optional[float] = None,
                 dt_init_floor: Optional[float] = None, A_log_init: Optional[float] = None,
                 gate_gain: Optional[float] = None, kernel: Optional[Literal["auto", "torch", "mamba_ssm"]] = None,
                 layer_idx: Optional[int] = None, generator: Optional[Any] = None):
    """An mmMamba mixer seeded from a transformers attention layer (MMambaMixer.from_attention; options left None
    keep its defaults: conv width 2, chunk 128, dt in [1e-3, 0.1], A_log 1, gate gain 2^-2.5)."""
    from .mamba2.mmmamba_mixer import MMambaMixer

    given = {"conv_width": conv_width, "chunk_size": chunk_size, "dt_min": dt_min, "dt_max": dt_max,
             "dt_init_floor": dt_init_floor, "A_log_init": A_log_init, "gate_gain": gate_gain, "kernel": kernel,
             "layer_idx": layer_idx, "generator": generator}
    return MMambaMixer.from_attention(teacher_layer, **{k: v for k, v in given.items() if v is not None})


@hookimpl
def register_mixers(register):
    register("mmmamba", build_mmmamba, seed=seed_mmmamba)


@hookimpl
def register_backbones(register):
    register("mamba2", build_mamba2, description="Mamba-2 stack (mamba_ssm names; torch or Triton kernels; "
             "task LoRA on in_proj; optional attention layers)")
    register("transformer", build_transformer, description="decoder-only Transformer (transformers' Llama / Qwen2 "
             "layers, InternLM2 on Llama's) from a local Hugging Face directory or parameters")
    register("student", build_student, from_teacher=student_from_teacher,
             description="a transformer backbone distilled into seeded mmMamba mixers (hybrid: layers that keep "
             "the teacher's attention)")


def build_student(teacher: dict[str, Any], hybrid: list[int] = [], mixer: str = "mmmamba",
                  mixer_options: dict[str, Any] = {}):
    """A distilled student of a ``transformer`` backbone (``teacher``: its params): attention layers outside
    ``hybrid`` (layer indices) become seeded ``mixer`` layers (mmMamba's; ``mixer_options``: its seed options)."""
    from .transformer.student import build_student as build

    return build(teacher, list(hybrid), mixer, dict(mixer_options))


def student_from_teacher(teacher: Any, hybrid: list[int] = [], mixer: str = "mmmamba",
                         mixer_options: Optional[dict[str, Any]] = None, generator: Optional[Any] = None):
    """A student backbone seeded from a live ``transformer`` backbone (omnicore.distill.make_student calls it)."""
    from .transformer.student import StudentBackbone

    return StudentBackbone.from_teacher(teacher, hybrid, mixer, mixer_options, generator)


@hookimpl
def register_heads(register):
    register("text_lm", build_text_lm)


@hookimpl
def register_mmu_layouts(register):
    register("internvl", internvl_layout)


@hookimpl
def register_commands(app):
    from .transformer.commands import add_commands

    add_commands(app)
