"""Token layouts of the two tasks (OmniMamba's), as plain id lists built from a text tokenizer.

MMU: [<|mmu|>, <|soi|>, <image: num_patches slots>, <|eoi|>, <|sot|>, question, answer, <|eot|>, ...]
     The question's text comes from the model's MMU template (``MMU_TEMPLATES``, or a string with ``{question}``).
T2I: [<|t2i|>, <|sot|>, caption (left padded to max_caption_tokens), <|eot|>, <|soi|>, codes...]
     With ``caption_reads`` R > 1 the [<|sot|>, caption, <|eot|>] block comes R times ("just read twice",
     Arora et al. 2024: a recurrent model that reads its context again knows, the second time, all it will need).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from ..errors import OmnicoreError, OmnicoreWarning

IGNORE = -100  # label value CrossEntropyLoss skips


@dataclass(frozen=True)
class MMUTemplate:
    """How a question becomes prompt text, and whether answers also end at ``<|eot|>`` (else at eos only).

    ``text``: a format with ``{question}``; ``None`` is omnicore's own (the question stripped, then a newline)."""

    text: str | None
    stop_at_eot: bool = False


# Built-in templates; a plugin may add its own with ``register_mmu_template``; a recipe may give any string with
# ``{question}`` as ``model.mmu_template`` (answers then end at eos only, as the released OmniMamba's do).
MMU_TEMPLATES: dict[str, MMUTemplate] = {
    "omnicore": MMUTemplate(None, stop_at_eot=True),
    # the released OmniMamba's inference prompt (its MMU script, empty system prompt)
    "omnimamba-chat": MMUTemplate("USER: {question} ASSISTANT:"),
    # the format the released OmniMamba was trained on
    "omnimamba-train": MMUTemplate("In: {question}\nOut: "),
}


def register_mmu_template(name: str, text: str, stop_at_eot: bool = False) -> None:
    """Add a named template (a plugin's), usable as ``model.mmu_template: <name>``."""
    if "{question}" not in text:
        raise OmnicoreError(f"MMU template {name!r}: its text needs a {{question}} placeholder")
    MMU_TEMPLATES[name] = MMUTemplate(text, stop_at_eot)


def mmu_template(spec: str) -> MMUTemplate:
    """A template by name, or a literal format string with ``{question}``."""
    if spec in MMU_TEMPLATES:
        return MMU_TEMPLATES[spec]
    if "{question}" in spec:
        return MMUTemplate(spec)
    raise OmnicoreError(f"mmu_template {spec!r}: neither a template name ({', '.join(MMU_TEMPLATES)}) nor a text "
                        "with a {question} placeholder")


class CaptionTruncatedWarning(OmnicoreWarning):
    """A caption had more tokens than the model reads; the rest were dropped."""


@dataclass(frozen=True)
class Layout:
    tokenizer: object
    max_caption_tokens: int
    max_text_tokens: int
    caption_reads: int = 1
    mmu_template: str = "omnicore"

    def sid(self, token: str) -> int:
        return self.tokenizer.special_ids[token]

    # --- MMU -------------------------------------------------------------------------------------------
    @property
    def mmu_head_ids(self) -> list[int]:
        """Tokens before the image slots."""
        return [self.sid("<|mmu|>"), self.sid("<|soi|>")]

    @property
    def mmu_tail_ids(self) -> list[int]:
        """Tokens between the image slots and the text."""
        return [self.sid("<|eoi|>"), self.sid("<|sot|>")]

    def question_ids(self, question: str) -> list[int]:
        text = mmu_template(self.mmu_template).text
        if text is None:
            return self.tokenizer.encode(question.strip() + "\n")
        return self.tokenizer.encode(text.replace("{question}", question))

    @property
    def mmu_stop_ids(self) -> set[int]:
        """Tokens that end an answer."""
        stops = {self.tokenizer.eos_id}
        if mmu_template(self.mmu_template).stop_at_eot:
            stops.add(self.sid("<|eot|>"))
        return stops

    def answer_ids(self, answer: str) -> list[int]:
        if mmu_template(self.mmu_template).stop_at_eot:
            return self.tokenizer.encode(answer.strip()) + [self.sid("<|eot|>")]
        # answers that end at eos learn to emit it (the released OmniMamba's training: answer, eos, <|eot|>)
        return self.tokenizer.encode(answer.strip()) + [self.tokenizer.eos_id, self.sid("<|eot|>")]

    def mmu_text(self, turns: list[dict]) -> tuple[list[int], list[int]]:
        """Text ids and labels (answers only, IGNORE elsewhere), truncated to max_text_tokens."""
        ids: list[int] = []
        labels: list[int] = []
        for turn in turns:
            q = self.question_ids(turn["question"])
            a = self.answer_ids(turn["answer"])
            ids += q + a
            labels += [IGNORE] * len(q) + a
        return ids[: self.max_text_tokens], labels[: self.max_text_tokens]

    # --- T2I -------------------------------------------------------------------------------------------
    @property
    def t2i_prefix_len(self) -> int:
        return self.caption_reads * (self.max_caption_tokens + 2) + 2

    @property
    def caption_slice(self) -> slice:
        """Where the (first read of the) caption's tokens sit in a T2I prefix, padding included."""
        return slice(2, 2 + self.max_caption_tokens)

    def caption_tokens(self, caption: str) -> int:
        """How many tokens a caption has before truncation to ``max_caption_tokens``."""
        return len(self.tokenizer.encode(caption.strip()))

    def t2i_prefix(self, caption: str | None) -> list[int]:
        """The conditioning prefix; ``None`` gives the unconditional (dropped caption) prefix."""
        ids = [] if caption is None else self.tokenizer.encode(caption.strip())
        if len(ids) > self.max_caption_tokens:
            warnings.warn(CaptionTruncatedWarning(
                f"caption {caption[:60]!r} has {len(ids)} tokens; the model reads the first "
                f"{self.max_caption_tokens} (max_caption_tokens)"), stacklevel=2)
            ids = ids[: self.max_caption_tokens]
        pad = [self.tokenizer.pad_id] * (self.max_caption_tokens - len(ids))
        block = [self.sid("<|sot|>")] + pad + ids + [self.sid("<|eot|>")]
        return [self.sid("<|t2i|>")] + block * self.caption_reads + [self.sid("<|soi|>")]
