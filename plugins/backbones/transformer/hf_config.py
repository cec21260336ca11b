"""Decoder-only Transformer architectures: a local Hugging Face ``config.json``, or plain parameters, as one of
transformers' configuration objects (``LlamaConfig`` / ``Qwen2Config``).

Llama and Qwen2 directories are read by transformers' own config classes (every RoPE variant they know comes
along). InternLM2 is not in transformers: its config (``model_type: internlm2``) is mapped onto ``LlamaConfig``,
whose modules compute the same thing once its packed ``wqkv`` is split (weights.py).
Nothing here reaches the network: only the given directory is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omnicore.errors import CheckpointError, OmnicoreError

CONFIG_FILE = "config.json"
ARCHS = ("llama", "qwen2", "internlm2")
_CONFIG_MAX_BYTES = 1 << 20
# InternLM2 config.json keys -> LlamaConfig keys (the same meaning; the rest is named alike)
_INTERNLM2_KEYS = {"bias": "attention_bias"}
_COPIED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
           "vocab_size", "rms_norm_eps", "rope_theta", "max_position_embeddings", "hidden_act",
           "tie_word_embeddings", "rope_scaling", "initializer_range", "head_dim")


def read_json(path: Path, what: str) -> Any:
    """A small JSON file (a config, a shard index) read through omnicore's input checks: a regular file, UTF-8,
    bounded size and depth; any problem is a one-line CheckpointError naming the file."""
    from omnicore.errors import InputFileError
    from omnicore.inputs import parse_json, read_text

    try:
        return parse_json(read_text(path, what, _CONFIG_MAX_BYTES), str(path), max_depth=32)
    except InputFileError as exc:
        raise CheckpointError(str(exc)) from None


def read_hf_config(directory: str | Path) -> dict[str, Any]:
    """The directory's config.json as a dict; a one-line CheckpointError when it is missing or unreadable."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a Hugging Face model directory (not a directory)")
    path = directory / CONFIG_FILE
    if not path.exists():
        raise CheckpointError(f"{directory}: not a Hugging Face model directory (no {CONFIG_FILE})")
    config = read_json(path, "model config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def hf_arch(config: dict[str, Any], where: str) -> str:
    """``llama``, ``qwen2`` or ``internlm2`` from a config's ``model_type``."""
    model_type = config.get("model_type")
    if model_type not in ARCHS:
        raise CheckpointError(f"{where}: model_type {model_type!r} is not a decoder this backbone builds "
                              f"({', '.join(ARCHS)})")
    return model_type


def is_hf_decoder_dir(path: str | Path) -> bool:
    """A directory whose config.json names one of ``ARCHS`` (never raises)."""
    try:
        return hf_arch(read_hf_config(path), str(path)) in ARCHS
    except OmnicoreError:
        return False


def _config_class(arch: str):
    if arch == "qwen2":
        from transformers import Qwen2Config

        return Qwen2Config
    from transformers import LlamaConfig

    return LlamaConfig


def transformers_config(arch: str, values: dict[str, Any], where: str):
    """A transformers config object for ``arch`` from config.json-style ``values``."""
    if arch not in ARCHS:
        raise OmnicoreError(f"{where}: arch {arch!r}; use one of {', '.join(ARCHS)}")
    values = dict(values)
    if arch == "internlm2":
        values = {_INTERNLM2_KEYS.get(k, k): v for k, v in values.items() if k in _COPIED or k in _INTERNLM2_KEYS}
        values["mlp_bias"] = False
        values["model_type"] = "llama"
    if arch == "qwen2" and values.get("use_sliding_window"):
        raise CheckpointError(f"{where}: use_sliding_window is true; sliding-window attention is not supported")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if not isinstance(values.get(key), int) or values[key] < 1:
            raise CheckpointError(f"{where}: {key} must be a positive integer, got {values.get(key)!r}")
    heads, kv = values["num_attention_heads"], values.get("num_key_value_heads") or values["num_attention_heads"]
    if not isinstance(kv, int) or kv < 1 or heads % kv:
        raise CheckpointError(f"{where}: num_key_value_heads {kv!r} must divide num_attention_heads {heads}")
    if values.get("head_dim") is None and values["hidden_size"] % heads:
        raise CheckpointError(f"{where}: hidden_size {values['hidden_size']} is not a multiple of "
                              f"num_attention_heads {heads} (and no head_dim is given)")
    values.setdefault("vocab_size", 1)  # the token tables belong to the model's text head, not the backbone
    try:
        return _config_class(arch).from_dict(values)
    except Exception as exc:  # transformers' own validation of a field
        raise CheckpointError(f"{where}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None


def params_config(arch: str, d_model: int, n_layer: int, n_head: int, n_kv_head: int | None, head_dim: int | None,
                  d_intermediate: int, rope_theta: float, rms_norm_eps: float, max_position_embeddings: int,
                  attention_bias: bool | None, hidden_act: str, rope_scaling: dict | None) -> dict[str, Any]:
    """config.json-style values of the no-file form (what a directory of that architecture would say)."""
    values: dict[str, Any] = {
        "hidden_size": d_model, "num_hidden_layers": n_layer, "num_attention_heads": n_head,
        "num_key_value_heads": n_kv_head or n_head, "intermediate_size": d_intermediate, "rope_theta": rope_theta,
        "rms_norm_eps": rms_norm_eps, "max_position_embeddings": max_position_embeddings, "hidden_act": hidden_act,
        "rope_scaling": rope_scaling, "tie_word_embeddings": False,
        # the token tables are the model's text head: no vocabulary here, so no token ids either
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if head_dim is not None:
        values["head_dim"] = head_dim
    if arch == "internlm2":
        values["bias"] = bool(attention_bias)
    elif arch == "llama":
        values["attention_bias"] = bool(attention_bias)
    elif attention_bias is False:  # qwen2: q/k/v biases are part of the architecture
        raise OmnicoreError("backbone transformer: arch qwen2 always has q/k/v biases (attention_bias false)")
    return values


def describe(config) -> dict[str, Any]:
    """The fields that decide what a backbone computes, for comparing a model with a directory."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    return {"hidden_size": config.hidden_size, "num_hidden_layers": config.num_hidden_layers,
            "num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads,
            "head_dim": getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
            "intermediate_size": config.intermediate_size, "rms_norm_eps": float(config.rms_norm_eps),
            "hidden_act": config.hidden_act, "rope": rope}
