"""Built-in datasets. Each yields raw sample dicts; the training code tokenises and collates them.

MMU sample: ``{"task": "mmu", "image": PIL RGB | None, "turns": [{"question", "answer"}, ...], "meta": {...}}``
T2I sample: ``{"task": "t2i", "caption": str, "image": PIL | None, "codes": list[int] | None, "meta": {...}}``
"""

from __future__ import annotations

from omnicore import hookimpl

from ._common import DatasetError, DatasetFileNotFoundError
from .llava import LlavaJson, build_llava_json
from .shape_analysis import analyze_shape_image, score_t2i
from .synthetic import COLORS, HELDOUT, POSITIONS, SHAPES, SyntheticShapes, build_synthetic_shapes, render
from .t2i_jsonl import (ImageCaptionFolder, T2IJsonl, build_image_caption_folder, build_t2i_jsonl,
                        write_t2i_jsonl)


@hookimpl
def register_datasets(register):
    register("synthetic_shapes", build_synthetic_shapes)
    register("llava_json", build_llava_json)
    register("t2i_jsonl", build_t2i_jsonl)
    register("image_caption_folder", build_image_caption_folder)


__all__ = ["COLORS", "SHAPES", "POSITIONS", "HELDOUT", "render", "SyntheticShapes", "analyze_shape_image",
           "score_t2i", "LlavaJson", "T2IJsonl", "ImageCaptionFolder", "write_t2i_jsonl", "DatasetError",
           "DatasetFileNotFoundError", "register_datasets"]
