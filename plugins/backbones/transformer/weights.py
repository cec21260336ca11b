"""Local Hugging Face decoder directories into a ``TransformerBackbone`` and the model's text head.

Weights: ``model.safetensors``, or shards listed by ``model.safetensors.index.json`` (never a pickle). Names:
Llama / Qwen2 keep transformers' own (``model.layers.{i}.self_attn.q_proj.weight`` ..., ``model.norm.weight``,
``model.embed_tokens.weight``, ``lm_head.weight``). InternLM2 (``model.tok_embeddings.weight``,
``model.layers.{i}.attention.wqkv.weight``, ``attention.wo``, ``feed_forward.w1/w3/w2``, ``attention_norm``,
``ffn_norm``, ``model.norm.weight``, ``output.weight``) packs q, k and v per kv head: rows ``(h gs d)`` with
``gs = G + 2`` slots per kv head h (G query heads, then its k, then its v; G = heads / kv_heads), split here onto
Llama's q_proj / k_proj / v_proj so that query head ``h*G + g`` reads kv head ``h`` as transformers' GQA does.

Token tables: the text head's embedding rows take the file's rows as they are (padding rows included); rows the
model has beyond the file's (the special tokens its text tokenizer appends) start at the mean of the file's rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from omnicore.convert.strict import check_tensors
from omnicore.errors import CheckpointError

from .hf_config import hf_arch, read_hf_config, read_json, transformers_config, describe

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# tensors a file may hold that are derived, not learned (old Llama checkpoints saved RoPE's inverse frequencies)
_DERIVED = (".rotary_emb.inv_freq",)
TOKEN_KEYS = {"llama": ("model.embed_tokens.weight", "lm_head.weight"),
              "qwen2": ("model.embed_tokens.weight", "lm_head.weight"),
              "internlm2": ("model.tok_embeddings.weight", "output.weight")}


# ---- InternLM2's packed q/k/v ------------------------------------------------------------------------------------
def unpack_internlm2_qkv(wqkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int):
    """``wqkv`` ``((H + 2 Hkv) d, ...)`` packed ``(h gs d)`` -> q ``(H d, ...)``, k and v ``(Hkv d, ...)``
    (weights or biases)."""
    groups = num_heads // num_kv_heads
    packed = wqkv.reshape(num_kv_heads, groups + 2, head_dim, *wqkv.shape[1:])
    rest = wqkv.shape[1:]
    q = packed[:, :groups].reshape(num_heads * head_dim, *rest)
    k = packed[:, groups].reshape(num_kv_heads * head_dim, *rest)
    v = packed[:, groups + 1].reshape(num_kv_heads * head_dim, *rest)
    return q.contiguous(), k.contiguous(), v.contiguous()


def pack_internlm2_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_kv_heads: int,
                       head_dim: int) -> torch.Tensor:
    """The inverse of ``unpack_internlm2_qkv`` (writes InternLM2's layout, e.g. for tests and exporters)."""
    groups = num_heads // num_kv_heads
    rest = q.shape[1:]
    slots = torch.cat([q.reshape(num_kv_heads, groups, head_dim, *rest),
                       k.reshape(num_kv_heads, 1, head_dim, *rest), v.reshape(num_kv_heads, 1, head_dim, *rest)], 1)
    return slots.reshape((num_heads + 2 * num_kv_heads) * head_dim, *rest)


_INTERNLM2_RENAMES = {"self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1",
                      "mlp.up_proj": "feed_forward.w3", "mlp.down_proj": "feed_forward.w2",
                      "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm"}


def file_layout(backbone: nn.Module, arch: str) -> tuple[dict[str, tuple[int, ...]], Callable]:
    """The tensors a directory of ``arch`` holds for this backbone (file name -> shape), and a function mapping
    such a file's tensors to the backbone's state dict."""
    own = {k: tuple(v.shape) for k, v in backbone.state_dict().items()}
    if arch != "internlm2":
        return {f"model.{k}": s for k, s in own.items()}, lambda st: {k: st[f"model.{k}"] for k in own}
    cfg = backbone.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = backbone.layers[0].self_attn.head_dim
    expected: dict[str, tuple[int, ...]] = {}
    direct: dict[str, str] = {}  # backbone key -> file key
    for key, shape in own.items():
        if ".self_attn.q_proj." in key:
            leaf = key.rsplit(".", 1)[1]
            layer = key.split(".self_attn.")[0]
            expected[f"model.{layer}.attention.wqkv.{leaf}"] = ((heads + 2 * kv_heads) * head_dim, *shape[1:])
        elif ".self_attn.k_proj." in key or ".self_attn.v_proj." in key:
            continue  # in wqkv
        else:
            name = key
            for ours, theirs in _INTERNLM2_RENAMES.items():
                name = name.replace(f".{ours}.", f".{theirs}.")
            expected[f"model.{name}"] = shape
            direct[key] = f"model.{name}"

    def convert(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {k: state[f] for k, f in direct.items()}
        for key in own:
            if ".self_attn.q_proj." in key:
                layer, leaf = key.split(".self_attn.")[0], key.rsplit(".", 1)[1]
                q, k, v = unpack_internlm2_qkv(state[f"model.{layer}.attention.wqkv.{leaf}"], heads, kv_heads,
                                               head_dim)
                for name, t in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                    out[f"{layer}.self_attn.{name}.{leaf}"] = t
        return out

    return expected, convert


# ---- reading a directory -----------------------------------------------------------------------------------------
def _safe_name(name: object, where: str) -> str:
    if not isinstance(name, str) or not name.endswith(".safetensors") or "/" in name or "\\" in name \
            or name.startswith("."):
        raise CheckpointError(f"{where}: shard {name!r} is not a .safetensors file name inside the directory")
    return name


def read_hf_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the directory's safetensors weights (one file or an index's shards)."""
    from omnicore.training.checkpoint import load_state_dict_file

    directory = Path(directory)
    if (directory / SINGLE_FILE).exists():
        return load_state_dict_file(directory / SINGLE_FILE)
    index_path = directory / INDEX_FILE
    if not index_path.exists():
        raise CheckpointError(f"{directory}: no weights ({SINGLE_FILE} or {INDEX_FILE}); only safetensors are read")
    index = read_json(index_path, "shard index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: 'weight_map' must map tensor names to shard files")
    state: dict[str, torch.Tensor] = {}
    for shard in sorted({_safe_name(v, str(index_path)) for v in weight_map.values()}):
        tensors = load_state_dict_file(directory / shard)
        for key in tensors:
            if weight_map.get(key) != shard:
                raise CheckpointError(f"{directory / shard}: holds tensor {key!r}, which {INDEX_FILE} does not "
                                      f"place in this shard")
        state.update(tensors)
    absent = [k for k in weight_map if k not in state]
    if absent:
        raise CheckpointError(f"{directory / weight_map[absent[0]]}: missing tensor {absent[0]!r}, which "
                              f"{INDEX_FILE} places there")
    return state


# ---- loading -----------------------------------------------------------------------------------------------------
def check_architecture(backbone: nn.Module, config, where: str) -> None:
    """One-line CheckpointError naming the first field where a directory's config and the backbone differ."""
    theirs, ours = describe(config), backbone.describe()
    for field, value in theirs.items():
        if value != ours[field]:
            raise CheckpointError(f"{where}: {field} is {value!r} there, {ours[field]!r} in the model's backbone")


def _rows_into(table: torch.Tensor, rows: torch.Tensor) -> None:
    """Copy the file's rows; rows beyond them (tokens the model adds) start at the mean of the file's rows."""
    with torch.no_grad():
        n = min(rows.shape[0], table.shape[0])
        table[:n].copy_(rows[:n])
        if table.shape[0] > n:
            table[n:].copy_(rows.float().mean(0).to(table.dtype).expand(table.shape[0] - n, -1))


def load_tokens(text_head: nn.Module, embedding: torch.Tensor, lm_head: torch.Tensor | None, where: str,
                names: tuple[str, str], tokenizer=None) -> None:
    """The file's token embedding (and untied LM head) into the model's text head."""
    table = getattr(getattr(text_head, "embedding", None), "weight", None)
    if not isinstance(table, torch.Tensor) or table.dim() != 2:
        raise CheckpointError(f"{where}: the model's text head has no embedding table to receive {names[0]!r}")
    base = getattr(tokenizer, "base_vocab_size", None)
    if base is not None and base > embedding.shape[0]:
        raise CheckpointError(f"{where}: {names[0]!r} has {embedding.shape[0]} rows, but the model's tokenizer.json "
                              f"has {base} ids: not this model's tokenizer")
    if table.shape[0] < embedding.shape[0] and base is None:
        raise CheckpointError(f"{where}: {names[0]!r} has {embedding.shape[0]} token rows, the model's text "
                              f"vocabulary only {table.shape[0]}: its text tokenizer is not this model's")
    out = getattr(text_head, "lm_head", None)
    if out is None:  # a head tied to its embedding scores with that table
        if lm_head is not None and not torch.equal(lm_head, embedding):
            raise CheckpointError(f"{where}: {names[1]!r} differs from {names[0]!r} (an untied LM head); the "
                                  "model's text head is tied to its embedding: use heads.text type text_lm")
        _rows_into(table, embedding)
        return
    _rows_into(table, embedding)
    _rows_into(out.weight, embedding if lm_head is None else lm_head)


def load_hf_directory(backbone: nn.Module, directory: str | Path, text_head: nn.Module | None = None,
                      label: str = "init_from", tokenizer=None) -> None:
    """The directory's layers and final norm into ``backbone``, its token tables into ``text_head``; strict."""
    directory = Path(directory)
    config_json = read_hf_config(directory)
    where = f"{label}: {directory}"
    arch = hf_arch(config_json, f"{where}/config.json")
    check_architecture(backbone, transformers_config(arch, config_json, f"{where}/config.json"),
                       f"{where}/config.json")
    state = {k: v for k, v in read_hf_weights(directory).items() if not k.endswith(_DERIVED)}
    expected, convert = file_layout(backbone, arch)
    emb_key, head_key = TOKEN_KEYS[arch]
    if emb_key not in state:
        raise CheckpointError(f"{where}: missing tensor {emb_key!r}: the model's text head needs it")
    embedding = state[emb_key]
    tied = bool(config_json.get("tie_word_embeddings", False))
    if head_key not in state and not tied:
        raise CheckpointError(f"{where}: missing tensor {head_key!r} (tie_word_embeddings is false)")
    expected[emb_key] = (embedding.shape[0], backbone.d_model)
    if head_key in state:
        expected[head_key] = (embedding.shape[0], backbone.d_model)
    check_tensors(state, expected, where)
    own = backbone.state_dict()
    with torch.no_grad():
        for key, value in convert(state).items():
            own[key].copy_(value)
    if text_head is not None:
        load_tokens(text_head, embedding, state.get(head_key), where, (emb_key, head_key), tokenizer)
