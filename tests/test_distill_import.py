"""Importing a released mmMamba checkpoint (``mmMamba_chat``: packed ``wvkqgdt`` mixers, InternLM2 names, hybrid
layers as ``wqkv``/``wo``), written here in that layout from a tiny student, into a model directory that
``omnicore.load`` serves and that computes what the student computed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import omnicore
from omnicore.errors import CheckpointError

sys.path.insert(0, str(Path(__file__).parent))
from test_transformer_backbone import randomize, write_tokenizer  # noqa: E402

LLM = {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
       "intermediate_size": 64, "rms_norm_eps": 1e-5, "rope_theta": 1000.0, "max_position_embeddings": 128,
       "hidden_act": "silu"}


def _student(tokenizer: Path, hybrid: list[int]):
    from omnicore.distill.student import make_student
    from omnicore.plugins.backbones.transformer.mmmamba_import import TEXT_CHAT
    from omnicore.model.layout import ChatLayout

    teacher = omnicore.build({
        "max_text_tokens": 64, "mmu_template": ChatLayout(**TEXT_CHAT).spec(),
        "text_tokenizer": {"type": "hf_tokenizer", "params": {"path": str(tokenizer)}},
        "backbone": {"type": "transformer", "params": {
            "arch": "internlm2", "d_model": 32, "n_layer": 4, "n_head": 4, "n_kv_head": 2, "d_intermediate": 64,
            "rms_norm_eps": 1e-5, "rope_theta": 1000.0, "max_position_embeddings": 128}},
        "heads": {"text": {"type": "text_lm"}}})
    student = make_student(teacher, hybrid=hybrid).eval()
    randomize(student.backbone, 7, std=0.2)
    randomize(student.heads, 8)
    return student


def write_release(directory: Path, student, tokenizer: Path) -> Path:
    """The student in mmMamba's released layout: two shards and an index, config.json, tokenizer.json."""
    from omnicore.plugins.backbones.mamba2.mmmamba_mixer import pack_inference
    from omnicore.plugins.backbones.transformer.weights import pack_internlm2_qkv

    directory.mkdir(parents=True)
    state = {}
    for i, layer in enumerate(student.backbone.layers):
        p = f"language_model.model.layers.{i}."
        attn = layer.self_attn
        if i in student.backbone.hybrid:
            state[p + "attention.wqkv.weight"] = pack_internlm2_qkv(attn.q_proj.weight, attn.k_proj.weight,
                                                                    attn.v_proj.weight, 4, 2, 8)
            state[p + "attention.wo.weight"] = attn.o_proj.weight
        else:
            state.update({p + "attention." + k: v for k, v in pack_inference(attn).items()})
        state.update({p + "attention_norm.weight": layer.input_layernorm.weight,
                      p + "ffn_norm.weight": layer.post_attention_layernorm.weight,
                      p + "feed_forward.w1.weight": layer.mlp.gate_proj.weight,
                      p + "feed_forward.w3.weight": layer.mlp.up_proj.weight,
                      p + "feed_forward.w2.weight": layer.mlp.down_proj.weight})
    head = student.heads["text"]
    pad = torch.zeros(2, 32)  # the release's padding rows, past the tokenizer's ids
    state["language_model.model.tok_embeddings.weight"] = torch.cat([head.embedding.weight, pad])
    state["language_model.output.weight"] = torch.cat([head.lm_head.weight, pad])
    state["language_model.model.norm.weight"] = student.backbone.norm.weight
    state["embedding_model.encoder.0.attention.dt_bias"] = torch.zeros(4)  # HoVLE's embedding: not imported
    state = {k: v.detach().clone().contiguous() for k, v in state.items()}
    keys = sorted(state)
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, names in halves.items():
        save_file({k: state[k] for k in names}, str(directory / name))
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: name for name, names in halves.items() for k in names}}))
    (directory / "config.json").write_text(json.dumps({"model_type": "mmMamba_chat", "llm_config": LLM}))
    (directory / "tokenizer.json").write_bytes(tokenizer.read_bytes())
    return directory


@pytest.mark.parametrize("hybrid", [[], [0, 2]])
def test_an_mmmamba_release_imports_into_a_model_directory_that_computes_the_same(hybrid, tmp_path):
    from omnicore.distill.losses import mmu_logits
    from omnicore.plugins.backbones.transformer.mmmamba_import import convert_mmmamba

    tokenizer = write_tokenizer(tmp_path / "tok" / "tokenizer.json")
    student = _student(tokenizer, hybrid)
    release = write_release(tmp_path / "release", student, tokenizer)
    out = convert_mmmamba(release, tmp_path / "imported")
    model = omnicore.load(out)
    assert model.backbone.hybrid == hybrid
    assert model.config["imported_from"]["not_imported"] == {"embedding_model": 1}
    for k, v in student.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    ids = model.layout.question_ids("What color is it?")
    batch = {"text_ids": torch.tensor([ids]), "labels": torch.tensor([ids])}
    with torch.no_grad():
        torch.testing.assert_close(mmu_logits(model, batch), mmu_logits(student, batch), rtol=0, atol=0)
    assert model.answer([None], ["hi"], max_new_tokens=6) == student.answer([None], ["hi"], max_new_tokens=6)


def test_a_release_with_a_broken_layer_is_named(tmp_path):
    from omnicore.plugins.backbones.transformer.mmmamba_import import convert_mmmamba

    tokenizer = write_tokenizer(tmp_path / "tok" / "tokenizer.json")
    release = write_release(tmp_path / "release", _student(tokenizer, []), tokenizer)
    from safetensors.torch import load_file

    index = json.loads((release / "model.safetensors.index.json").read_text())["weight_map"]
    key = "language_model.model.layers.3.attention.wvkqgdt.weight"
    shard = release / index[key]
    state = load_file(str(shard))
    state[key] = state[key][:-1]  # one dt row short
    save_file(state, str(shard))
    with pytest.raises(CheckpointError, match=r"layers\.3\.attention: shape mismatch for 'wvkqgdt.weight'"):
        convert_mmmamba(release, tmp_path / "imported")
    (release / "config.json").write_text(json.dumps({"model_type": "internlm2", "llm_config": LLM}))
    with pytest.raises(CheckpointError, match="model_type 'internlm2' is not 'mmMamba_chat'"):
        convert_mmmamba(release, tmp_path / "imported")


def test_omni_convert_mmmamba(tmp_path, capsys):
    """The command line: a release becomes a model directory; a broken one is one line and exit 2."""
    from omnicore.cli.main import main

    tokenizer = write_tokenizer(tmp_path / "tok" / "tokenizer.json")
    student = _student(tokenizer, [1])
    release = write_release(tmp_path / "release", student, tokenizer)
    assert main(["convert", "mmmamba", str(release), "--out", str(tmp_path / "imported")]) == 0
    assert omnicore.load(tmp_path / "imported").backbone.hybrid == [1]
    (release / "config.json").write_text(json.dumps({"model_type": "internlm2", "llm_config": LLM}))
    assert main(["convert", "mmmamba", str(release), "--out", str(tmp_path / "again")]) == 2
    err = capsys.readouterr().err.strip()
    assert "is not 'mmMamba_chat'" in err and len(err.splitlines()) == 1 and not (tmp_path / "again").exists()
