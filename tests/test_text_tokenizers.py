"""Text tokenizers: byte-level and tokenizer.json, both with OmniMamba's special tokens and padded vocabularies."""

from __future__ import annotations

import pytest

import omnicore
from omnicore.errors import OmnicoreError
from omnicore.interfaces import SPECIAL_TOKENS


def test_byte_round_trip_and_specials():
    tok = omnicore.create("text_tokenizer", "byte")
    text = "What colour? ünïcødé ✓"
    assert tok.decode(tok.encode(text)) == text
    ids = set(tok.special_ids.values())
    assert set(tok.special_ids) == set(SPECIAL_TOKENS) and len(ids) == len(SPECIAL_TOKENS)
    assert min(ids) >= 256 and tok.pad_id not in ids and tok.eos_id not in ids
    assert tok.vocab_size % 8 == 0 and tok.vocab_size > max(ids | {tok.pad_id, tok.eos_id})
    assert tok.encode("<|soi|>") == list(b"<|soi|>")  # text never turns into control tokens
    assert tok.decode(tok.encode("hi") + [tok.special_ids["<|eot|>"]], skip_special=False) == "hi<|eot|>"
    assert omnicore.create("text_tokenizer", "byte", pad_to_multiple_of=64).vocab_size == 320


@pytest.fixture
def tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=60, special_tokens=["[UNK]", "<|endoftext|>"])
    tok.train_from_iterator(["a red circle on the left", "a blue square on the right", "what shape is it"] * 5,
                            trainer)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


def test_hf_tokenizer_adds_specials_and_pads(tokenizer_json):
    tok = omnicore.create("text_tokenizer", "hf_tokenizer", path=str(tokenizer_json))
    ids = tok.encode("a red circle on the left")
    assert tok.decode(ids) == "a red circle on the left"
    assert set(tok.special_ids) == set(SPECIAL_TOKENS) and len(set(tok.special_ids.values())) == 9
    assert tok.eos_id == tok.pad_id and tok.vocab_size % 16 == 0
    assert tok.vocab_size > max(tok.special_ids.values())
    assert tok.decode(ids + [tok.special_ids["<|eot|>"]]) == "a red circle on the left"


def test_hf_tokenizer_missing_file(tmp_path):
    with pytest.raises(OmnicoreError, match="tokenizer.json not found"):
        omnicore.create("text_tokenizer", "hf_tokenizer", path=str(tmp_path / "nope" / "tokenizer.json"))


def test_byte_tokenizer_word_list_gives_one_token_per_known_word():
    tok = omnicore.create("text_tokenizer", "byte", words=["a", "red", "circle", "What", "shape", "is", "it", "?"])
    plain = omnicore.create("text_tokenizer", "byte")
    assert len(tok.encode("a red circle")) == 3 and len(plain.encode("a red circle")) == 12
    assert len(tok.encode("What shape is it?")) == 5
    for text in ["a red circle", "a  Red circlex, héllo?!", "", "What shape is it?\n"]:
        assert tok.decode(tok.encode(text)) == text  # unknown pieces fall back to bytes: always exact
    assert tok.vocab_size > plain.vocab_size
    assert set(tok.encode("red")).isdisjoint(range(256)) and tok.decode(tok.encode("red")) == "red"
    with pytest.raises(OmnicoreError, match="'two words' is not a single word"):
        omnicore.create("text_tokenizer", "byte", words=["two words"])
