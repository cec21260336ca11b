"""``omni pretokenize``: turn an image+caption folder into T2I JSONL (caption + VQ codes), atomically."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress

from .errors import OmnicoreError
from .registry import registry
from .training.checkpoint import atomic_write_text
from .training.data import image_to_tensor


def _tokenizer_from(model_dir: Path | None, recipe: str | None):
    if model_dir is not None:
        from .model.unified import load

        model = load(model_dir)
        if model.image_tokenizer is None:
            raise OmnicoreError(f"{model_dir}: this model has no image tokenizer")
        return model.image_tokenizer, model.image_size
    from .recipe import load_recipe
    from .training.checkpoint import load_component_weights

    r = load_recipe(recipe).recipe
    spec = r.model.image_tokenizer if r.model else None
    if spec is None:
        raise OmnicoreError(f"{recipe}: model.image_tokenizer is not set")
    tok = registry.get("image_tokenizer", spec.type).build(**spec.params)
    if spec.weights:
        load_component_weights(tok, spec.model_dump(), "model.image_tokenizer")
    return tok, r.model.image_size


@torch.inference_mode()
def pretokenize(folder: Path, out: Path, *, model_dir: Path | None = None, recipe: str | None = None,
                image_size: int | None = None, batch_size: int = 16, device: torch.device | None = None,
                console: Console | None = None) -> int:
    if (model_dir is None) == (recipe is None):
        raise OmnicoreError("pretokenize: give exactly one of --model or --recipe")
    if batch_size < 1:
        raise OmnicoreError(f"pretokenize: batch_size must be at least 1 (got {batch_size})")
    if image_size is not None and image_size < 1:
        raise OmnicoreError(f"pretokenize: image_size must be at least 1 (got {image_size})")
    if Path(out).is_dir():
        raise OmnicoreError(f"{out}: is a directory; the output is a JSONL file")
    # the folder's captions are read (and checked) before the tokenizer is built: a bad folder fails fast
    dataset = registry.get("dataset", "image_caption_folder").build(folder=str(folder))
    tokenizer, default_size = _tokenizer_from(model_dir, recipe)
    size = image_size or default_size
    device = device or torch.device("cpu")
    tokenizer.to(device).eval()
    lines: list[str] = []
    with Progress(console=console or Console()) as progress:
        bar = progress.add_task("tokenizing", total=len(dataset))
        for start in range(0, len(dataset), batch_size):
            samples = [dataset[i] for i in range(start, min(len(dataset), start + batch_size))]
            images = torch.stack([image_to_tensor(s["image"], size) for s in samples]).to(device)
            codes = tokenizer.encode(images).flatten(1).cpu().tolist()
            lines += [json.dumps({"caption": s["caption"], "codes": c}) + "\n" for s, c in zip(samples, codes)]
            progress.update(bar, completed=len(lines))
    atomic_write_text(Path(out), "".join(lines))
    return len(lines)
