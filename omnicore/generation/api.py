"""The Python inference API behind ``UnifiedModel.answer`` / ``stream_answer`` / ``generate_images``."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Iterator, Sequence

import numpy as np
import torch

from ..errors import OmnicoreError, OmnicoreWarning
from ..inputs import open_image
from ..model.layout import CaptionTruncatedWarning
from .engine import check_components, check_negative_prompts, generate_codes, generate_text, stream_text
from .sampling import Sampling


class AnswerLengthWarning(OmnicoreWarning):
    """max_new_tokens was cut to the positions the model has left after the question."""


def _open_image(image):
    from PIL import Image

    if image is None or isinstance(image, Image.Image):
        return image
    return open_image(image)


def _pixels(model, images) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    images = [_open_image(im) for im in images]
    if model.encoder is None:
        if any(im is not None for im in images):
            raise OmnicoreError("this model has no image encoder; it can only answer text-only questions")
        return None, None
    transform = model.encoder.image_transform()
    size = model.encoder.image_size
    pix = [transform(im) if im is not None else torch.zeros(3, size, size) for im in images]
    has = torch.tensor([im is not None for im in images], dtype=torch.float32)
    return torch.stack(pix).to(model.device), has.to(model.device)


def fit_answer_length(model, question_ids: Sequence[Sequence[int]], s: Sampling) -> Sampling:
    """``s`` with ``max_new_tokens`` cut (and a warning) to what the model's MMU position table has room for
    after the longest question; a question that leaves no room is an error."""
    table = model.heads["mmu_positions"] if "mmu_positions" in model.heads else None
    capacity = getattr(table, "num_positions", None)
    if capacity is None or not question_ids:
        return s
    prefix = model.mmu_prefix_len
    longest = max(len(q) for q in question_ids)
    room = capacity - prefix - longest
    if room < 1:
        raise OmnicoreError(f"question: {longest} tokens, but this model reads at most {capacity - prefix - 1} "
                            f"({capacity} positions, {prefix} of them for the image)")
    if s.max_new_tokens > room:
        warnings.warn(AnswerLengthWarning(
            f"max_new_tokens {s.max_new_tokens}: after a question of {longest} tokens this model has positions for "
            f"{room} answer tokens; answers stop there"), stacklevel=3)
        s = dataclasses.replace(s, max_new_tokens=room)
    return s


def caption_truncation(model, prompts: Sequence[str], extra: Sequence[str | None] = ()) -> str | None:
    """One sentence saying how many prompts the model reads only in part (``None``: none), for one warning per
    call instead of one per caption; ``extra``: negative and component prompts, counted with them."""
    limit = model.layout.max_caption_tokens
    texts = list(dict.fromkeys([p for p in prompts if p is not None] + [t for t in extra if t is not None]))
    counts = [model.layout.caption_tokens(t) for t in texts]
    over = [c for c in counts if c > limit]
    if not over:
        return None
    what = "prompts" if not any(t is not None for t in extra) else "prompts (negative and component ones included)"
    return (f"{len(over)} of {len(texts)} {what} have more than {limit} tokens (the longest {max(over)}); the "
            f"model reads only the first {limit} tokens of each (max_caption_tokens)")


def answer(model, images: Sequence, questions: Sequence[str], batch_size: int = 16, **sampling) -> list[str]:
    """Answer each question about its image (an image may be None for text-only)."""
    if len(images) != len(questions):
        raise OmnicoreError(f"answer(): {len(images)} images but {len(questions)} questions")
    s = Sampling.from_kwargs(**{"greedy": True, **sampling}) if "temperature" not in sampling else Sampling.from_kwargs(**sampling)
    s = fit_answer_length(model, [model.layout.question_ids(q) for q in questions], s)
    out: list[str] = []
    model.eval()
    generator = s.generator(model.device)  # one noise stream for the call: later batches draw new noise
    for start in range(0, len(questions), batch_size):
        chunk_q = list(questions[start:start + batch_size])
        pixels, has = _pixels(model, list(images[start:start + batch_size]))
        ids = [model.layout.question_ids(q) for q in chunk_q]
        for toks in generate_text(model, pixels, has, ids, s, generator=generator):
            out.append(model.text_tokenizer.decode(toks).strip())
    return out


def stream_answer(model, image, question: str, **sampling) -> Iterator[str]:
    """Yield the answer's text piece by piece as tokens are generated."""
    s = Sampling.from_kwargs(**{"greedy": True, **sampling}) if "temperature" not in sampling else Sampling.from_kwargs(**sampling)
    question_ids = model.layout.question_ids(question)
    s = fit_answer_length(model, [question_ids], s)
    pixels, has = _pixels(model, [image])
    stops = model.layout.mmu_stop_ids
    ids: list[int] = []
    shown = ""
    model.eval()
    for token in stream_text(model, pixels, has, [question_ids], s):
        tok = int(token[0])
        if tok in stops:
            break
        ids.append(tok)
        text = model.text_tokenizer.decode(ids)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
            continue
        yield text[len(shown):]
        shown = text
    text = model.text_tokenizer.decode(ids)
    if len(text) > len(shown):  # what an incomplete character held back at the end
        yield text[len(shown):]


def codes_to_images(model, codes: torch.Tensor) -> list:
    from PIL import Image

    h, w = model.grid
    with torch.inference_mode():
        images = model.image_tokenizer.decode(codes.view(-1, h, w))
    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arr]


# options that choose how codes are drawn; a caller giving any of them replaces the model's own defaults
_DECODING_OPTIONS = {"greedy", "temperature", "top_k", "top_p", "min_p", "repetition_penalty"}


def t2i_sampling_options(model, sampling: dict) -> dict:
    """``sampling`` over the model's own T2I defaults (config.json ``"sampling": {"t2i": {...}}``; the converted
    OmniMamba: greedy, as its release draws images), which apply only when the caller chose no decoding option."""
    config = model.config if isinstance(getattr(model, "config", None), dict) else {}
    defaults = (config.get("sampling") or {}).get("t2i") or {}
    if not defaults or _DECODING_OPTIONS & {k for k, v in sampling.items() if v is not None}:
        return dict(sampling)
    return {**defaults, **sampling}


def generate_images(model, prompts: Sequence[str], n_per_prompt: int = 1, guidance_scale: float = 1.0,
                    batch_size: int = 16, components: Sequence[Sequence[str]] | None = None,
                    component_scale: float = 1.0, negative_prompts: Sequence[str | None] | str | None = None,
                    warn_truncated: bool = True, **sampling) -> list:
    """PIL images, ``n_per_prompt`` per prompt, in prompt order.

    ``components``: composable guidance (Liu et al. 2022), one list of K component prompts per prompt (the same K
    for all), e.g. ``[["a blue shape", "a triangle", "a shape on the right"]]`` for "a blue triangle on the right";
    each pushes the image towards itself with ``component_scale``, on top of the prompt's ``guidance_scale``.
    ``negative_prompts``: one string for all prompts, or one (or None) per prompt: guidance pushes away from it
    instead of from the unconditional prompt (needs ``guidance_scale`` other than 1), e.g. "a triangle on the
    right" for "a blue triangle on the right" pushes along what the colour word adds.
    ``warn_truncated``: one CaptionTruncatedWarning when prompts are longer than the model reads (False: the
    caller has said so already)."""
    s = Sampling.from_kwargs(**t2i_sampling_options(model, sampling))
    check_components(components, len(prompts))
    if isinstance(negative_prompts, str):
        negative_prompts = [negative_prompts] * len(prompts)
    check_negative_prompts(negative_prompts, len(prompts))
    if warn_truncated:
        note = caption_truncation(model, prompts, list(negative_prompts or []) + [c for comp in components or []
                                                                                  for c in comp])
        if note:
            warnings.warn(CaptionTruncatedWarning(note), stacklevel=2)
    captions = [p for p in prompts for _ in range(n_per_prompt)]
    comps = None if components is None else [list(c) for c in components for _ in range(n_per_prompt)]
    negs = None if negative_prompts is None else [n for n in negative_prompts for _ in range(n_per_prompt)]
    model.eval()
    images = []
    generator = s.generator(model.device)  # one noise stream for the call: later batches draw new noise
    for start in range(0, len(captions), batch_size):
        chunk = None if comps is None else comps[start:start + batch_size]
        with warnings.catch_warnings():  # said once above, not once per caption and batch
            warnings.simplefilter("ignore", CaptionTruncatedWarning)
            codes = generate_codes(model, captions[start:start + batch_size], guidance_scale, s, components=chunk,
                                   component_scale=component_scale,
                                   negative_prompts=None if negs is None else negs[start:start + batch_size],
                                   generator=generator)
        images += codes_to_images(model, codes)
    return images


def image_grid(images: list, columns: int | None = None):
    from PIL import Image

    if not images:
        raise OmnicoreError("no images to put in a grid")
    columns = columns or int(np.ceil(np.sqrt(len(images))))
    rows = int(np.ceil(len(images) / columns))
    w, h = images[0].size
    grid = Image.new("RGB", (columns * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % columns) * w, (i // columns) * h))
    return grid
