"""Text tokenizers with OmniMamba's special tokens: a byte-level one (no files) and a `tokenizers` one
read from a local tokenizer.json (GPT-NeoX-20B in the real recipes). Vocabularies are padded to a multiple."""

from __future__ import annotations

from pathlib import Path

from omnicore.errors import OmnicoreError
from omnicore.interfaces import SPECIAL_TOKENS


def _pad_to(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class ByteTokenizer:
    """UTF-8 bytes are ids 0-255; specials, pad and eos follow. Text is encoded literally: the string
    "<|soi|>" inside a prompt is seven bytes, never the special token (prompts cannot inject control tokens)."""

    def __init__(self, pad_to_multiple_of: int = 8) -> None:
        self.special_ids = {tok: 256 + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.pad_id = 256 + len(SPECIAL_TOKENS)
        self.eos_id = self.pad_id + 1
        self.vocab_size = _pad_to(self.eos_id + 1, pad_to_multiple_of)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        names = {v: k for k, v in self.special_ids.items()}
        out, buf = [], bytearray()
        for i in ids:
            if i < 256:
                buf.append(i)
                continue
            out.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
            if not skip_special:
                out.append(names.get(i, "<|pad|>" if i == self.pad_id else "<|eos|>" if i == self.eos_id else ""))
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def __len__(self) -> int:
        return self.vocab_size


class HFTokenizer:
    """A `tokenizers` tokenizer.json plus the special tokens; pad/eos are <|endoftext|> when it has one."""

    def __init__(self, path: str, pad_to_multiple_of: int = 16, eos_token: str = "<|endoftext|>") -> None:
        from tokenizers import AddedToken, Tokenizer

        p = Path(path).expanduser()
        if not p.is_file():
            raise OmnicoreError(f"{p}: tokenizer.json not found")
        try:
            self._tok = Tokenizer.from_file(str(p))
        except Exception as exc:
            raise OmnicoreError(f"{p}: not a readable tokenizer.json: {str(exc).splitlines()[0]}") from None
        specials = list(SPECIAL_TOKENS)
        if self._tok.token_to_id(eos_token) is None:
            specials += [eos_token]
        if self._tok.token_to_id("<|pad|>") is None and self._tok.token_to_id(eos_token) is None:
            specials += ["<|pad|>"]
        self._tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
        self.special_ids = {t: self._tok.token_to_id(t) for t in SPECIAL_TOKENS}
        self.eos_id = self._tok.token_to_id(eos_token)
        pad = self._tok.token_to_id("<|pad|>")
        self.pad_id = pad if pad is not None else self.eos_id
        self.vocab_size = _pad_to(self._tok.get_vocab_size(with_added_tokens=True), pad_to_multiple_of)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        real = self._tok.get_vocab_size(with_added_tokens=True)
        return self._tok.decode([i for i in ids if i < real], skip_special_tokens=skip_special)

    def __len__(self) -> int:
        return self.vocab_size
