"""Import a released mmMamba checkpoint (``model_type: mmMamba_chat``) into an omnicore model directory.

The release is a Hugging Face directory: config.json (``embedding_config``: HoVLE's holistic embedding,
``llm_config``: the InternLM2 language model), safetensors (one file or shards with an index) and a tokenizer.
mmMamba is HoVLE with every decoder layer's attention converted, so the model is HoVLE's computation:

- the image: ``embedding_model.vision_embeddings`` (14 px ``patch_embedding`` convolution plus
  ``position_embedding``, whose first row is a class position HoVLE does not add), pixel shuffle 0.5 and
  ``embedding_model.pixel_shuffle_proj`` (Linear 4D -> D, GELU, Linear D -> D): the ``hovle_patch`` encoder and the
  ``mlp_gelu`` projector, 256 slots for one 448 px tile;
- the text: ``embedding_model.llm_text_embeddings`` (ids below its rows) and ``special_text_embeddings`` (the ids
  after them), which become the ``text_lm`` head's embedding; the image features replace the ``<IMG_CONTEXT>``
  positions;
- the layers: ``embedding_model.encoder.{i}`` over the whole sequence, then, without a norm between them,
  ``language_model.model.layers.{i}``: one student backbone of E + L layers (embedding layer i is layer i, language
  layer i is layer E + i), then ``language_model.model.norm`` and ``language_model.output``.

Each layer holds either a packed mmMamba mixer (``attention.wvkqgdt.weight``, rows [v, k, q, g, dt], ``conv1d``,
``g_norm_swish_gate``, ``dt_bias``, ``A_log_bias``, ``o_proj``) or, in a hybrid, InternLM2's ``attention.wqkv`` and
``attention.wo``; which one is read from the tensors. ``language_model.model.tok_embeddings`` is never read by
HoVLE (the language model always gets the embedding module's output) and is listed as unused.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from omnicore.errors import CheckpointError

from .hf_config import read_hf_config, read_json

MODEL_TYPE = "mmMamba_chat"
LLM_LAYER = re.compile(r"^language_model\.model\.layers\.(\d+)\.(.+)$")
EMB_LAYER = re.compile(r"^embedding_model\.encoder\.(\d+)\.(.+)$")
VISION = "embedding_model.vision_embeddings."
PROJ = "embedding_model.pixel_shuffle_proj."
TEXT = "embedding_model.llm_text_embeddings.weight"
SPECIAL = "embedding_model.special_text_embeddings.weight"
# HoVLE's forward never reads these: the language model gets inputs_embeds from the embedding module
UNUSED = ("language_model.model.tok_embeddings.weight",)
# the internlm2-chat conversation template's default system message, which HoVLE's chat() sends
HOVLE_SYSTEM = ("你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, "
                "是一个有用无害的人工智能助手。")
_LLM_KEYS = {"hidden_size": "d_model", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
             "num_key_value_heads": "n_kv_head", "intermediate_size": "d_intermediate", "rope_theta": "rope_theta",
             "rms_norm_eps": "rms_norm_eps", "max_position_embeddings": "max_position_embeddings",
             "bias": "attention_bias", "hidden_act": "hidden_act"}
# settings the embedding layers must share with the language model's to be one stack
# (embedding_config's default, llm_config's default): HolisticEmbeddingConfig's and InternLM2Config's
_SAME = {"hidden_size": (None, None), "num_attention_heads": (None, None), "num_key_value_heads": (None, None),
         "intermediate_size": (None, None), "rms_norm_eps": (1e-5, 1e-6), "hidden_act": ("silu", "silu")}
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


def _embedding_config(config: dict[str, Any], where: str) -> dict[str, Any]:
    """``embedding_config``, refusing the HoVLE settings this import does not compute (one line each)."""
    emb = config.get("embedding_config")
    if not isinstance(emb, dict):
        raise CheckpointError(f"{where}: no embedding_config (HoVLE's holistic embedding settings)")
    llm = config["llm_config"]
    if "num_hidden_layers" not in emb:
        raise CheckpointError(f"{where}: embedding_config.num_hidden_layers is missing")
    for key, (default, llm_default) in _SAME.items():
        ours, theirs = emb.get(key, default), llm.get(key, llm_default)
        if key == "num_key_value_heads":
            ours = emb.get(key, emb.get("num_attention_heads"))
            theirs = llm.get(key, llm.get("num_attention_heads"))
        if ours != theirs:
            raise CheckpointError(f"{where}: embedding_config.{key} {ours!r} differs from llm_config.{key} "
                                  f"{theirs!r}; only embedding layers shaped as the language model's are supported")
    if emb.get("llm_hidden_size", emb["hidden_size"]) != emb["hidden_size"]:
        raise CheckpointError(f"{where}: embedding_config.llm_hidden_size {emb['llm_hidden_size']!r} differs from "
                              f"its hidden_size {emb['hidden_size']!r}")
    location = emb.get("pixel_shuffle_loc", "pre")
    if location != "pre":
        raise CheckpointError(f"{where}: embedding_config.pixel_shuffle_loc {location!r} is not supported (only "
                              "'pre': the pixel shuffle and MLP before the embedding layers)")
    if emb.get("use_pixel_shuffle_proj") is False:
        raise CheckpointError(f"{where}: embedding_config.use_pixel_shuffle_proj false is not supported")
    for key, value in (("downsample_ratio", config.get("downsample_ratio", 0.5)),
                       ("embedding_config.downsample_ratio", emb.get("downsample_ratio", 0.5))):
        if value != 0.5:
            raise CheckpointError(f"{where}: {key} {value!r} is not supported (only 0.5)")
    if config.get("normalize_encoder_output"):
        raise CheckpointError(f"{where}: normalize_encoder_output true is not supported")
    template = config.get("template", "internlm2-chat")
    if template != "internlm2-chat":
        raise CheckpointError(f"{where}: template {template!r} is not supported (only 'internlm2-chat')")
    return emb


def _rope_for(emb: dict[str, Any], teacher: dict[str, Any], emb_attention: bool, llm_attention: bool,
              where: str) -> dict[str, Any]:
    """The RoPE settings of the stack: only attention (hybrid) layers use them, so the two parts must agree only
    when both keep attention."""
    ours = {"rope_theta": emb.get("rope_theta", 10000.0), "rope_scaling": emb.get("rope_scaling") or None}
    theirs = {"rope_theta": teacher.get("rope_theta", 10000.0), "rope_scaling": teacher.get("rope_scaling")}
    if emb_attention and llm_attention and ours != theirs:
        raise CheckpointError(f"{where}: embedding_config's RoPE {ours} differs from llm_config's {theirs}; a hybrid "
                              "with attention layers in both parts needs one RoPE")
    return ours if emb_attention and not llm_attention else theirs


def _rows(table: torch.Tensor, rows: int) -> torch.Tensor:
    """A token table with ``rows`` rows: the checkpoint's padding rows past the vocabulary dropped, rows the
    tokenizer adds beyond the checkpoint's started at the mean of its rows."""
    if table.shape[0] >= rows:
        return table[:rows]
    return torch.cat([table, table.float().mean(0).to(table.dtype).expand(rows - table.shape[0], -1)])


def hovle_layout(tokenizer, system_message: str | None = HOVLE_SYSTEM):
    """HoVLE's chat prompt (internlm2-chat, its system message, the tokenizer's BOS first as InternLM2's tokenizer
    adds it): ``<s><|im_start|>system\\n{system}<|im_end|><|im_start|>user\\n<img>`` + slots + ``</img>\\n{question}
    <|im_end|><|im_start|>assistant\\n``."""
    import dataclasses

    from .layouts import internvl_layout

    base = internvl_layout()
    bos = "<s>" if len(tokenizer.encode("<s>")) == 1 else ""
    system = "" if system_message is None else f"<|im_start|>system\n{system_message}<|im_end|>"
    return dataclasses.replace(base, head=bos + system + base.head)


def _vision(tensors: dict[str, torch.Tensor], emb: dict[str, Any], config: dict[str, Any], d_model: int,
            source: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The ``hovle_patch`` encoder's params and the encoder and projector tensors."""
    names = {"patch_embedding.weight": VISION + "patch_embedding.weight",
             "patch_embedding.bias": VISION + "patch_embedding.bias",
             "position_embedding": VISION + "position_embedding",
             "class_embedding": VISION + "class_embedding"}
    for key in list(names.values()) + [PROJ + f"{i}.{p}" for i in (0, 2) for p in ("weight", "bias")]:
        if key not in tensors:
            raise CheckpointError(f"{source}: missing tensor {key!r}")
    conv = tensors[names["patch_embedding.weight"]]
    if conv.dim() != 4 or conv.shape[0] != d_model or conv.shape[2] != conv.shape[3]:
        raise CheckpointError(f"{source}: {names['patch_embedding.weight']!r} has shape {tuple(conv.shape)}, not "
                              f"({d_model}, channels, patch, patch)")
    patch = int(conv.shape[2])
    if emb.get("patch_size", patch) != patch:
        raise CheckpointError(f"{source}: embedding_config.patch_size {emb['patch_size']} differs from "
                              f"{names['patch_embedding.weight']!r}'s {patch} px kernel")
    positions = tensors[names["position_embedding"]].shape[1] - 1
    grid = int(round(positions ** 0.5))
    if grid * grid != positions:
        raise CheckpointError(f"{source}: {names['position_embedding']!r} has {positions} patch rows after its "
                              "class row: not a square grid")
    image_size = config.get("force_image_size") or emb.get("image_size") or grid * patch
    params = {"width": d_model, "image_size": int(image_size), "patch_size": patch, "position_grid": grid,
              "channels": int(conv.shape[1])}
    state = {f"encoder.{ours}": tensors[theirs] for ours, theirs in names.items()}
    state.update({f"projector.projector.{i}.{p}": tensors[PROJ + f"{i}.{p}"] for i in (0, 2)
                  for p in ("weight", "bias")})
    return params, state


def convert_mmmamba(source: str | Path, output: str | Path, tokenizer: str | Path | None = None,
                    max_text_tokens: int = 4096, system_message: str | None = HOVLE_SYSTEM) -> Path:
    """Write ``output``, an omnicore model directory, from the mmMamba release in ``source`` (its tokenizer.json, or
    ``tokenizer``): HoVLE's image embedding as encoder and projector, its embedding layers and the language model's
    as one student backbone. ``system_message``: the chat prompt's system turn (HoVLE's default; None: none).
    One-line CheckpointError naming the file or tensor at fault."""
    from omnicore.convert.strict import check_tensors, shapes
    from omnicore.model.unified import build_from_spec, write_model_dir

    from ..mamba2.mmmamba_mixer import inference_config, unpack_inference
    from .weights import unpack_internlm2_qkv

    source = Path(source)
    config = read_hf_config(source)
    where = f"{source}/config.json"
    if config.get("model_type") != MODEL_TYPE:
        raise CheckpointError(f"{where}: model_type {config.get('model_type')!r} is not {MODEL_TYPE!r}")
    teacher = _teacher_params(config, where)
    emb = _embedding_config(config, where)
    tok = Path(tokenizer) if tokenizer is not None else source / "tokenizer.json"
    if not tok.is_file():
        raise CheckpointError(f"{source}: no tokenizer.json; give the tokenizer file (a tokenizer.json with "
                              "InternLM2's <|im_start|>, <|im_end|>, <img>, </img> and <IMG_CONTEXT>)")
    tensors = _read_tensors(source)
    n_emb, n_llm = int(emb["num_hidden_layers"]), int(teacher["n_layer"])
    # global index: embedding layer i -> i, language layer i -> n_emb + i
    layers: dict[int, dict[str, torch.Tensor]] = {}
    origin: dict[int, str] = {}
    held: dict[str, set[int]] = {"embedding_model.encoder": set(), "language_model.model.layers": set()}
    used: set[str] = set()
    for key, value in tensors.items():
        m = EMB_LAYER.match(key) or LLM_LAYER.match(key)
        if m:
            own = int(m.group(1))
            first = key.startswith("embedding_model.")
            held["embedding_model.encoder" if first else "language_model.model.layers"].add(own)
            i = own if first else n_emb + own
            layers.setdefault(i, {})[m.group(2)] = value
            origin[i] = key[: m.start(2)]
            used.add(key)
    for (prefix, numbers), (part, count) in zip(held.items(), (("embedding_config", n_emb), ("llm_config", n_llm))):
        if sorted(numbers) != list(range(count)):
            shown = sorted(numbers)[:4]
            raise CheckpointError(f"{source}: {prefix} holds layers {shown}{'...' if len(numbers) > 4 else ''}, "
                                  f"{part}.num_hidden_layers is {count}")
    n_layer = n_emb + n_llm
    hybrid = [i for i in range(n_layer) if "attention.wqkv.weight" in layers[i]]
    mixers = [i for i in range(n_layer) if "attention.wvkqgdt.weight" in layers[i]]
    neither = sorted(set(range(n_layer)) - set(hybrid) - set(mixers))
    if neither:
        raise CheckpointError(f"{source}: {origin[neither[0]]}attention has neither wvkqgdt.weight (mmMamba) nor "
                              "wqkv.weight (attention)")
    for part, offset, count in (("embedding_config", 0, n_emb), ("llm_config", n_emb, n_llm)):
        kinds = (config.get(part) or {}).get("layers_block_type")
        if isinstance(kinds, list) and len(kinds) == count:
            bad = [i for i in range(count) if (kinds[i] == "mha") != (offset + i in hybrid)]
            if bad:
                raise CheckpointError(f"{source}: {origin[offset + bad[0]]}attention does not match "
                                      f"{part}.layers_block_type[{bad[0]}] {kinds[bad[0]]!r}")
    teacher["n_layer"] = n_layer
    rope = _rope_for(emb, teacher, any(i < n_emb for i in hybrid), any(i >= n_emb for i in hybrid), where)
    teacher.pop("rope_scaling", None)
    teacher.update({k: v for k, v in rope.items() if v is not None})
    mixer_options = {}
    if mixers:
        packed0 = {k[len("attention."):]: v for k, v in layers[mixers[0]].items()
                   if k.startswith("attention.") and k[len("attention."):] in _MIXER_PACKED}
        shape = inference_config(packed0, f"{source}: {origin[mixers[0]]}attention")
        mixer_options["conv_width"] = shape["conv_width"]
        teacher.setdefault("head_dim", shape["head_dim"])
        teacher.setdefault("n_kv_head", shape["num_kv_heads"])
    if TEXT not in tensors:
        raise CheckpointError(f"{source}: missing tensor {TEXT!r}")
    table = tensors[TEXT]
    if SPECIAL in tensors:  # ids past llm_text_embeddings' rows index special_text_embeddings
        table = torch.cat([table, tensors[SPECIAL].to(table.dtype)])
    vision_params, state = _vision(tensors, emb, config, int(teacher["d_model"]), source)
    from omnicore.registry import create

    text_tokenizer = {"type": "hf_tokenizer", "params": {"path": str(tok)}}
    layout = hovle_layout(create("text_tokenizer", "hf_tokenizer", **text_tokenizer["params"]), system_message)
    spec = {"max_text_tokens": max_text_tokens, "mmu_template": layout.spec(), "text_tokenizer": text_tokenizer,
            "encoder": {"type": "hovle_patch", "params": vision_params},
            "projector": {"type": "mlp_gelu", "params": {"hidden_dim": int(teacher["d_model"]), "depth": 2}},
            "backbone": {"type": "student", "params": {"teacher": teacher, "hybrid": hybrid, "mixer": "mmmamba",
                                                        "mixer_options": mixer_options}},
            "heads": {"text": {"type": "text_lm"}}}
    with torch.device("meta"):  # shapes only: every tensor comes from the release
        shell = build_from_spec(spec)
    real_ids = getattr(shell.text_tokenizer, "base_vocab_size", shell.text_tokenizer.vocab_size)
    if real_ids > table.shape[0]:
        raise CheckpointError(f"{tok}: the tokenizer has {real_ids} ids, the checkpoint's text embedding only "
                              f"{table.shape[0]} rows: it is not this checkpoint's tokenizer")
    if len(shell.text_tokenizer.encode(layout.image_token)) != 1:
        raise CheckpointError(f"{tok}: {layout.image_token} is not one token: it is not HoVLE's tokenizer")
    backbone = shell.backbone
    for i in range(n_layer):
        here, prefix, theirs_prefix = layers[i], f"backbone.layers.{i}.", origin[i]
        for theirs, ours in _RENAMES.items():
            if theirs not in here:
                raise CheckpointError(f"{source}: missing tensor '{theirs_prefix}{theirs}'")
            state[prefix + ours] = here[theirs]
        attn = backbone.layers[i].self_attn
        if i in hybrid:
            q, k, v = unpack_internlm2_qkv(here["attention.wqkv.weight"], attn.config.num_attention_heads,
                                           attn.config.num_key_value_heads, attn.head_dim)
            state.update({prefix + "self_attn.q_proj.weight": q, prefix + "self_attn.k_proj.weight": k,
                          prefix + "self_attn.v_proj.weight": v})
            if "attention.wo.weight" not in here:
                raise CheckpointError(f"{source}: missing tensor '{theirs_prefix}attention.wo.weight'")
            state[prefix + "self_attn.o_proj.weight"] = here["attention.wo.weight"]
            extra = sorted(set(here) - {"attention.wqkv.weight", "attention.wo.weight", *_RENAMES})
        else:
            packed = {k[len("attention."):]: v for k, v in here.items() if k.startswith("attention.")}
            own = unpack_inference(packed, attn, f"{source}: {theirs_prefix}attention")
            state.update({prefix + "self_attn." + k: v for k, v in own.items()})
            extra = sorted(k for k in here if not k.startswith("attention.") and k not in _RENAMES)
        if extra:
            raise CheckpointError(f"{source}: unexpected tensor '{theirs_prefix}{extra[0]}'")
    for key in ("language_model.model.norm.weight", "language_model.output.weight"):
        if key not in tensors:
            raise CheckpointError(f"{source}: missing tensor {key!r}")
    rows = shell.heads["text"].embedding.weight.shape[0]
    state["backbone.norm.weight"] = tensors["language_model.model.norm.weight"]
    state["heads.text.embedding.weight"] = _rows(table, rows)
    state["heads.text.lm_head.weight"] = _rows(tensors["language_model.output.weight"], rows)
    check_tensors(state, shapes(shell.state_dict()), f"{source}")
    used |= {TEXT, SPECIAL, "language_model.model.norm.weight", "language_model.output.weight", *UNUSED}
    used |= {k for k in tensors if k.startswith((VISION, PROJ))}
    leftover = sorted(k for k in tensors if k not in used)
    if leftover:  # a tensor no part of this import reads: refuse rather than drop it silently
        raise CheckpointError(f"{source}: tensor {leftover[0]!r} is not part of mmMamba's known layout "
                              f"({len(leftover)} such)")
    unused = [k for k in UNUSED if k in tensors]
    preprocessing = {"tiles": 1, "image_size": vision_params["image_size"],
                     "release": {k: config[k] for k in ("dynamic_image_size", "max_dynamic_patch",
                                                         "min_dynamic_patch", "use_thumbnail") if k in config}}
    config_out = {"model": spec, "imported_from": {
        "format": MODEL_TYPE, "path": str(source), "layers": {"embedding": n_emb, "language_model": n_llm},
        "not_imported": [], "unused": unused, "preprocessing": preprocessing}}
    return write_model_dir(output, config_out, {k: v.contiguous() for k, v in state.items()})
