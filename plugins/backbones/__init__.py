"""Built-in backbones: ``mamba2`` (pure PyTorch Mamba-2 with mamba_ssm's layout; hybrid attention optional)."""

from __future__ import annotations

from typing import Any, Literal, Optional

from omnicore import hookimpl

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
                 compile_decode: Optional[bool] = None, lora: Optional[dict[str, Any]] = None, device: Optional[str] = None, dtype: Optional[str] = None):
    """Mamba-2 backbone (mamba_ssm layout, PyTorch or Triton kernels, task LoRA, optional attention layers).

    ``compile_decode``: compile the one-token decode step with torch.compile (None: on CUDA for models at least
    1024 wide, unless the environment sets OMNICORE_COMPILE=0; the first generation then waits for compilation)."""
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
    model = Mamba2Backbone(cfg["d_model"], cfg["n_layer"], ssm_cfg=ssm_cfg, d_intermediate=d_intermediate,
                           attn_layer_idx=list(attn_layer_idx), attn_cfg=dict(attn_cfg), rms_norm=rms_norm,
                           residual_in_fp32=residual_in_fp32, norm_epsilon=norm_epsilon, kernel=kernel,
                           compile_decode=compile_decode, device=device, dtype=torch_dtype)
    if lora:
        unknown = set(lora) - {"tasks", "r", "alpha", "dropout", "target_modules"}
        if unknown:
            raise ValueError(f"mamba2: unknown lora keys {sorted(unknown)}; accepted: tasks, r, alpha, dropout, "
                             "target_modules")
        model.add_task_adapters(**lora)
    return model


@hookimpl
def register_backbones(register):
    register("mamba2", build_mamba2, description="Mamba-2 stack (mamba_ssm names; torch or Triton kernels; "
             "task LoRA on in_proj; optional attention layers)")
