"""Text tokenizers with OmniMamba's special tokens: a byte-level one (no files) and a `tokenizers` one
read from a local tokenizer.json (GPT-NeoX-20B in the real recipes). Vocabularies are padded to a multiple."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal, Sequence

from omnicore.errors import OmnicoreError
from omnicore.interfaces import SPECIAL_TOKENS


def _pad_to(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


_PIECES = re.compile(r" ?\w+| ?[^\w\s]+|\s+")  # words and punctuation runs (each with one leading space), spaces


class ByteTokenizer:
    """UTF-8 bytes are ids 0-255; specials, pad and eos follow. Text is encoded literally: the string
    "<|soi|>" inside a prompt is seven bytes, never the special token (prompts cannot inject control tokens).

    ``words``: whole words that get one id each (as they are and after a space, like GPT-2's pieces), after eos.
    Text is cut into words, punctuation runs and spaces; a piece in that table is one token, anything else its
    bytes, so every text still encodes and decoding is exact. A short word list puts a small domain's words one
    token apart instead of several bytes (the quick start's captions and questions).
    """

    def __init__(self, pad_to_multiple_of: int = 8, words: Sequence[str] = ()) -> None:
        self.special_ids = {tok: 256 + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.pad_id = 256 + len(SPECIAL_TOKENS)
        self.eos_id = self.pad_id + 1
        pieces: list[str] = []
        for word in words:
            if not word or _PIECES.fullmatch(word) is None or word != word.strip():
                raise OmnicoreError(f"text tokenizer byte: {word!r} is not a single word or punctuation run")
            for piece in (word, " " + word):
                if piece not in pieces:
                    pieces.append(piece)
        self.words = list(words)
        self.piece_ids = {piece: self.eos_id + 1 + i for i, piece in enumerate(pieces)}
        self.piece_bytes = {i: piece.encode("utf-8") for piece, i in self.piece_ids.items()}
        self.vocab_size = _pad_to(self.eos_id + 1 + len(pieces), pad_to_multiple_of)

    def encode(self, text: str) -> list[int]:
        if not self.piece_ids:
            return list(text.encode("utf-8"))
        ids: list[int] = []
        for piece in _PIECES.findall(text):
            pid = self.piece_ids.get(piece)
            ids.extend([pid] if pid is not None else piece.encode("utf-8"))
        return ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        names = {v: k for k, v in self.special_ids.items()}
        out, buf = [], bytearray()
        for i in ids:
            if i < 256:
                buf.append(i)
                continue
            if i in self.piece_bytes:
                buf.extend(self.piece_bytes[i])
                continue
            out.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
            if not skip_special:
                out.append(names.get(i, "<|pad|>" if i == self.pad_id else "<|eos|>" if i == self.eos_id else ""))
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def __len__(self) -> int:
        return self.vocab_size


# How the special tokens are appended to a tokenizer.json's vocabulary:
# - "omnicore": the nine specials; pad is eos when the file has one (models saved so far use this order).
# - "omnimamba": the released OmniMamba's order, so its checkpoint's rows line up: "[PAD]" first (the pad id,
#   e.g. T2I's caption left-padding), then the nine specials. On GPT-NeoX-20B: [PAD] 50277, <|soi|> 50278 ...
#   <|lvg|> 50286, 50288 rows.
AddedTokens = Literal["omnicore", "omnimamba"]
OMNIMAMBA_PAD = "[PAD]"


class HFTokenizer:
    """A `tokenizers` tokenizer.json plus the special tokens, appended in the ``added_tokens`` order.

    ``base_vocab_size``: the file's own ids (GPT-NeoX-20B: 50277), before the specials."""

    def __init__(self, path: str, pad_to_multiple_of: int = 16, eos_token: str = "<|endoftext|>",
                 added_tokens: AddedTokens = "omnicore") -> None:
        from tokenizers import AddedToken, Tokenizer

        p = Path(path).expanduser()
        if not p.is_file():
            raise OmnicoreError(f"{p}: tokenizer.json not found")
        try:
            self._tok = Tokenizer.from_file(str(p))
        except Exception as exc:
            raise OmnicoreError(f"{p}: not a readable tokenizer.json: {str(exc).splitlines()[0]}") from None
        self.base_vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        has_eos = self._tok.token_to_id(eos_token) is not None
        if added_tokens == "omnimamba":
            if not has_eos:
                raise OmnicoreError(f"{p}: no {eos_token!r} in the vocabulary; OmniMamba's order "
                                    "(added_tokens: omnimamba) adds no eos token")
            specials = [OMNIMAMBA_PAD, *SPECIAL_TOKENS]
        elif added_tokens == "omnicore":
            specials = list(SPECIAL_TOKENS)
            if not has_eos:
                specials += [eos_token]
            if self._tok.token_to_id("<|pad|>") is None and not has_eos:
                specials += ["<|pad|>"]
        else:
            raise OmnicoreError(f"text tokenizer: added_tokens {added_tokens!r}; use omnicore or omnimamba")
        self.added_tokens = added_tokens
        self._tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
        self.special_ids = {t: self._tok.token_to_id(t) for t in SPECIAL_TOKENS}
        self.eos_id = self._tok.token_to_id(eos_token)
        pad = self._tok.token_to_id(OMNIMAMBA_PAD if added_tokens == "omnimamba" else "<|pad|>")
        self.pad_id = pad if pad is not None else self.eos_id
        self.vocab_size = _pad_to(self._tok.get_vocab_size(with_added_tokens=True), pad_to_multiple_of)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        real = self._tok.get_vocab_size(with_added_tokens=True)
        return self._tok.decode([i for i in ids if i < real], skip_special_tokens=skip_special)

    def __len__(self) -> int:
        return self.vocab_size
