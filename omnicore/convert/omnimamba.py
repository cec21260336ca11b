"""The released OmniMamba checkpoint (``OmniMamba-1.3b.pth``) in and out of an omnicore model directory.

The release is a flat fp16 state dict of the language side (Mamba-2 backbone with task LoRA pairs on in_proj,
text and image-code tables, caption MLP, position tables) and the MMU projector, plus untied copies of the two
heads. The vision towers (DINOv2, SigLIP) and the VQ tokenizer come from their own files. ``convert`` maps every
tensor to omnicore's names (nothing recomputed, fp16 kept: ``omnicore.load`` upcasts into the fp32 model, as the
released inference does) and writes an ordinary model directory; ``export`` writes the release's layout back.

Every dimension comes from the tensors' shapes. Loading is strict: a missing, unexpected or misshapen tensor, or a
head copy that differs from its table, is a one-line CheckpointError naming it. The model is never built in
memory: its names and shapes come from a shell on the meta device, and the file's (memory-mapped) tensors are
passed to the writer as they are, one dict entry moved at a time.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ..errors import CheckpointError
from .strict import check_tensors, shapes

PREFIX = "llm_backbone.mamba.backbone."
LM_HEAD = "llm_backbone.mamba.lm_head.weight"
IMG_HEAD = "llm_backbone.mamba.img_head.weight"
EMBEDDING = PREFIX + "embedding.weight"
IMG_TABLE = PREFIX + "img_embeddings.word_embeddings.weight"
TASKS = ("mmu", "t2i")
TIED = {LM_HEAD: EMBEDDING, IMG_HEAD: IMG_TABLE}  # head copy -> the table it must equal
# the release's LoRA: r 8, alpha 32 (scale 4); alpha is not in the file
LORA_ALPHA = 32.0
LORA_DROPOUT = 0.05
CAPTION_TOKENS = 68
VisionSize = Literal["full", "tiny"]


@dataclass(frozen=True)
class OmniMambaDims:
    """What the release's tensor shapes say (ngroups is 1: mamba_ssm's default, which the release uses)."""

    d_model: int
    n_layer: int
    d_inner: int
    d_state: int
    nheads: int
    d_conv: int
    lora_r: int
    vocab_rows: int
    codebook_size: int
    caption_hidden: int
    t2i_rows: int
    mmu_rows: int
    vision_dim: int
    vision_hidden: int

    @property
    def headdim(self) -> int:
        return self.d_inner // self.nheads

    @property
    def expand(self) -> int:
        return self.d_inner // self.d_model

    @property
    def d_in_proj(self) -> int:
        return 2 * self.d_inner + 2 * self.d_state + self.nheads


# --- names ----------------------------------------------------------------------------------------------------------
_LAYER = re.compile(re.escape(PREFIX) + r"layers\.(\d+)\.(.+)")
_LORA = re.compile(r"mixer\.in_proj\.(\w+)_lora_([AB])0\.weight")
_FIXED = {
    EMBEDDING: "heads.text.embedding.weight",
    IMG_TABLE: "heads.image.embedding.weight",
    PREFIX + "pos_embed": "heads.t2i_positions.weight",
    PREFIX + "mmu_pos_embed": "heads.mmu_positions.weight",
    PREFIX + "caption_embed.cap_proj.fc1.weight": "heads.caption.fc1.weight",
    PREFIX + "caption_embed.cap_proj.fc2.weight": "heads.caption.fc2.weight",
    PREFIX + "norm_f.weight": "backbone.norm_f.weight",
    **{f"{PREFIX}img_embeddings.project_in.projector.{i}.{p}": f"heads.image.proj.{i}.{p}"
       for i in (0, 2, 4) for p in ("weight", "bias")},
    **{f"projector.projector.{i}.{p}": f"projector.projector.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")},
}
_FIXED_BACK = {v: k for k, v in _FIXED.items()}
POSITION_TABLES = (PREFIX + "pos_embed", PREFIX + "mmu_pos_embed")  # (1, rows, d) there, (rows, d) here


def omnicore_name(name: str) -> str | None:
    """The omnicore model's name for a tensor of the release (None: not one of the model's tensors)."""
    if name in _FIXED:
        return _FIXED[name]
    m = _LAYER.fullmatch(name)
    if m is None:
        return None
    layer, rest = m.groups()
    lora = _LORA.fullmatch(rest)
    if lora is not None:
        task, ab = lora.groups()
        return f"backbone.layers.{layer}.mixer.in_proj.lora_{ab}.{task}.weight"
    if rest == "mixer.in_proj.weight":
        return f"backbone.layers.{layer}.mixer.in_proj.base_layer.weight"
    return f"backbone.layers.{layer}.{rest}"


def official_name(name: str) -> str | None:
    """The release's name for an omnicore model tensor (None: the release does not hold it)."""
    if name in _FIXED_BACK:
        return _FIXED_BACK[name]
    m = re.fullmatch(r"backbone\.layers\.(\d+)\.(.+)", name)
    if m is None:
        return None
    layer, rest = m.groups()
    lora = re.fullmatch(r"mixer\.in_proj\.lora_([AB])\.(\w+)\.weight", rest)
    if lora is not None:
        ab, task = lora.groups()
        return f"{PREFIX}layers.{layer}.mixer.in_proj.{task}_lora_{ab}0.weight"
    if rest == "mixer.in_proj.base_layer.weight":
        return f"{PREFIX}layers.{layer}.mixer.in_proj.weight"
    return f"{PREFIX}layers.{layer}.{rest}"


def official_shapes(d: OmniMambaDims) -> dict[str, tuple[int, ...]]:
    """Every tensor the release holds, with its shape, at dimensions ``d``."""
    D, di, gs = d.d_model, d.d_inner, d.d_state
    out: dict[str, tuple[int, ...]] = {
        EMBEDDING: (d.vocab_rows, D), LM_HEAD: (d.vocab_rows, D),
        IMG_TABLE: (d.codebook_size, D), IMG_HEAD: (d.codebook_size, D),
        PREFIX + "img_embeddings.project_in.projector.0.weight": (4 * D, D),
        PREFIX + "img_embeddings.project_in.projector.0.bias": (4 * D,),
        PREFIX + "img_embeddings.project_in.projector.2.weight": (D, 4 * D),
        PREFIX + "img_embeddings.project_in.projector.2.bias": (D,),
        PREFIX + "img_embeddings.project_in.projector.4.weight": (D, D),
        PREFIX + "img_embeddings.project_in.projector.4.bias": (D,),
        PREFIX + "pos_embed": (1, d.t2i_rows, D),
        PREFIX + "mmu_pos_embed": (1, d.mmu_rows, D),
        PREFIX + "caption_embed.cap_proj.fc1.weight": (d.caption_hidden, D),
        PREFIX + "caption_embed.cap_proj.fc2.weight": (D, d.caption_hidden),
        PREFIX + "norm_f.weight": (D,),
        "projector.projector.0.weight": (d.vision_hidden, d.vision_dim),
        "projector.projector.0.bias": (d.vision_hidden,),
        "projector.projector.2.weight": (D, d.vision_hidden), "projector.projector.2.bias": (D,),
        "projector.projector.4.weight": (D, D), "projector.projector.4.bias": (D,),
    }
    for i in range(d.n_layer):
        m = f"{PREFIX}layers.{i}.mixer."
        out[f"{PREFIX}layers.{i}.norm.weight"] = (D,)
        out[m + "in_proj.weight"] = (d.d_in_proj, D)
        for task in TASKS:
            out[m + f"in_proj.{task}_lora_A0.weight"] = (d.lora_r, D)
            out[m + f"in_proj.{task}_lora_B0.weight"] = (d.d_in_proj, d.lora_r)
        out[m + "conv1d.weight"] = (di + 2 * gs, 1, d.d_conv)
        out[m + "conv1d.bias"] = (di + 2 * gs,)
        for name in ("dt_bias", "A_log", "D"):
            out[m + name] = (d.nheads,)
        out[m + "norm.weight"] = (di,)
        out[m + "out_proj.weight"] = (D, di)
    return out


# --- reading the release ----------------------------------------------------------------------------------------------
def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The release's flat state dict, memory-mapped (``torch.load(weights_only=True, mmap=True)``: no pickle code
    runs and the tensors are read from the file when used)."""
    from ..training.checkpoint import read_torch_file

    path = Path(path)
    state = read_torch_file(path, "checkpoint file")
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{path}: not a state dict (the release is a flat dict of tensors)")
    bad = next((k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise CheckpointError(f"{path}: entry {bad!r} is not a named tensor (the release is a flat dict of tensors)")
    return state


def _dim(state: dict[str, torch.Tensor], name: str, ndim: int, axis: int, where: str) -> int:
    if name not in state:
        raise CheckpointError(f"{where}: missing tensor {name!r}: the converter reads the model's sizes from it")
    t = state[name]
    if t.dim() != ndim:
        raise CheckpointError(f"{where}: shape mismatch for {name!r}: {tuple(t.shape)}, expected {ndim} dimensions")
    return int(t.shape[axis])


def infer_dims(state: dict[str, torch.Tensor], where: str) -> OmniMambaDims:
    """The dimensions, from the shapes of a few tensors (each named in the error when it is missing or of the
    wrong rank); the other tensors are then checked against them."""
    layers = {int(m.group(1)) for m in map(_LAYER.fullmatch, state) if m is not None}
    if not layers:
        raise CheckpointError(f"{where}: no tensor named {PREFIX}layers.*: not an OmniMamba checkpoint")
    mixer = f"{PREFIX}layers.0.mixer."
    d_model = _dim(state, EMBEDDING, 2, 1, where)
    d_inner = _dim(state, mixer + "norm.weight", 1, 0, where)
    nheads = _dim(state, mixer + "A_log", 1, 0, where)
    conv_dim = _dim(state, mixer + "conv1d.weight", 3, 0, where)
    if nheads < 1 or d_inner % nheads or d_inner % d_model or conv_dim <= d_inner or (conv_dim - d_inner) % 2:
        raise CheckpointError(f"{where}: the shapes of {mixer}norm.weight ({d_inner}), A_log ({nheads}) and "
                              f"conv1d.weight ({conv_dim}) do not describe a Mamba-2 mixer over d_model {d_model}")
    return OmniMambaDims(
        d_model=d_model, n_layer=max(layers) + 1, d_inner=d_inner, d_state=(conv_dim - d_inner) // 2, nheads=nheads,
        d_conv=_dim(state, mixer + "conv1d.weight", 3, 2, where),
        lora_r=_dim(state, mixer + "in_proj.mmu_lora_A0.weight", 2, 0, where),
        vocab_rows=_dim(state, EMBEDDING, 2, 0, where),
        codebook_size=_dim(state, IMG_TABLE, 2, 0, where),
        caption_hidden=_dim(state, PREFIX + "caption_embed.cap_proj.fc1.weight", 2, 0, where),
        t2i_rows=_dim(state, PREFIX + "pos_embed", 3, 1, where),
        mmu_rows=_dim(state, PREFIX + "mmu_pos_embed", 3, 1, where),
        vision_dim=_dim(state, "projector.projector.0.weight", 2, 1, where),
        vision_hidden=_dim(state, "projector.projector.0.weight", 2, 0, where))


def check_release(state: dict[str, torch.Tensor], where: str) -> OmniMambaDims:
    """Strict: exactly the release's tensors at the inferred dimensions, head copies equal to their tables."""
    dims = infer_dims(state, where)
    check_tensors(state, official_shapes(dims), where)
    for head, table in TIED.items():
        if not torch.equal(state[head], state[table]):
            raise CheckpointError(f"{where}: {head!r} differs from {table!r}; the model's head is tied to that table")
    return dims


def _vq_params(path: Path) -> dict:
    """The ``vqgan`` params of a LlamaGen VQ file, from its shapes (the rest is LlamaGen VQ-16's: l2-normalised
    codebook, 32 norm groups)."""
    from ..training.checkpoint import load_state_dict_file

    state = load_state_dict_file(path)
    where = f"{path}: image_tokenizer"
    levels = sorted({int(m.group(1)) for m in (re.fullmatch(r"encoder\.conv_blocks\.(\d+)\.res\.0\.conv1\.weight", k)
                                               for k in state) if m})
    res = {int(m.group(1)) for m in (re.fullmatch(r"encoder\.conv_blocks\.0\.res\.(\d+)\.conv1\.weight", k)
                                     for k in state) if m}
    for name in ("encoder.conv_in.weight", "encoder.conv_out.weight", "quantize.embedding.weight"):
        if name not in state:
            raise CheckpointError(f"{where}: missing tensor {name!r}: the converter reads the VQ's sizes from it")
    if not levels or not res:
        raise CheckpointError(f"{where}: no encoder.conv_blocks.*.res.*: not a LlamaGen VQ file")
    ch = int(state["encoder.conv_in.weight"].shape[0])
    mults = [int(state[f"encoder.conv_blocks.{i}.res.0.conv1.weight"].shape[0]) // ch for i in levels]
    book = state["quantize.embedding.weight"]
    return {"ch": ch, "ch_mult": mults, "num_res_blocks": max(res) + 1,
            "z_channels": int(state["encoder.conv_out.weight"].shape[0]),
            "codebook_size": int(book.shape[0]), "codebook_embed_dim": int(book.shape[1])}


def _tokenizer_file(path: Path) -> Path:
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(f"{path}: no tokenizer.json there")
    return file


def release_spec(d: OmniMambaDims, tokenizer_file: str | Path, vq_params: dict, image_size: int,
                 max_text_tokens: int, *, vision_size: VisionSize = "full", mmu_template: str = "omnimamba-chat",
                 max_caption_tokens: int = CAPTION_TOKENS, lora_alpha: float = LORA_ALPHA,
                 lora_dropout: float = LORA_DROPOUT) -> dict:
    """The omnicore model spec of a release of dimensions ``d``: what ``convert`` writes into config.json, and what
    the recipes in recipes/omnimamba-1.3b/ describe (a test builds both and compares every tensor's shape)."""
    projector = {"fused": True} if d.vision_hidden == 4 * d.vision_dim else {"fused": True,
                                                                              "hidden_dim": d.vision_hidden}
    return {
        "image_size": image_size, "max_caption_tokens": max_caption_tokens,
        "max_text_tokens": max_text_tokens, "mmu_template": mmu_template,
        "encoder": {"type": "dinosiglip", "params": {"size": vision_size}},
        "projector": {"type": "mlp_gelu", "params": projector},
        "image_tokenizer": {"type": "vqgan", "params": vq_params},
        "text_tokenizer": {"type": "hf_tokenizer",
                           "params": {"path": str(tokenizer_file), "added_tokens": "omnimamba"}},
        "backbone": {"type": "mamba2", "params": {
            "d_model": d.d_model, "n_layer": d.n_layer, "d_state": d.d_state, "headdim": d.headdim,
            "expand": d.expand, "d_conv": d.d_conv, "ngroups": 1,
            "lora": {"tasks": list(TASKS), "r": d.lora_r, "alpha": lora_alpha, "dropout": lora_dropout}}},
        "heads": {
            "text": {"type": "text_vocab"},
            "image": {"type": "image_vocab", "params": {"proj": "fused"}},
            "caption": {"type": "caption_mlp", "params": {"hidden_dim": d.caption_hidden}},
            "mmu_positions": {"type": "position_table", "params": {"num_positions": d.mmu_rows}},
            "t2i_positions": {"type": "position_table", "params": {"num_positions": d.t2i_rows}},
        },
    }


# --- convert --------------------------------------------------------------------------------------------------------
def convert(checkpoint: str | Path, tokenizer: str | Path, vq: str | Path, dino: str | Path, siglip: str | Path,
            out_dir: str | Path, *, mmu_template: str = "omnimamba-chat", vision_size: VisionSize = "full",
            max_caption_tokens: int = CAPTION_TOKENS, lora_alpha: float = LORA_ALPHA,
            lora_dropout: float = LORA_DROPOUT) -> Path:
    """Write an omnicore model directory (``omnicore.load`` reads it) from the released files.

    ``tokenizer``: GPT-NeoX-20B's tokenizer.json or its directory; ``vq``: LlamaGen's ``vq_ds16_t2i.pt``; ``dino``
    and ``siglip``: the towers' timm / open_clip files; ``mmu_template``: the MMU prompt (``omnimamba-chat``: the
    released inference's; ``omnimamba-train``: its training format); ``vision_size``: ``tiny`` for test towers."""
    from ..model.layout import mmu_template as check_template
    from ..model.unified import build_from_spec, write_model_dir
    from ..registry import create

    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    check_template(mmu_template)
    state = read_checkpoint(checkpoint)
    where = str(checkpoint)
    d = check_release(state, where)

    tok_file = _tokenizer_file(Path(tokenizer))
    text_tok = create("text_tokenizer", "hf_tokenizer", path=str(tok_file), added_tokens="omnimamba")
    if text_tok.vocab_size != d.vocab_rows:
        raise CheckpointError(f"{tok_file}: {text_tok.vocab_size} token rows with OmniMamba's added tokens, but "
                              f"{EMBEDDING!r} has {d.vocab_rows}: not the release's tokenizer")

    vq_params = _vq_params(Path(vq))
    image_tok = create("image_tokenizer", "vqgan", **vq_params, weights=str(vq))
    if vq_params["codebook_size"] != d.codebook_size:
        raise CheckpointError(f"{vq}: a codebook of {vq_params['codebook_size']} codes, but {IMG_TABLE!r} has "
                              f"{d.codebook_size} rows")
    n_codes = d.t2i_rows - (max_caption_tokens + 4) - 1  # [t2i, sot, caption, eot, soi] + codes + 1 spare row
    side = math.isqrt(max(n_codes, 0))
    if n_codes < 1 or side * side != n_codes:
        raise CheckpointError(f"{where}: {PREFIX}pos_embed has {d.t2i_rows} rows: with a {max_caption_tokens + 4}-"
                              f"token prefix that leaves {n_codes} codes, not a square grid")
    encoder = create("encoder", "dinosiglip", size=vision_size, dino_weights=str(dino), siglip_weights=str(siglip))
    if encoder.embed_dim != d.vision_dim:
        raise CheckpointError(f"{dino}, {siglip}: features {encoder.embed_dim} wide, but projector.projector.0.weight "
                              f"takes {d.vision_dim}")
    prefix = 4 + encoder.num_patches
    if prefix >= d.mmu_rows:
        raise CheckpointError(f"{where}: {PREFIX}mmu_pos_embed has {d.mmu_rows} rows, fewer than the "
                              f"{prefix + 1} an image prompt needs")

    spec = release_spec(d, tok_file, vq_params, side * image_tok.downsample, d.mmu_rows - prefix,
                        vision_size=vision_size, mmu_template=mmu_template, max_caption_tokens=max_caption_tokens,
                        lora_alpha=lora_alpha, lora_dropout=lora_dropout)
    with torch.device("meta"):  # names and shapes only: no memory for the weights
        shell = build_from_spec(copy.deepcopy(spec))
    expected = shapes(shell.state_dict())
    saved_spec = shell.config["model"]
    del shell

    out: dict[str, torch.Tensor] = {}
    for name in list(state):
        tensor = state.pop(name)  # moved, not copied: the mmap'd tensor goes to the writer as it is
        if name in TIED:
            continue  # equal to its table (checked): the model's head is tied to it
        target = omnicore_name(name)
        if target is None:  # check_release accepted it, so the name map lacks it: the converter's own bug
            raise CheckpointError(f"{where}: no omnicore name for {name!r}")
        out[target] = tensor[0] if name in POSITION_TABLES else tensor
    from_file = frozenset(out)  # views of the memory-mapped checkpoint: their pages are given back once written
    out.update({f"encoder.{k}": v for k, v in encoder.state_dict().items()})
    out.update({f"image_tokenizer.{k}": v for k, v in image_tok.state_dict().items()})
    check_tensors(out, expected, f"{where}: converted")
    # the release draws images greedily (its T2I script: top_k 1); generate_images uses that unless told otherwise
    return write_model_dir(out_dir, {"model": saved_spec, "sampling": {"t2i": {"greedy": True}}}, out, from_file)


def _part(name: str) -> str:
    """The model part a tensor belongs to: ``heads.caption_pool``, ``backbone``..."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "heads" else parts[0]


def _check_release_parts(spec: dict, where: Path) -> None:
    """The parts the release's file leaves out must be the release's too, or the official code (which brings its
    own DINOv2 + SigLIP towers and GPT-NeoX tokenizer) would read the exported weights wrongly."""
    encoder = (spec.get("encoder") or {}).get("type")
    if encoder != "dinosiglip":
        raise CheckpointError(f"{where}: model.encoder is {encoder!r}; the release's projector reads DINOv2 + SigLIP "
                              "features (dinosiglip), so only such a model exports")
    tok = spec.get("text_tokenizer") or {}
    if tok.get("type") != "hf_tokenizer" or (tok.get("params") or {}).get("added_tokens") != "omnimamba":
        raise CheckpointError(f"{where}: model.text_tokenizer is not hf_tokenizer with added_tokens: omnimamba; the "
                              "release's token ids are GPT-NeoX-20B's with OmniMamba's added tokens")


# --- export ---------------------------------------------------------------------------------------------------------
def export(model_dir: str | Path, out_file: str | Path) -> Path:
    """Write a model directory's language side and projector in the release's layout: fp16, the release's names,
    position tables as ``(1, rows, d)``, untied copies of the two heads. Vision towers and VQ are not part of
    that file (the release ships them separately)."""
    from ..model.unified import ADAPTERS_FILE, WEIGHTS_FILE, _read_config, _read_weights

    model_dir, out_file = Path(model_dir), Path(out_file)
    config_path, config = _read_config(model_dir)
    _check_release_parts(config.get("model", {}), config_path)
    state = _read_weights(model_dir / WEIGHTS_FILE)
    if (model_dir / ADAPTERS_FILE).exists():
        state.update(_read_weights(model_dir / ADAPTERS_FILE))
    for alias, canonical in config.get("tied", {}).items():
        if canonical in state:
            state[alias] = state[canonical]
    homeless = sorted({_part(n) for n in state if official_name(n) is None
                       and not n.startswith(("encoder.", "image_tokenizer."))})
    if homeless:
        raise CheckpointError(f"{model_dir}: {', '.join(homeless)} ha{'s' if len(homeless) == 1 else 've'} no place in "
                              "the OmniMamba release's layout; only a model of the release's parts exports")
    out: dict[str, torch.Tensor] = {}
    for name in list(state):
        tensor = state.pop(name)
        if name.startswith(("encoder.", "image_tokenizer.")):
            continue
        target = official_name(name)
        tensor = tensor.to(torch.float16).contiguous()
        out[target] = tensor[None] if target in POSITION_TABLES else tensor
    for head, table in TIED.items():
        if table in out:
            out[head] = out[table].clone()  # the release holds its own copy
    check_release(out, f"{model_dir}: exported")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, out_file)
    return out_file
