"""MMU layouts of Transformer VLMs, registered by name (``model.mmu_template: internvl``).

``internvl``: InternVL's and HoVLE's InternLM2 chat format (``internlm2-chat``, no system prompt):
``<|im_start|>user\\n<img>`` + image slots (``<IMG_CONTEXT>`` in their text) + ``</img>\\n{question}<|im_end|>``
``<|im_start|>assistant\\n``; answers end at ``<|im_end|>``, later turns open with ``<|im_start|>user\\n``.
The tokenizer must know ``<|im_end|>`` as one token (a tokenizer.json with it as an added token).
"""

from __future__ import annotations

from omnicore.model.layout import ChatLayout


def internvl_layout() -> ChatLayout:
    """InternVL / HoVLE: <|im_start|>user\\n<img><IMG_CONTEXT>...</img>\\n{question}<|im_end|>...assistant\\n"""
    return ChatLayout(head="<|im_start|>user\n<img>", tail="</img>",
                      question="\n{question}<|im_end|><|im_start|>assistant\n", answer_end="<|im_end|>",
                      stop="<|im_end|>", next_question="<|im_start|>user\n{question}<|im_end|><|im_start|>assistant\n",
                      image_token="<IMG_CONTEXT>")
