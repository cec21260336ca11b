"""Token layouts of the two tasks, as plain id lists built from a text tokenizer.

MMU: [head, <image: num_patches slots>, tail, question, answer, ...], the model's MMU layout (``mmu_layout``) saying
     what head, tail, question and answer are and which tokens end an answer. OmniMamba's layout is
     [<|mmu|>, <|soi|>, image, <|eoi|>, <|sot|>, question, answer, <|eot|>, ...] with the question's text from a
     template (``MMU_TEMPLATES``, or a string with ``{question}``); chat layouts (``ChatLayout``: InternVL / HoVLE's
     ``<|im_start|>user\\n<img>`` image ``</img>\\n{question}<|im_end|><|im_start|>assistant\\n``, or one derived from
     a Hugging Face chat template) write it as text with the tokenizer's own special tokens. Plugins add named
     layouts through the ``register_mmu_layouts`` hook.
T2I: [<|t2i|>, <|sot|>, caption (left padded to max_caption_tokens), <|eot|>, <|soi|>, codes...]
     With ``caption_reads`` R > 1 the [<|sot|>, caption, <|eot|>] block comes R times ("just read twice",
     Arora et al. 2024: a recurrent model that reads its context again knows, the second time, all it will need).
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from ..errors import OmnicoreError, OmnicoreWarning

IGNORE = -100  # label value CrossEntropyLoss skips


@dataclass(frozen=True)
class MMUTemplate:
    """How a question becomes prompt text, and whether answers also end at ``<|eot|>`` (else at eos only).

    ``text``: a format with ``{question}``; ``None`` is omnicore's own (the question stripped, then a newline)."""

    text: str | None
    stop_at_eot: bool = False


# Built-in templates of OmniMamba's layout; a plugin may add its own with ``register_mmu_template`` (or a whole
# layout through the ``register_mmu_layouts`` hook); a recipe may give any string with ``{question}`` as
# ``model.mmu_template`` (answers then end at eos only, as the released OmniMamba's do).
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


def mmu_template(spec: str) -> "MMULayout":
    """The MMU layout ``spec`` names (``mmu_layout``); kept under this name for the schema and converters."""
    return mmu_layout(spec)


class MMULayout:
    """An MMU input layout: the tokens before and after the image slots, how a question and an answer become ids,
    and the tokens that end an answer. The model embeds ``[head, image slots, tail, question, answer, ...]``; the
    image features fill the slots. A model's ``mmu_template`` names one (``mmu_layout``)."""

    def head_ids(self, tokenizer) -> list[int]:
        raise NotImplementedError

    def tail_ids(self, tokenizer) -> list[int]:
        raise NotImplementedError

    def question_ids(self, tokenizer, question: str, turn: int = 0) -> list[int]:
        raise NotImplementedError

    def answer_ids(self, tokenizer, answer: str) -> list[int]:
        raise NotImplementedError

    def stop_ids(self, tokenizer) -> set[int]:
        raise NotImplementedError

    def spec(self) -> str:
        """The ``mmu_template`` string that rebuilds this layout (what a saved model's config.json keeps)."""
        raise NotImplementedError

    def check(self, tokenizer) -> None:
        """A one-line OmnicoreError when ``tokenizer`` cannot express this layout (called when a model is built)."""


@dataclass(frozen=True)
class OmniMambaLayout(MMULayout):
    """``[<|mmu|>, <|soi|>, image, <|eoi|>, <|sot|>, question, answer, ...]``, the question from a template."""

    name: str
    template: MMUTemplate

    def head_ids(self, tokenizer) -> list[int]:
        return [tokenizer.special_ids["<|mmu|>"], tokenizer.special_ids["<|soi|>"]]

    def tail_ids(self, tokenizer) -> list[int]:
        return [tokenizer.special_ids["<|eoi|>"], tokenizer.special_ids["<|sot|>"]]

    def question_ids(self, tokenizer, question: str, turn: int = 0) -> list[int]:
        if self.template.text is None:
            return tokenizer.encode(question.strip() + "\n")
        return tokenizer.encode(self.template.text.replace("{question}", question))

    def stop_ids(self, tokenizer) -> set[int]:
        stops = {tokenizer.eos_id}
        if self.template.stop_at_eot:
            stops.add(tokenizer.special_ids["<|eot|>"])
        return stops

    def answer_ids(self, tokenizer, answer: str) -> list[int]:
        eot = tokenizer.special_ids["<|eot|>"]
        if self.template.stop_at_eot:
            return tokenizer.encode(answer.strip()) + [eot]
        # answers that end at eos learn to emit it (the released OmniMamba's training: answer, eos, <|eot|>)
        return tokenizer.encode(answer.strip()) + [tokenizer.eos_id, eot]

    def spec(self) -> str:
        return self.name


CHAT_PREFIX = "chat:"  # an inline chat layout: "chat:" + its fields as JSON
CHAT_TEMPLATE_PREFIX = "chat_template:"  # a Hugging Face chat template: "chat_template:" + a directory or file


@dataclass(frozen=True)
class ChatLayout(MMULayout):
    """A chat-style layout written as text, the tokenizer's own special tokens inside it (InternVL / HoVLE, or one
    derived from a Hugging Face ``chat_template``):

    ``head`` + image slots + ``tail`` + ``question`` (``{question}`` filled in) + answer + ``answer_end``, later
    turns with ``next_question``; answers end at ``stop`` (one token of the tokenizer) or eos. ``image_token`` is
    the slot token a text rendering of the prompt shows (``prompt_text``); the model puts image features there."""

    head: str
    tail: str
    question: str
    answer_end: str
    stop: str
    next_question: str | None = None
    image_token: str = "<IMG_CONTEXT>"

    def __post_init__(self) -> None:
        for name in ("question", "next_question"):
            text = getattr(self, name)
            if text is not None and "{question}" not in text:
                raise OmnicoreError(f"MMU chat layout: {name} {text!r} needs a {{question}} placeholder")
        if not self.stop:
            raise OmnicoreError("MMU chat layout: stop (the token that ends an answer) is empty")

    def head_ids(self, tokenizer) -> list[int]:
        return tokenizer.encode(self.head)

    def tail_ids(self, tokenizer) -> list[int]:
        return tokenizer.encode(self.tail)

    def question_ids(self, tokenizer, question: str, turn: int = 0) -> list[int]:
        text = self.question if turn == 0 or self.next_question is None else self.next_question
        return tokenizer.encode(text.replace("{question}", question))

    def answer_ids(self, tokenizer, answer: str) -> list[int]:
        return tokenizer.encode(answer.strip() + self.answer_end)

    def stop_ids(self, tokenizer) -> set[int]:
        return {tokenizer.eos_id, *tokenizer.encode(self.stop)}

    def check(self, tokenizer) -> None:
        ids = tokenizer.encode(self.stop)
        if len(ids) != 1:  # generation stops at one token id
            raise OmnicoreError(f"MMU chat layout: its stop {self.stop!r} is {len(ids)} tokens of the text tokenizer, "
                                "not one; use a tokenizer.json that has it as an added token")

    def prompt_text(self, question: str, num_patches: int) -> str:
        """The first turn's prompt as text, ``image_token`` in the image slots (what InternVL's tokenizer reads)."""
        return self.head + self.image_token * num_patches + self.tail + self.question.replace("{question}", question)

    def spec(self) -> str:
        return CHAT_PREFIX + json.dumps(dataclasses.asdict(self), ensure_ascii=False)

    @staticmethod
    def from_spec(text: str, where: str = "mmu_template") -> "ChatLayout":
        try:
            fields = json.loads(text[len(CHAT_PREFIX):])
        except ValueError as exc:
            raise OmnicoreError(f"{where}: {CHAT_PREFIX} needs a JSON object after it: {exc}") from None
        known = {f.name for f in dataclasses.fields(ChatLayout)}
        if not isinstance(fields, dict) or set(fields) - known or not all(
                isinstance(v, str) or (k == "next_question" and v is None) for k, v in fields.items()):
            raise OmnicoreError(f"{where}: {CHAT_PREFIX} takes a JSON object of strings with keys "
                                f"{', '.join(sorted(known))}")
        try:
            return ChatLayout(**fields)
        except TypeError as exc:
            raise OmnicoreError(f"{where}: {exc}") from None

    @staticmethod
    def from_chat_template(template: str, bos_token: str = "", eos_token: str = "", image_open: str = "<img>",
                           image_close: str = "</img>", image_token: str = "<IMG_CONTEXT>",
                           where: str = "chat_template") -> "ChatLayout":
        """The layout a Jinja chat template renders: the first user turn is ``<image>\\n{question}`` with the
        image as ``image_open`` + slots + ``image_close`` (InternVL's convention), answers end where the template
        ends an assistant turn. Rendered in a sandbox; a template that does not continue one turn with the next
        is an error."""
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def fail(message: str):
            raise OmnicoreError(f"{where}: {message}")

        def raise_exception(message):
            fail(f"the template raised: {message}")

        # as transformers renders chat templates: blocks trimmed, loop controls available
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = raise_exception

        def render(messages: list[dict], generation_prompt: bool) -> str:
            try:
                return env.from_string(template).render(messages=messages, add_generation_prompt=generation_prompt,
                                                         bos_token=bos_token, eos_token=eos_token)
            except TemplateError as exc:
                fail(f"cannot render: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")

        img, q1, a1, q2 = "\x01IMAGE\x01", "\x01QUESTION\x01", "\x01ANSWER\x01", "\x01NEXT\x01"
        user = {"role": "user", "content": f"{img}\n{q1}"}
        first = render([user], True)
        if first.count(img) != 1 or first.count(q1) != 1 or first.index(img) > first.index(q1):
            fail("a user turn does not show its content once (image, then question)")
        before, after = first.split(img)
        answered = render([user, {"role": "assistant", "content": a1}], False)
        if not answered.startswith(first) or answered.count(a1) != 1 or not answered[len(first):].startswith(a1):
            fail("an assistant turn does not continue the prompt the template renders for it")
        answer_end = answered[len(first) + len(a1):]
        follow = render([user, {"role": "assistant", "content": a1}, {"role": "user", "content": q2}], True)
        if not follow.startswith(answered) or follow.count(q2) != 1:
            fail("a second user turn does not continue the first answer")
        stop = answer_end.strip() or eos_token
        return ChatLayout(head=before + image_open, tail=image_close, question=after.replace(q1, "{question}"),
                          answer_end=answer_end, stop=stop,
                          next_question=follow[len(answered):].replace(q2, "{question}"), image_token=image_token)


# tokenizer_config.json and chat templates are a few KB; a bound keeps a wrong path from reading a huge file
_CHAT_TEMPLATE_MAX_BYTES = 1 << 20


def chat_template_layout(path: str | Path, where: str = "mmu_template") -> ChatLayout:
    """A layout from a Hugging Face directory's tokenizer_config.json ``chat_template`` (or that file, or a .jinja
    template file)."""
    from ..errors import InputFileError
    from ..inputs import parse_json, read_text

    p = Path(path).expanduser()
    file = p / "tokenizer_config.json" if p.is_dir() else p
    try:
        text = read_text(file, "chat template", _CHAT_TEMPLATE_MAX_BYTES)
        if file.suffix != ".json":
            return ChatLayout.from_chat_template(text, where=f"{where}: {file}")
        config = parse_json(text, str(file), max_depth=16)
    except InputFileError as exc:
        raise OmnicoreError(f"{where}: {exc}") from None
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):  # several named templates: the default one
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    if not isinstance(template, str):
        raise OmnicoreError(f"{where}: {file}: no chat_template string")

    def token(key: str) -> str:
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        return value if isinstance(value, str) else ""

    return ChatLayout.from_chat_template(template, token("bos_token"), token("eos_token"), where=f"{where}: {file}")


def layout_names() -> list[str]:
    """Named MMU layouts: OmniMamba's templates and those plugins register (``register_mmu_layouts``)."""
    from ..registry import registry

    return list(MMU_TEMPLATES) + [c.name for c in registry.list("mmu_layout") if c.name not in MMU_TEMPLATES]


def mmu_layout(spec: str) -> MMULayout:
    """The MMU layout a model's ``mmu_template`` names: a template of OmniMamba's layout (``MMU_TEMPLATES``), a
    layout a plugin registers (``internvl``...), ``chat_template:<dir or file>`` (a Hugging Face chat template),
    ``chat:{...}`` (a chat layout's fields as JSON), or a literal text with ``{question}`` (OmniMamba's layout)."""
    if not isinstance(spec, str):
        raise OmnicoreError(f"mmu_template: expected a string, got {type(spec).__name__}")
    if spec in MMU_TEMPLATES:
        return OmniMambaLayout(spec, MMU_TEMPLATES[spec])
    if spec.startswith(CHAT_PREFIX):
        return ChatLayout.from_spec(spec)
    if spec.startswith(CHAT_TEMPLATE_PREFIX):
        return chat_template_layout(spec[len(CHAT_TEMPLATE_PREFIX):])
    if "{question}" in spec:
        return OmniMambaLayout(spec, MMUTemplate(spec))
    from ..registry import registry

    if spec and any(c.name == spec for c in registry.list("mmu_layout")):
        layout = registry.create("mmu_layout", spec)
        if not isinstance(layout, MMULayout):
            raise OmnicoreError(f"mmu_template {spec!r}: its plugin returned {type(layout).__name__}, not an MMULayout")
        return layout
    raise OmnicoreError(f"mmu_template {spec!r}: neither a layout name ({', '.join(layout_names())}), "
                        f"{CHAT_TEMPLATE_PREFIX}<directory>, nor a text with a {{question}} placeholder")


class CaptionTruncatedWarning(OmnicoreWarning):
    """A caption had more tokens than the model reads; the rest were dropped."""


@dataclass(frozen=True)
class Layout:
    tokenizer: object
    max_caption_tokens: int
    max_text_tokens: int
    caption_reads: int = 1
    # the MMU layout: a name or spec string (``mmu_layout``) or an ``MMULayout`` object
    mmu_template: "str | MMULayout" = "omnicore"

    def sid(self, token: str) -> int:
        return self.tokenizer.special_ids[token]

    # --- MMU (what the model's MMU layout says, bound to its tokenizer) -------------------------------------
    @cached_property
    def mmu(self) -> "MMULayout":
        layout = self.mmu_template if isinstance(self.mmu_template, MMULayout) else mmu_layout(self.mmu_template)
        layout.check(self.tokenizer)
        return layout

    @property
    def mmu_head_ids(self) -> list[int]:
        """Tokens before the image slots."""
        return self.mmu.head_ids(self.tokenizer)

    @property
    def mmu_tail_ids(self) -> list[int]:
        """Tokens between the image slots and the text."""
        return self.mmu.tail_ids(self.tokenizer)

    def question_ids(self, question: str, turn: int = 0) -> list[int]:
        """The prompt text of a question (``turn``: its place in a conversation, 0 first)."""
        return self.mmu.question_ids(self.tokenizer, question, turn)

    @property
    def mmu_stop_ids(self) -> set[int]:
        """Tokens that end an answer."""
        return self.mmu.stop_ids(self.tokenizer)

    def answer_ids(self, answer: str) -> list[int]:
        return self.mmu.answer_ids(self.tokenizer, answer)

    def mmu_text(self, turns: list[dict]) -> tuple[list[int], list[int]]:
        """Text ids and labels (answers only, IGNORE elsewhere), truncated to max_text_tokens."""
        ids: list[int] = []
        labels: list[int] = []
        for i, turn in enumerate(turns):
            q = self.question_ids(turn["question"], i)
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
