"""Mamba-2 language-model directories (state-spaces/mamba2-*) as a stage's ``init_from``.

Such a directory holds ``config.json`` (d_model, d_intermediate, n_layer, vocab_size, ssm_cfg {"layer": "Mamba2"},
attn_layer_idx, rms_norm, residual_in_fp32, pad_vocab_size_multiple, tie_embeddings...) and its weights as
``pytorch_model.bin`` or ``model.safetensors``: ``backbone.embedding.weight``, ``backbone.layers.{i}.*``,
``backbone.norm_f.weight`` and ``lm_head.weight`` (the embedding again: tied).

Into a unified model: the backbone gets the layers and norm_f (task LoRA adapters keep their init), the text head's
table gets the embedding. mamba_ssm pads its table to a multiple of ``pad_vocab_size_multiple`` (50277 -> 50288
rows); OmniMamba's added tokens take those spare rows, so the file's rows are copied as they are, padding rows
included (as the released model was started). Rows the model has beyond the file's are set to the mean of the
file's real-token rows: with the head tied, a new token then scores like an average token instead of an arbitrary
one, and its input embedding sits among the trained ones (a random row of the model's init scale is far smaller
than mamba2's rows).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from .strict import check_tensors

CONFIG_FILE = "config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # the first present is read
EMBEDDING = "backbone.embedding.weight"
LM_HEAD = "lm_head.weight"
# mamba_ssm's Mamba2 defaults: what ssm_cfg means by the keys it leaves out (mamba2-1.3b's is {"layer": "Mamba2"})
SSM_DEFAULTS = {"d_state": 128, "d_conv": 4, "expand": 2, "headdim": 64, "ngroups": 1, "chunk_size": 256}
_CONFIG_MAX_BYTES = 1 << 20


def read_config(directory: str | Path) -> dict[str, Any] | None:
    """The directory's config.json when it looks like a mamba_ssm LM config (d_model, n_layer, vocab_size and
    ssm_cfg), else None. Never raises: a directory of another kind is simply not this one."""
    path = Path(directory) / CONFIG_FILE
    try:
        if not path.is_file() or path.stat().st_size > _CONFIG_MAX_BYTES:
            return None
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or not isinstance(config.get("ssm_cfg"), dict):
        return None
    if not all(isinstance(config.get(k), int) for k in ("d_model", "n_layer", "vocab_size")):
        return None
    return config


def is_mamba2_lm_dir(path: str | Path) -> bool:
    return Path(path).is_dir() and read_config(path) is not None


def weights_file(directory: str | Path) -> Path:
    for name in WEIGHT_FILES:
        if (Path(directory) / name).is_file():
            return Path(directory) / name
    raise CheckpointError(f"{directory}: a mamba2 LM directory without weights ({' or '.join(WEIGHT_FILES)})")


def ssm_config(config: dict[str, Any]) -> dict[str, Any]:
    """ssm_cfg with mamba_ssm's defaults filled in (``layer`` removed)."""
    return {**SSM_DEFAULTS, **{k: v for k, v in config["ssm_cfg"].items() if k != "layer"}}


def backbone_params(config: dict[str, Any]) -> dict[str, Any]:
    """The ``mamba2`` backbone params that build the LM's backbone (add ``lora`` for task adapters)."""
    return {"d_model": config["d_model"], "n_layer": config["n_layer"],
            "d_intermediate": config.get("d_intermediate", 0), "attn_layer_idx": list(config.get("attn_layer_idx", [])),
            "attn_cfg": dict(config.get("attn_cfg", {})), "rms_norm": config.get("rms_norm", True),
            "residual_in_fp32": config.get("residual_in_fp32", True), **ssm_config(config)}


def padded_vocab(config: dict[str, Any]) -> int:
    multiple = int(config.get("pad_vocab_size_multiple", 1))
    return -(-config["vocab_size"] // multiple) * multiple


def check_config(config: dict[str, Any], backbone: torch.nn.Module, where: str) -> None:
    """One-line CheckpointError naming the first field where config.json and the model's backbone differ."""
    def differ(field: str, theirs: Any, ours: Any) -> None:
        if theirs != ours:
            raise CheckpointError(f"{where}: {field} is {theirs!r} there, {ours!r} in the model's backbone")

    layer = config["ssm_cfg"].get("layer", "Mamba1")
    if layer != "Mamba2":
        raise CheckpointError(f"{where}: ssm_cfg.layer is {layer!r}; only Mamba-2 LMs (\"Mamba2\") load here")
    if not config.get("tie_embeddings", True):
        raise CheckpointError(f"{where}: tie_embeddings is false; the model's text head is tied to its embedding")
    differ("d_model", config["d_model"], backbone.d_model)
    differ("n_layer", config["n_layer"], len(backbone.layers))
    differ("attn_layer_idx", sorted(config.get("attn_layer_idx", [])), list(backbone.attn_layer_idx))
    has_mlp = any(b.mlp is not None for b in backbone.layers)  # its width: by the tensors' shapes
    if (config.get("d_intermediate", 0) > 0) != has_mlp:
        differ("d_intermediate", config.get("d_intermediate", 0), "an MLP in every block" if has_mlp else 0)
    differ("residual_in_fp32", config.get("residual_in_fp32", True), backbone.layers[0].residual_in_fp32)
    mixer = next((b.mixer for b in backbone.layers if hasattr(b.mixer, "d_state")), None)
    if mixer is not None:
        for key in ("d_state", "d_conv", "expand", "headdim", "ngroups"):
            differ(f"ssm_cfg.{key}", ssm_config(config)[key], getattr(mixer, key))


def _text_table(model: torch.nn.Module, where: str) -> torch.Tensor:
    heads = getattr(model, "heads", {})
    head = heads["text"] if "text" in heads else None
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise CheckpointError(f"{where}: the model has no text head with an embedding table to receive "
                              f"{EMBEDDING}")
    return weight


def load_mamba2_lm(model: torch.nn.Module, directory: str | Path, label: str) -> None:
    """Start ``model`` (a unified model) from a mamba2 LM directory; strict, one-line CheckpointErrors."""
    directory = Path(directory)
    config = read_config(directory)
    if config is None:
        raise CheckpointError(f"{label}: {directory}: not a mamba2 LM directory (no config.json like mamba_ssm's)")
    backbone = model.backbone
    if not hasattr(backbone, "load_mamba_state_dict"):
        raise CheckpointError(f"{label}: {directory}: the model's backbone is not a Mamba-2 backbone")
    check_config(config, backbone, f"{label}: {directory / CONFIG_FILE}")
    path = weights_file(directory)
    from ..training.checkpoint import load_state_dict_file

    state = load_state_dict_file(path)
    where = f"{label}: {path}"
    table = _text_table(model, where)
    if EMBEDDING not in state:
        raise CheckpointError(f"{where}: missing tensor {EMBEDDING!r}: the model's text head needs it")
    embedding = state[EMBEDDING]
    vocab = config["vocab_size"]
    # mamba_ssm saves the padded table (50288 rows for 50277 ids); a table of just the ids is accepted too
    rows = embedding.shape[0] if embedding.shape[0] == vocab else padded_vocab(config)
    check_tensors({EMBEDDING: embedding}, {EMBEDDING: (rows, backbone.d_model)}, where)
    if LM_HEAD in state:  # tied in the file too, or the tied text head cannot hold it
        check_tensors({LM_HEAD: state[LM_HEAD]}, {LM_HEAD: (rows, backbone.d_model)}, where)
        if not torch.equal(state[LM_HEAD], embedding):
            raise CheckpointError(f"{where}: {LM_HEAD!r} differs from {EMBEDDING!r}; the model's text head is "
                                  "tied to its embedding")
    if table.shape[0] < vocab:
        raise CheckpointError(f"{where}: {EMBEDDING!r} has {vocab} token rows (config.json vocab_size), the model's "
                              f"text vocabulary only {table.shape[0]}: its text tokenizer is not this LM's")
    base = getattr(getattr(model, "text_tokenizer", None), "base_vocab_size", None)
    if base is not None and base != vocab:
        raise CheckpointError(f"{where}: config.json vocab_size is {vocab}, the model's tokenizer.json has {base} "
                              "ids: not this LM's tokenizer")
    backbone.load_mamba_state_dict(state, strict=True, source=where)
    with torch.no_grad():
        n = min(rows, table.shape[0])
        table[:n].copy_(embedding[:n])
        if table.shape[0] > n:
            table[n:].copy_(embedding[:vocab].float().mean(0).to(table.dtype).expand(table.shape[0] - n, -1))
