"""Built-in tokenizers: the `vqgan` image tokenizer (LlamaGen VQ-16 layout) and `byte` / `hf_tokenizer` text ones."""

from __future__ import annotations

from typing import Literal, Optional

from omnicore import hookimpl


def build_vqgan(preset: Literal["vq16", "tiny"] = "vq16", ch: Optional[int] = None,
                ch_mult: Optional[list[int]] = None, num_res_blocks: Optional[int] = None,
                z_channels: Optional[int] = None, codebook_size: Optional[int] = None,
                codebook_embed_dim: Optional[int] = None, codebook_l2_norm: Optional[bool] = None,
                commit_beta: Optional[float] = None, dropout: Optional[float] = None,
                norm_groups: Optional[int] = None, weights: Optional[str] = None):
    """VQGAN image tokenizer, LlamaGen VQ-16 by default (16384 x 8 codebook, 256 px -> 16x16 codes)."""
    import dataclasses

    from .vqgan import PRESETS, VQGAN

    overrides = {k: v for k, v in dict(ch=ch, ch_mult=tuple(ch_mult) if ch_mult else None, num_res_blocks=num_res_blocks,
                                       z_channels=z_channels, codebook_size=codebook_size,
                                       codebook_embed_dim=codebook_embed_dim, codebook_l2_norm=codebook_l2_norm,
                                       commit_beta=commit_beta, dropout=dropout,
                                       norm_groups=norm_groups).items() if v is not None}
    model = VQGAN(dataclasses.replace(PRESETS[preset], **overrides))
    if weights:
        from omnicore.training.checkpoint import load_component_weights

        load_component_weights(model, {"weights": weights}, "image_tokenizer vqgan")
    return model


def build_byte(pad_to_multiple_of: int = 8, words: list[str] = []):
    """Byte-level text tokenizer needing no files, with OmniMamba's special tokens; ``words`` get one id each."""
    from .text import ByteTokenizer

    return ByteTokenizer(pad_to_multiple_of, words)


def build_hf_tokenizer(path: str, pad_to_multiple_of: int = 16, eos_token: str = "<|endoftext|>",
                       added_tokens: Literal["omnicore", "omnimamba"] = "omnicore"):
    """A local tokenizer.json (tokenizers library), e.g. GPT-NeoX-20B, with OmniMamba's special tokens.
    ``added_tokens: omnimamba`` adds them in the released OmniMamba's order and ids ([PAD] first)."""
    from .text import HFTokenizer

    return HFTokenizer(path, pad_to_multiple_of, eos_token, added_tokens=added_tokens)


@hookimpl
def register_image_tokenizers(register):
    register("vqgan", build_vqgan)


@hookimpl
def register_text_tokenizers(register):
    register("byte", build_byte)
    register("hf_tokenizer", build_hf_tokenizer)
