"""The model's roles: which registry kind fills each, and which params assembly injects at build time.

Injected params come from other components (the backbone's width, the tokenizer's vocabulary), so a recipe
may leave them out; validation treats them as provided.
"""

from __future__ import annotations

ROLE_KINDS = {
    "encoder": "encoder",
    "projector": "projector",
    "image_tokenizer": "image_tokenizer",
    "text_tokenizer": "text_tokenizer",
    "backbone": "backbone",
}

# heads.<name>: kind "head"; these are the names the unified model wires, with what it injects
HEAD_INJECTIONS = {
    "text": {"vocab_size", "d_model"},
    "image": {"codebook_size", "d_model"},
    "caption": {"d_model"},
    "caption_pool": {"d_model"},
    "mmu_positions": {"d_model"},
    "t2i_positions": {"d_model"},
    "contrastive": {"vocab_size", "encoder_dim"},
}
ROLE_INJECTIONS = {"projector": {"in_dim", "out_dim"}}
TASKS = ("mmu", "t2i")
