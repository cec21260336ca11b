"""Import a released mmMamba checkpoint (``model_type: mmMamba_chat``) into an omnicore model directory.

The release is a Hugging Face directory: config.json with the language model's InternLM2 settings under
``llm_config``, safetensors (one file or shards with an index) and a tokenizer. Its language model's layers are
``language_model.model.layers.{i}``: the mmMamba layers hold ``attention.wvkqgdt.weight`` (rows [v, k, q, g, dt]),
``attention.conv1d.*``, ``attention.g_norm_swish_gate.weight``, ``attention.dt_bias``, ``attention.A_log_bias`` and
``attention.o_proj.weight``; the softmax-attention layers of a hybrid hold InternLM2's ``attention.wqkv`` and
``attention.wo``; every layer has ``attention_norm``, ``ffn_norm`` and ``feed_forward.w1/w3/w2``. Which layers are
which is read from the tensors themselves. ``tok_embeddings`` and ``output`` become the ``text_lm`` head.

The result is an ordinary model directory whose backbone is a ``student`` (the mixers unpacked with
``unpack_inference``, hybrid layers as attention), served by ``omnicore.load``. HoVLE's holistic embedding
(``embedding_model.*``: a patch convolution and 8 InternLM2 layers over the whole sequence) has no omnicore
component: it is not imported (the count of its tensors is reported), so the imported model answers text questions
in the InternLM2 chat format.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from omnicore.errors import CheckpointError

from .hf_config import read_hf_config, read_json

MODEL_TYPE = "mmMamba_chat"
LM = "language_model."
LAYER = re.compile(r"^language_model\.model\.layers\.(\d+)\.(.+)$")
# InternLM2's chat format without an image: what the released chat() sends for a text-only question
TEXT_CHAT = {"head": "<|im_start|>user\n", "tail": "", "question": "{question}<|im_end|><|im_start|>assistant\n",
             "answer_end": "<|im_end|>", "stop": "<|im_end|>",
             "next_question": "<|im_start|>user\n{question}<|im_end|><|im_start|>assistant\n"}
_LLM_KEYS = {"hidden_size": "d_model", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
             "num_key_value_heads": "n_kv_head", "intermediate_size": "d_intermediate", "rope_theta": "rope_theta",
             "rms_norm_eps": "rms_norm_eps", "max_position_embeddings": "max_position_embeddings",
             "bias": "attention_bias", "hidden_act": "hidden_act"}
_MIXER_PACKED = ("wvkqgdt.weight", "wvkqgdt.bias", "conv1d.weight", "conv1d.bias", "g_norm_swish_gate.weight",
                 "dt_bias", "A_log_bias", "o_proj.weight", "o_proj.bias")
_RENAMES = {"attention_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
            "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w3.weight": "mlp.up_proj.weight",
            "feed_forward.w2.weight": "mlp.down_proj.weight"}


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """The release's safetensors (one file, or the shards its index lists), memory-mapped; never a pickle."""
    from safetensors.torch import load_file

    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index, "shard index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no weight_map")
        files = sorted(set(weight_map.values()))
    elif single.is_file():
        files = [single.name]
    else:
        raise CheckpointError(f"{directory}: no model.safetensors or model.safetensors.index.json")
    out: dict[str, torch.Tensor] = {}
    for name in files:
        path = directory / name
        if "/" in name or not path.is_file():
            raise CheckpointError(f"{directory}: shard {name!r} is missing")
        try:
            out.update(load_file(str(path)))
        except Exception as exc:  # the safetensors reader's error types vary across versions
            raise CheckpointError(f"{path}: unreadable safetensors file: {str(exc).splitlines()[0]}") from None
    return out


def _teacher_params(config: dict[str, Any], where: str) -> dict[str, Any]:
    llm = config.get("llm_config")
    if not isinstance(llm, dict):
        raise CheckpointError(f"{where}: no llm_config (the language model's InternLM2 settings)")
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
               if k not in llm]
    if missing:
        raise CheckpointError(f"{where}: llm_config.{missing[0]} is missing")
    params = {"arch": "internlm2", **{ours: llm[theirs] for theirs, ours in _LLM_KEYS.items() if theirs in llm}}
    if llm.get("rope_scaling"):
        params["rope_scaling"] = llm["rope_scaling"]
    return params


def _rows(table: torch.Tensor, rows: int) -> torch.Tensor:
    """A token table with ``rows`` rows: the checkpoint's padding rows past the vocabulary dropped, rows the
    tokenizer adds beyond the checkpoint's started at the mean of its rows."""
    if table.shape[0] >= rows:
        return table[:rows]
    return torch.cat([table, table.float().mean(0).to(table.dtype).expand(rows - table.shape[0], -1)])


def convert_mmmamba(source: str | Path, output: str | Path, tokenizer: str | Path | None = None,
                    max_text_tokens: int = 4096) -> Path:
    """Write ``output``, an omnicore model directory, from the mmMamba release in ``source`` (its tokenizer.json, or
    ``tokenizer``). One-line CheckpointError naming the file or tensor at fault."""
    from omnicore.model.layout import ChatLayout
    from omnicore.model.unified import build_from_spec

    from ..mamba2.mmmamba_mixer import inference_config, unpack_inference
    from .weights import unpack_internlm2_qkv

    source = Path(source)
    config = read_hf_config(source)
    where = f"{source}/config.json"
    if config.get("model_type") != MODEL_TYPE:
        raise CheckpointError(f"{where}: model_type {config.get('model_type')!r} is not {MODEL_TYPE!r}")
    teacher = _teacher_params(config, where)
    tok = Path(tokenizer) if tokenizer is not None else source / "tokenizer.json"
    if not tok.is_file():
        raise CheckpointError(f"{source}: no tokenizer.json; give the tokenizer file (a tokenizer.json with "
                              "InternLM2's <|im_start|> and <|im_end|>)")
    tensors = _read_tensors(source)
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        m = LAYER.match(key)
        if m:
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = value
    n_layer = teacher["n_layer"]
    if sorted(layers) != list(range(n_layer)):
        raise CheckpointError(f"{source}: language_model.model.layers holds layers {sorted(layers)[:4]}..., "
                              f"llm_config.num_hidden_layers is {n_layer}")
    hybrid = [i for i in range(n_layer) if "attention.wqkv.weight" in layers[i]]
    mixers = [i for i in range(n_layer) if "attention.wvkqgdt.weight" in layers[i]]
    neither = sorted(set(range(n_layer)) - set(hybrid) - set(mixers))
    if neither:
        raise CheckpointError(f"{source}: layer {neither[0]} has neither attention.wvkqgdt.weight (mmMamba) nor "
                              "attention.wqkv.weight (attention)")
    packed0 = {k[len("attention."):]: v for k, v in layers[mixers[0]].items()
               if k.startswith("attention.") and k[len("attention."):] in _MIXER_PACKED} if mixers else {}
    mixer_options = {}
    if packed0:
        shape = inference_config(packed0, f"{source}: layer {mixers[0]}")
        mixer_options["conv_width"] = shape["conv_width"]
        teacher.setdefault("head_dim", shape["head_dim"])
        teacher.setdefault("n_kv_head", shape["num_kv_heads"])
    vocab = tensors.get("language_model.model.tok_embeddings.weight")
    if vocab is None:
        raise CheckpointError(f"{source}: missing tensor 'language_model.model.tok_embeddings.weight'")
    spec = {"max_text_tokens": max_text_tokens,
            "mmu_template": ChatLayout(**TEXT_CHAT).spec(),
            "text_tokenizer": {"type": "hf_tokenizer", "params": {"path": str(tok)}},
            "backbone": {"type": "student", "params": {"teacher": teacher, "hybrid": hybrid, "mixer": "mmmamba",
                                                        "mixer_options": mixer_options}},
            "heads": {"text": {"type": "text_lm"}}}
    with torch.device("meta"):  # shapes only: every tensor comes from the release
        shell = build_from_spec(spec)
    real_ids = getattr(shell.text_tokenizer, "base_vocab_size", shell.text_tokenizer.vocab_size)
    if real_ids > vocab.shape[0]:
        raise CheckpointError(f"{tok}: the tokenizer has {real_ids} ids, the checkpoint's embedding only "
                              f"{vocab.shape[0]} rows: it is not this checkpoint's tokenizer")
    backbone = shell.backbone
    state: dict[str, torch.Tensor] = {}
    for i in range(n_layer):
        here, prefix = layers[i], f"backbone.layers.{i}."
        for theirs, ours in _RENAMES.items():
            if theirs not in here:
                raise CheckpointError(f"{source}: missing tensor 'language_model.model.layers.{i}.{theirs}'")
            state[prefix + ours] = here[theirs]
        attn = backbone.layers[i].self_attn
        if i in hybrid:
            q, k, v = unpack_internlm2_qkv(here["attention.wqkv.weight"], attn.config.num_attention_heads,
                                           attn.config.num_key_value_heads, attn.head_dim)
            state.update({prefix + "self_attn.q_proj.weight": q, prefix + "self_attn.k_proj.weight": k,
                          prefix + "self_attn.v_proj.weight": v})
            if "attention.wo.weight" not in here:
                raise CheckpointError(f"{source}: missing tensor 'language_model.model.layers.{i}.attention.wo.weight'")
            state[prefix + "self_attn.o_proj.weight"] = here["attention.wo.weight"]
        else:
            packed = {k[len("attention."):]: v for k, v in here.items() if k.startswith("attention.")}
            own = unpack_inference(packed, attn, f"{source}: language_model.model.layers.{i}.attention")
            state.update({prefix + "self_attn." + k: v for k, v in own.items()})
    state["backbone.norm.weight"] = tensors.get("language_model.model.norm.weight")
    rows = shell.heads["text"].embedding.weight.shape[0]
    state["heads.text.embedding.weight"] = _rows(vocab, rows)
    output_weight = tensors.get("language_model.output.weight")
    state["heads.text.lm_head.weight"] = None if output_weight is None else _rows(output_weight, rows)
    missing = [k for k, v in state.items() if v is None]
    if missing:
        raise CheckpointError(f"{source}: missing tensor for {missing[0]}")
    from omnicore.convert.strict import check_tensors, shapes

    check_tensors(state, shapes(shell.state_dict()), f"{source}")
    skipped = sum(1 for k in tensors if k.startswith("embedding_model."))
    from omnicore.model.unified import write_model_dir

    config_out = {"model": spec, "imported_from": {"format": MODEL_TYPE, "path": str(source),
                                                    "not_imported": {"embedding_model": skipped}}}
    return write_model_dir(output, config_out, {k: v.contiguous() for k, v in state.items()})
