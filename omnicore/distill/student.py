"""A student ``UnifiedModel`` from a teacher one: the same encoder, projector, heads and layout, its backbone
replaced by the registered ``student`` backbone seeded from the teacher's (``from_teacher`` metadata).

The student's model spec names backbone type ``student`` with the teacher backbone's params, the hybrid layers and
the mixer, so ``omnicore.load`` rebuilds the same stack from a saved directory.
"""

from __future__ import annotations

import copy
from typing import Any

from ..errors import OmnicoreError
from ..registry import get_component

STUDENT_BACKBONE = "student"


def is_student(model) -> bool:
    """Whether ``model``'s backbone is a distilled student (its spec's backbone type)."""
    spec = (getattr(model, "config", None) or {}).get("model", {}).get("backbone", {})
    return spec.get("type") == STUDENT_BACKBONE


def make_student(teacher, hybrid: list[int] | tuple = (), mixer: str = "mmmamba",
                 mixer_options: dict[str, Any] | None = None, generator=None):
    """A new ``UnifiedModel`` whose backbone is ``teacher``'s distilled into ``mixer`` layers (``hybrid``: layers that
    keep the teacher's attention); every other part is a copy of the teacher's. ``teacher`` stays untouched."""
    from ..model.unified import UnifiedModel

    spec = copy.deepcopy((teacher.config or {}).get("model"))
    if not spec or spec.get("backbone", {}).get("type") != "transformer":
        got = (spec or {}).get("backbone", {}).get("type")
        raise OmnicoreError(f"distill: the teacher's backbone must be of type transformer (got {got!r})")
    component = get_component("backbone", STUDENT_BACKBONE)
    from_teacher = component.metadata.get("from_teacher")
    if not callable(from_teacher):
        raise OmnicoreError(f"distill: backbone {STUDENT_BACKBONE!r} ({component.package}) registers no from_teacher")
    options = dict(mixer_options or {})
    backbone = from_teacher(teacher.backbone, hybrid=list(hybrid), mixer=mixer, mixer_options=options,
                            generator=generator)
    spec["backbone"] = {"type": STUDENT_BACKBONE, "params": {
        "teacher": spec["backbone"].get("params", {}), "hybrid": sorted(set(int(i) for i in hybrid)),
        "mixer": mixer, "mixer_options": options}}
    parts = {role: copy.deepcopy(getattr(teacher, role)) for role in ("encoder", "projector", "image_tokenizer")}
    heads = {name: copy.deepcopy(head) for name, head in teacher.heads.items()}
    layout = teacher.layout
    student = UnifiedModel(backbone=backbone, text_tokenizer=teacher.text_tokenizer, heads=heads, **parts,
                           max_caption_tokens=layout.max_caption_tokens, max_text_tokens=layout.max_text_tokens,
                           image_size=teacher.image_size, caption_reads=layout.caption_reads,
                           mmu_template=layout.mmu, config={**copy.deepcopy(teacher.config), "model": spec})
    return student.to(teacher.device)
