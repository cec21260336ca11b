"""The unified model: one backbone that both understands images (MMU) and generates them (T2I).

Built from a recipe's ``model:`` block (``omnicore.build``) or by hand from component objects
(``UnifiedModel(...)``). Saved as a directory: config.json, model.safetensors, adapters.safetensors.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import pydantic
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, InputFileError, OmnicoreError
from ..registry import registry
from .layout import CHAT_TEMPLATE_PREFIX, IGNORE, Layout, MMULayout, mmu_layout
from .losses import code_balanced_ce
from .roles import HEAD_INJECTIONS

FORMAT = "omnicore-model"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
ADAPTERS_FILE = "adapters.safetensors"


def is_adapter_param(name: str) -> bool:
    return ".lora_" in name


class UnifiedModel(nn.Module):
    """Encoder -> projector -> backbone -> text head (MMU); caption -> backbone -> image head (T2I)."""

    def __init__(self, *, backbone: nn.Module, text_tokenizer: Any, heads: dict[str, nn.Module],
                 encoder: nn.Module | None = None, projector: nn.Module | None = None,
                 image_tokenizer: nn.Module | None = None, max_caption_tokens: int = 68,
                 max_text_tokens: int = 512, image_size: int = 256, caption_reads: int = 1,
                 mmu_template: "str | MMULayout" = "omnicore", config: dict | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.encoder = encoder
        self.projector = projector
        self.image_tokenizer = image_tokenizer
        self.heads = nn.ModuleDict(heads)
        self.text_tokenizer = text_tokenizer
        self.layout = Layout(text_tokenizer, max_caption_tokens, max_text_tokens, caption_reads, mmu_template)
        _ = self.layout.mmu  # resolved now: a layout name or a tokenizer it cannot use fails at build time
        self.image_size = image_size
        self.config = config or {}
        for required in ("text",):
            if required not in self.heads:
                raise OmnicoreError(f"model: heads.{required} is required")

    # --- properties ------------------------------------------------------------------------------------
    @property
    def d_model(self) -> int:
        return self.backbone.d_model

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @property
    def grid(self) -> tuple[int, int]:
        if self.image_tokenizer is None:
            raise OmnicoreError("model has no image_tokenizer: T2I is unavailable")
        side = self.image_size // self.image_tokenizer.downsample
        return side, side

    @property
    def num_image_codes(self) -> int:
        h, w = self.grid
        return h * w

    def roles(self) -> dict[str, nn.Module]:
        """Role name -> module, as stages name them (``heads.text``... and ``heads`` for all)."""
        out: dict[str, nn.Module] = {}
        for role in ("encoder", "projector", "image_tokenizer", "backbone"):
            if getattr(self, role) is not None:
                out[role] = getattr(self, role)
        for name, head in self.heads.items():
            out[f"heads.{name}"] = head
        return out

    # --- embeddings ------------------------------------------------------------------------------------
    def text_embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.heads["text"].embed(ids)

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Encoder + projector: ``(B, 3, S, S)`` -> ``(B, num_patches, d_model)``."""
        if self.encoder is None or self.projector is None:
            raise OmnicoreError("model has no encoder/projector: MMU with images is unavailable")
        feats = self.encoder(pixels.to(self.device))
        return self.projector(feats)

    @property
    def num_patches(self) -> int:
        return self.encoder.num_patches if self.encoder is not None else 0

    def mmu_embeddings(self, pixels: torch.Tensor | None, has_image: torch.Tensor | None,
                       text_ids: torch.Tensor, batch_size: int) -> torch.Tensor:
        """``[head, image, tail, text]`` embedded (the MMU layout's head and tail: OmniMamba's
        ``<|mmu|>, <|soi|>`` / ``<|eoi|>, <|sot|>``, or a chat layout's); text-only rows get zeros as image."""
        dev = self.device
        head = self._layout_ids("mmu_head_ids", dev).expand(batch_size, -1)
        tail = self._layout_ids("mmu_tail_ids", dev).expand(batch_size, -1)
        parts = [self.text_embed(head)]
        if self.num_patches:
            if pixels is None:
                img = torch.zeros(batch_size, self.num_patches, self.d_model, device=dev)
            else:
                img = self.image_features(pixels)
                if has_image is not None:
                    img = img * has_image.to(dev, img.dtype)[:, None, None]
            parts.append(img.to(parts[0].dtype))
        parts += [self.text_embed(tail), self.text_embed(text_ids.to(dev))]
        return torch.cat(parts, dim=1)

    def _layout_ids(self, name: str, device: torch.device) -> torch.Tensor:
        """The layout's fixed ids as a long tensor on ``device`` (long even when empty: a text-only chat layout has no
        tail), made once: a copy from host memory in every forward would stop a training step from being captured
        as a CUDA graph."""
        ids = getattr(self.layout, name)
        key = (name, tuple(ids), device)
        cache = self.__dict__.setdefault("_ids_on_device", {})
        if key not in cache:
            cache[key] = torch.tensor(ids, dtype=torch.long, device=device)
        return cache[key]

    @property
    def mmu_prefix_len(self) -> int:
        """Positions before the text: the layout's head, the image slots, its tail (OmniMamba's: 2 + slots + 2)."""
        return len(self.layout.mmu_head_ids) + self.num_patches + len(self.layout.mmu_tail_ids)

    def add_positions(self, x: torch.Tensor, table: str, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Add a learned position table's rows (``positions`` (B, L) or 0..L-1)."""
        if table not in self.heads:
            return x
        pos_table = self.heads[table]
        if positions is None:
            positions = torch.arange(x.shape[1], device=x.device)
        return x + pos_table(positions).to(x.dtype)

    def t2i_prefix_embeddings(self, prefix_ids: torch.Tensor) -> torch.Tensor:
        x = self.text_embed(prefix_ids.to(self.device))
        return self.heads["caption"](x) if "caption" in self.heads else x

    def t2i_condition(self, prefix_ids: torch.Tensor) -> torch.Tensor | None:
        """``(B, 1, d_model)``: the caption pooled by ``heads.caption_pool``, which every image-code position adds
        to its input; ``None`` without that head. Pads are left out, so the unconditional prefix pools to zero."""
        if "caption_pool" not in self.heads:
            return None
        ids = prefix_ids[:, self.layout.caption_slice].to(self.device)
        return self.heads["caption_pool"](self.text_embed(ids), ids != self.text_tokenizer.pad_id)[:, None]

    def code_embeddings(self, codes: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        e = self.heads["image"].embed(codes.to(self.device))
        return e if condition is None else e + condition.to(e.dtype)

    # --- losses ----------------------------------------------------------------------------------------
    def mmu_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Next-token loss on answer tokens only."""
        text_ids, labels = batch["text_ids"], batch["labels"].to(self.device)
        x = self.mmu_embeddings(batch.get("pixels"), batch.get("has_image"), text_ids, text_ids.shape[0])
        x = self.add_positions(x, "mmu_positions")
        h = self.backbone(x, task="mmu")
        p = self.mmu_prefix_len
        logits = self.heads["text"].logits(h[:, p - 1: p - 1 + text_ids.shape[1]])
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE)

    @torch.no_grad()
    def images_to_codes(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> flattened codes ``(B, h*w)`` with the (frozen) image tokenizer."""
        codes = self.image_tokenizer.encode(images.to(self.device))
        return codes.flatten(1)

    def t2i_loss(self, batch: dict[str, torch.Tensor], code_balance: float = 0.0) -> torch.Tensor:
        """Next-code loss on image codes only; ``code_balance`` > 0 weighs codes by rarity (``code_balanced_ce``)."""
        prefix = batch["prefix_ids"].to(self.device)
        codes = batch.get("codes")
        codes = self.images_to_codes(batch["images"]) if codes is None else codes.to(self.device)
        logits = self.t2i_logits(prefix, codes)
        return code_balanced_ce(logits.float().flatten(0, 1), codes.flatten(), code_balance)

    def t2i_logits(self, prefix: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Teacher-forced next-code logits ``(B, N, codebook)``: row ``i`` scores code ``i`` given the prefix and
        codes ``< i``."""
        prefix = prefix.to(self.device)
        x = torch.cat([self.t2i_prefix_embeddings(prefix), self.code_embeddings(codes, self.t2i_condition(prefix))],
                      dim=1)
        h = self.backbone(self.add_positions(x, "t2i_positions"), task="t2i")
        p = prefix.shape[1]
        return self.heads["image"].logits(h[:, p - 1: p - 1 + codes.shape[1]])

    def forward(self, batches: dict[str, dict[str, torch.Tensor]],
                options: Optional[dict[str, dict]] = None) -> dict[str, torch.Tensor]:
        """Training forward: one batch per task -> one loss per task (each task with its own adapter).
        ``options``: keyword arguments of a task's loss, by task (``{"t2i": {"code_balance": 0.5}}``)."""
        options = options or {}
        return {task: self.loss(task, batch, **options.get(task, {})) for task, batch in batches.items()}

    def loss(self, task: str, batch: dict[str, torch.Tensor], **options) -> torch.Tensor:
        if task == "mmu":
            return self.mmu_loss(batch, **options)
        if task == "t2i":
            return self.t2i_loss(batch, **options)
        raise OmnicoreError(f"unknown task {task!r}; tasks: mmu, t2i")

    # --- inference (omnicore.generation does the work) -----------------------------------------------
    def answer(self, images, questions, **sampling) -> list[str]:
        from ..generation.api import answer

        return answer(self, images, questions, **sampling)

    def stream_answer(self, image, question, **sampling):
        from ..generation.api import stream_answer

        return stream_answer(self, image, question, **sampling)

    def generate_images(self, prompts, n_per_prompt: int = 1, guidance_scale: float = 1.0, components=None,
                        component_scale: float = 1.0, negative_prompts=None, **sampling):
        from ..generation.api import generate_images

        return generate_images(self, prompts, n_per_prompt=n_per_prompt, guidance_scale=guidance_scale,
                               components=components, component_scale=component_scale,
                               negative_prompts=negative_prompts, **sampling)

    # --- persistence -----------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """Write config.json, model.safetensors and adapters.safetensors atomically into ``directory``."""
        return write_model_dir(directory, self.config, self.state_dict())


def write_model_dir(directory: str | os.PathLike, config: dict, state: dict[str, torch.Tensor],
                    file_backed: frozenset[str] = frozenset()) -> Path:
    """A model directory from its config (``{"model": spec, ...}``) and full state dict, written atomically:
    what ``UnifiedModel.save`` writes, also for converters that never build the model in memory (``file_backed``:
    names of tensors that view a memory-mapped input file, whose pages are given back once written)."""
    from ..training.checkpoint import atomic_directory, save_state_dict

    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        config = copy.deepcopy(config)
        _bundle_tokenizer_files(config, tmp)
        base, adapters = {}, {}
        for name, tensor in state.items():
            (adapters if is_adapter_param(name) else base)[name] = tensor
        tied = save_state_dict(base, tmp / WEIGHTS_FILE, file_backed)
        if adapters:
            save_state_dict(adapters, tmp / ADAPTERS_FILE, file_backed)
        config["tied"] = tied
        (tmp / CONFIG_FILE).write_text(json.dumps({"format": FORMAT, "version": 1, **config}, indent=2))
    return directory


def _strip_weight_params(spec: dict) -> None:
    """Saved weights replace any ``weights`` file a component was first built from."""
    for key in ("weights", "weights_prefix", "weights_map"):
        spec.pop(key, None)
    params = spec.get("params", {})
    for key in [k for k in params if k == "weights" or k.endswith("_weights")]:
        params.pop(key)


def _bundle_tokenizer_files(config: dict, directory: Path) -> None:
    """Copy files the text tokenizer reads (tokenizer.json) into the model directory, relative paths."""
    spec = config.get("model", {}).get("text_tokenizer")
    if not spec:
        return
    for key, value in list(spec.get("params", {}).items()):
        if isinstance(value, str) and value and Path(value).is_file():
            (directory / "tokenizer").mkdir(exist_ok=True)
            target = directory / "tokenizer" / Path(value).name
            shutil.copyfile(value, target)
            spec["params"][key] = f"@model_dir/tokenizer/{target.name}"


def _resolve_model_dir_paths(spec: dict, directory: Path) -> None:
    for key, value in list(spec.get("params", {}).items()):
        if isinstance(value, str) and value.startswith("@model_dir/"):
            spec["params"][key] = str(directory / value.removeprefix("@model_dir/"))


def _create(kind: str, role: str, spec: dict, injected: dict[str, Any]) -> Any:
    component = registry.get(kind, spec["type"])
    params = {**injected, **spec.get("params", {})}
    try:
        obj = component.build(**params)
    except OmnicoreError as exc:
        raise type(exc)(f"model.{role}: {exc}") from None
    if spec.get("weights"):
        from ..training.checkpoint import load_component_weights

        load_component_weights(obj, spec, f"model.{role}")
    return obj


def build_from_spec(model_spec: dict) -> UnifiedModel:
    """Build every role of a ``model:`` block (plain dict, already schema-checked), wiring sizes through."""
    from ..recipe.schema import ModelSpec

    spec = ModelSpec.model_validate(model_spec).model_dump(mode="json")
    text_tokenizer = _create("text_tokenizer", "text_tokenizer", spec["text_tokenizer"], {}) \
        if spec.get("text_tokenizer") else None
    if text_tokenizer is None:
        raise OmnicoreError("model.text_tokenizer is required")
    backbone = _create("backbone", "backbone", spec["backbone"], {})
    d_model = backbone.d_model
    encoder = _create("encoder", "encoder", spec["encoder"], {}) if spec.get("encoder") else None
    projector = None
    if spec.get("projector"):
        if encoder is None:
            raise OmnicoreError("model.projector needs model.encoder")
        projector = _create("projector", "projector", spec["projector"], {"in_dim": encoder.embed_dim, "out_dim": d_model})
    image_tokenizer = _create("image_tokenizer", "image_tokenizer", spec["image_tokenizer"], {}) \
        if spec.get("image_tokenizer") else None
    sizes = {"d_model": d_model, "vocab_size": text_tokenizer.vocab_size,
             "codebook_size": getattr(image_tokenizer, "codebook_size", None),
             "encoder_dim": getattr(encoder, "embed_dim", None)}
    heads = {}
    for name, head_spec in spec.get("heads", {}).items():
        injected = {k: sizes[k] for k in HEAD_INJECTIONS.get(name, set()) if sizes.get(k) is not None}
        heads[name] = _create("head", f"heads.{name}", head_spec, injected)
    if "image" in heads and image_tokenizer is None:
        raise OmnicoreError("model.heads.image needs model.image_tokenizer")
    config_spec = copy.deepcopy(spec)
    for role_spec in [config_spec.get(r) for r in ("encoder", "projector", "image_tokenizer", "text_tokenizer",
                                                   "backbone")] + list(config_spec.get("heads", {}).values()):
        if role_spec:
            _strip_weight_params(role_spec)
    layout = mmu_layout(spec.get("mmu_template", "omnicore"))
    if spec.get("mmu_template", "").startswith(CHAT_TEMPLATE_PREFIX):
        config_spec["mmu_template"] = layout.spec()  # the layout itself, not the file it was read from
    return UnifiedModel(backbone=backbone, text_tokenizer=text_tokenizer, heads=heads, encoder=encoder,
                        projector=projector, image_tokenizer=image_tokenizer,
                        max_caption_tokens=spec["max_caption_tokens"], max_text_tokens=spec["max_text_tokens"],
                        image_size=spec["image_size"], caption_reads=spec.get("caption_reads", 1),
                        mmu_template=layout, config={"model": config_spec})


def build(recipe: Any) -> UnifiedModel:
    """Build the unified model from a recipe (path, name, LoadedRecipe, Recipe or a ``model:`` dict)."""
    from ..recipe import LoadedRecipe, Recipe, load_recipe

    if isinstance(recipe, (str, os.PathLike)):
        recipe = load_recipe(recipe)
    if isinstance(recipe, LoadedRecipe):
        recipe = recipe.recipe
    if isinstance(recipe, Recipe):
        if recipe.model is None:
            raise OmnicoreError("recipe has no 'model' block")
        return build_from_spec(recipe.model.model_dump(mode="json"))
    if isinstance(recipe, dict):
        return build_from_spec(recipe.get("model", recipe))
    raise TypeError(f"build() takes a recipe path, LoadedRecipe, Recipe or dict, not {type(recipe).__name__}")


# config.json is a few KB; its nesting is a handful of levels (model -> role -> params -> kwargs).
CONFIG_MAX_DEPTH = 32


def _read_config(directory: Path) -> tuple[Path, dict]:
    """config.json of a model directory, checked for shape before anything is built from it."""
    from ..inputs import MAX_CONFIG_BYTES, parse_json, read_text, regular_file

    config_path = directory / CONFIG_FILE
    try:
        if not directory.is_dir():
            what = "does not exist" if not directory.exists() else "is not a directory"
            raise CheckpointError(f"{directory}: not a model directory ({what})")
        if not config_path.exists() and not config_path.is_symlink():
            raise CheckpointError(f"{directory}: not a model directory (no {CONFIG_FILE})")
        regular_file(config_path, "model config")
        config = parse_json(read_text(config_path, "model config", MAX_CONFIG_BYTES), str(config_path),
                            max_depth=CONFIG_MAX_DEPTH)
    except InputFileError as exc:
        raise CheckpointError(str(exc)) from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{config_path}: not an omnicore model config (format {config.get('format')!r})")
    if not isinstance(config.get("model"), dict):
        raise CheckpointError(f"{config_path}: 'model' must be an object (the recipe's model block)")
    tied = config.get("tied", {})
    if not isinstance(tied, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in tied.items()):
        raise CheckpointError(f"{config_path}: 'tied' must map weight names to weight names")
    from ..recipe.schema import ModelSpec

    try:
        ModelSpec.model_validate(config["model"])
    except pydantic.ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in ("model", *err["loc"]))
        raise CheckpointError(f"{config_path}: {where}: {err['msg']}") from None
    return config_path, config


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A model directory's safetensors file (never a pickle), malformed files reported in one line."""
    from ..inputs import first_line
    from ..training.checkpoint import load_state_dict_file

    try:
        return load_state_dict_file(path)  # refuses a FIFO, directory or missing file before opening it
    except CheckpointError:
        raise
    except Exception as exc:  # the safetensors reader's own error types vary across versions
        raise CheckpointError(f"{path}: unreadable safetensors file: {first_line(exc)}") from None


def _check_size(spec: dict, state: dict[str, torch.Tensor], config_path: Path) -> None:
    """Refuse a config that describes a (much) larger model than its weights hold, before allocating it: a
    wrong or crafted config.json would otherwise ask for any amount of memory and time."""
    try:
        with torch.device("meta"):
            shell = build_from_spec(copy.deepcopy(spec))
    except Exception:  # a component that computes on its tensors at init: no cheap estimate, build for real
        return
    described = sum(t.numel() for t in shell.state_dict().values())
    held = sum(t.numel() for t in state.values())
    if described > 2 * held + (1 << 20):
        raise CheckpointError(f"{config_path}: describes a model of {described:,} values but the weights hold "
                              f"{held:,}; config.json does not belong to these weights")


def load_structure(directory: str | os.PathLike) -> UnifiedModel:
    """A model directory's model without its weights: built on the meta device from config.json, with the
    tokenizers and MMU layout (which read their own files). For a process that reads requests for a model another
    process runs (``omni serve``'s HTTP side); its tensors hold no values."""
    directory = Path(directory)
    config_path, config = _read_config(directory)
    spec = config["model"]
    if spec.get("text_tokenizer"):
        _resolve_model_dir_paths(spec["text_tokenizer"], directory)
    with torch.device("meta"):
        return _build_described(spec, config_path).eval()


def _build_described(spec: dict, config_path: Path) -> UnifiedModel:
    """The model a config.json describes; what cannot be built is one line naming the file."""
    from ..inputs import first_line

    try:
        return build_from_spec(spec)
    except OmnicoreError as exc:
        raise CheckpointError(f"{config_path}: {exc}") from None
    except Exception as exc:  # a component factory given values of the wrong kind by a hand-edited config
        raise CheckpointError(f"{config_path}: cannot build the model it describes: "
                              f"{type(exc).__name__}: {first_line(exc)}") from None


def load(directory: str | os.PathLike, device: str | torch.device | None = None,
         dtype: torch.dtype | None = None) -> UnifiedModel:
    """Restore a model saved by ``UnifiedModel.save`` (or a run's final model), no recipe needed.

    ``dtype``: the floating-point type of the restored model; None keeps the saved one when every saved floating
    tensor has the same type (a model saved in bfloat16 loads in bfloat16), else float32. The safetensors files
    are read (and so checked) before the model is built; nothing is unpickled."""
    from ..inputs import first_line

    directory = Path(directory)
    config_path, config = _read_config(directory)
    saved_spec = copy.deepcopy(config["model"])
    spec = config["model"]
    state = _read_weights(directory / WEIGHTS_FILE)
    adapters = directory / ADAPTERS_FILE
    if adapters.exists() or adapters.is_symlink():
        state.update(_read_weights(adapters))
    for alias, canonical in config.get("tied", {}).items():
        if canonical not in state:
            raise CheckpointError(f"{config_path}: tied weight {alias!r} names {canonical!r}, which is not in "
                                  f"{WEIGHTS_FILE}")
        state[alias] = state[canonical]
    if spec.get("text_tokenizer"):
        _resolve_model_dir_paths(spec["text_tokenizer"], directory)
    _check_size(spec, state, config_path)
    model = _build_described(spec, config_path)
    if dtype is None:
        kinds = {t.dtype for t in state.values() if t.is_floating_point()}
        dtype = kinds.pop() if len(kinds) == 1 else torch.float32
    if not dtype.is_floating_point:
        raise OmnicoreError(f"load: dtype must be a floating-point type, got {dtype}")
    model.to(dtype)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes that differ from the config's
        detail = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), first_line(exc))
        raise CheckpointError(f"{directory}: weights do not match the config: {detail}") from None
    if missing or unexpected:
        raise CheckpointError(f"{directory}: weights do not match the config: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    model.config = {k: v for k, v in config.items() if k not in ("format", "version", "tied")}
    model.config["model"] = saved_spec
    model.eval()
    if device is not None:
        model.to(device)
    return model
