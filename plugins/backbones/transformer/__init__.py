"""Decoder-only Transformers (Llama, Qwen2, InternLM2) as omnicore backbones, built with transformers' modules from a
local Hugging Face directory or from plain parameters, never from the network."""

from __future__ import annotations

from typing import Any, Literal, Optional

# the modules below import torch and transformers: loaded on first use, so registering the plugin stays cheap
_LAZY = {"TransformerBackbone": "backbone", "InferenceState": "state", "KVCache": "state",
         "AttentionContext": "attention", "attention_heads": "attention", "decoder_layer": "attention",
         "TextLMHead": "head", "is_hf_decoder_dir": "hf_config", "load_hf_directory": "weights",
         "pack_internlm2_qkv": "weights", "unpack_internlm2_qkv": "weights"}
__all__ = [*_LAZY, "build_transformer", "build_text_lm"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_ARCH_PARAMS = ("d_model", "n_layer", "n_head", "n_kv_head", "head_dim", "d_intermediate", "rope_theta",
                "rms_norm_eps", "max_position_embeddings", "attention_bias", "hidden_act", "rope_scaling")


def build_transformer(config_dir: Optional[str] = None, arch: Optional[Literal["llama", "qwen2", "internlm2"]] = None,
                      d_model: Optional[int] = None, n_layer: Optional[int] = None, n_head: Optional[int] = None,
                      n_kv_head: Optional[int] = None, head_dim: Optional[int] = None,
                      d_intermediate: Optional[int] = None, rope_theta: Optional[float] = None,
                      rms_norm_eps: Optional[float] = None, max_position_embeddings: Optional[int] = None,
                      attention_bias: Optional[bool] = None, hidden_act: Optional[str] = None,
                      rope_scaling: Optional[dict[str, Any]] = None, device: Optional[str] = None,
                      dtype: Optional[str] = None):
    """Decoder-only Transformer (transformers' Llama / Qwen2 layers; InternLM2 on Llama's), from a local Hugging Face
    directory's config.json (``config_dir``; its weights load with a stage's ``init_from``) or from parameters.

    Without ``config_dir``: ``arch`` (default llama), ``d_model``, ``n_layer``, ``n_head`` (required),
    ``n_kv_head`` (default n_head: GQA when fewer), ``head_dim`` (default d_model / n_head), ``d_intermediate``
    (default 4 d_model), ``rope_theta`` (10000), ``rms_norm_eps`` (1e-6), ``max_position_embeddings`` (4096),
    ``attention_bias`` (llama / internlm2: false; qwen2 always has q/k/v biases), ``hidden_act`` (silu),
    ``rope_scaling`` (transformers' RoPE variants), randomly initialised as transformers does."""
    import torch

    from .backbone import TransformerBackbone
    from .hf_config import hf_arch, params_config, read_hf_config, transformers_config

    given = {k: v for k, v in locals().items() if k in _ARCH_PARAMS and v is not None}
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else None
    if dtype is not None and not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"transformer: unknown dtype {dtype!r}")
    if config_dir is not None:
        if given or arch is not None:
            raise ValueError(f"transformer: give config_dir or the architecture ({', '.join(sorted(given)) or 'arch'})"
                             ", not both")
        values = read_hf_config(config_dir)
        arch = hf_arch(values, f"{config_dir}/config.json")
        config = transformers_config(arch, values, f"{config_dir}/config.json")
    else:
        arch = arch or "llama"
        missing = [k for k in ("d_model", "n_layer", "n_head") if k not in given]
        if missing:
            raise ValueError(f"transformer: give config_dir (a Hugging Face directory) or {', '.join(missing)}")
        values = params_config(arch, d_model, n_layer, n_head, n_kv_head, head_dim,
                               d_intermediate or 4 * d_model, 10000.0 if rope_theta is None else rope_theta,
                               1e-6 if rms_norm_eps is None else rms_norm_eps, max_position_embeddings or 4096,
                               attention_bias, hidden_act or "silu", rope_scaling)
        config = transformers_config(arch, values, "backbone transformer")
    return TransformerBackbone(config, arch, device=device, dtype=torch_dtype)


def build_text_lm(vocab_size: int, d_model: int, tied: bool = False, init_std: float = 0.02):
    """Text embedding plus its own output projection (an LM's untied lm_head); ``tied`` shares the embedding."""
    from .head import TextLMHead

    return TextLMHead(vocab_size, d_model, tied, init_std)
