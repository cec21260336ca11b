"""Converters for the released files OmniMamba is built from, each strict and each usable from a recipe: a Mamba-2 LM
directory as a stage's init_from, LlamaGen VQ checkpoints, timm / open_clip vision files, and GPT-NeoX's
tokenizer.json with OmniMamba's added tokens. Tiny random tensors written in the official names."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest
import torch
from rich.console import Console

import omnicore
from omnicore.cli.main import main
from omnicore.convert.mamba2_lm import backbone_params
from omnicore.errors import CheckpointError, OmnicoreError
from omnicore.interfaces import SPECIAL_TOKENS
from omnicore.plugins.backbones import build_mamba2
from omnicore.plugins.tokenizers.text import HFTokenizer
from omnicore.runner import _init_source, _load_init_weights, run_recipe
from omnicore.training.checkpoint import load_component_weights, load_state_dict_file

torch.set_num_threads(2)


def one_line_error(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text, text
    return text


# --- tokenizer.json with OmniMamba's added tokens -----------------------------------------------------------------
def neox_like_tokenizer(path: Path, n_ids: int) -> Path:
    """A WordLevel tokenizer.json of ``n_ids`` ids whose id 0 is <|endoftext|>, as GPT-NeoX-20B's (50277 ids)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    words = ["a", "red", "circle", "on", "the", "left"] + [f"w{i}" for i in range(n_ids - 8)]
    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def neox_json(tmp_path_factory) -> Path:
    return neox_like_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json", 50277)


def test_omnimamba_added_tokens_get_the_released_ids(neox_json):
    tok = HFTokenizer(str(neox_json), added_tokens="omnimamba")
    assert tok.base_vocab_size == 50277 and tok.vocab_size == 50288
    assert tok.eos_id == 0 and tok._tok.id_to_token(0) == "<|endoftext|>"
    assert tok.pad_id == 50277 and tok._tok.token_to_id("[PAD]") == 50277
    assert [tok.special_ids[t] for t in ("<|soi|>", "<|eoi|>", "<|sot|>", "<|eot|>", "<|t2i|>", "<|mmu|>", "<|soc|>",
                                         "<|eoc|>", "<|lvg|>")] == list(range(50278, 50287))
    ids = tok.encode("a red circle")
    assert ids == [2, 3, 4] and tok.decode(ids + [tok.special_ids["<|eot|>"], tok.pad_id]) == "a red circle"
    # the default order is unchanged (models saved with it load identically): specials first, pad = eos
    default = HFTokenizer(str(neox_json))
    assert default.added_tokens == "omnicore" and default.pad_id == default.eos_id == 0
    assert [default.special_ids[t] for t in SPECIAL_TOKENS] == list(range(50277, 50286))
    assert default.vocab_size == 50288


def test_omnimamba_order_needs_the_eos_token(tmp_path):
    from tokenizers import Tokenizer, models

    path = tmp_path / "tokenizer.json"
    Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]")).save(str(path))
    with pytest.raises(OmnicoreError, match="no '<\\|endoftext\\|>' in the vocabulary") as info:
        HFTokenizer(str(path), added_tokens="omnimamba")
    one_line_error(info)


# --- Mamba-2 LM directories (state-spaces/mamba2-*) -------------------------------------------------------------
TINY_LM = {"d_model": 64, "d_intermediate": 0, "n_layer": 2, "vocab_size": 37,
           "ssm_cfg": {"layer": "Mamba2", "d_state": 16, "headdim": 16, "chunk_size": 16}, "attn_layer_idx": [],
           "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
           "pad_vocab_size_multiple": 16, "tie_embeddings": True}


def lm_state(config: dict, seed: int = 7) -> dict[str, torch.Tensor]:
    """A mamba_ssm MambaLMHeadModel state dict in fp16 (as mamba2-1.3b's pytorch_model.bin): the embedding padded
    to the multiple, lm_head the same tensor."""
    torch.manual_seed(seed)
    src = build_mamba2(**backbone_params(config), kernel="torch")
    for p in src.parameters():
        p.data.normal_(0.0, 0.5)  # every tensor differs from any init
    state = {f"backbone.{k}": v.half() for k, v in src.state_dict().items()}
    rows = -(-config["vocab_size"] // config["pad_vocab_size_multiple"]) * config["pad_vocab_size_multiple"]
    state["backbone.embedding.weight"] = torch.randn(rows, config["d_model"]).half()
    state["lm_head.weight"] = state["backbone.embedding.weight"]
    return state


def write_lm(directory: Path, config: dict, state: dict[str, torch.Tensor], kind: str = "bin") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    if kind == "bin":
        torch.save(state, directory / "pytorch_model.bin")
    else:  # safetensors stores a shared tensor once: a tied lm_head is left out
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items() if k != "lm_head.weight"},
                  str(directory / "model.safetensors"))
    return directory


def unified(config: dict, tokenizer: HFTokenizer):
    """A unified model with the LM's backbone shape, task LoRA and a text head sized by the tokenizer."""
    from omnicore.model.unified import UnifiedModel

    torch.manual_seed(0)
    backbone = build_mamba2(**backbone_params(config), kernel="torch",
                            lora={"tasks": ["mmu", "t2i"], "r": 4, "alpha": 16, "dropout": 0.0})
    text = omnicore.create("head", "text_vocab", vocab_size=tokenizer.vocab_size, d_model=config["d_model"])
    return UnifiedModel(backbone=backbone, text_tokenizer=tokenizer, heads={"text": text})


@pytest.fixture(scope="module")
def small_json(tmp_path_factory) -> Path:
    return neox_like_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json", TINY_LM["vocab_size"])


@pytest.mark.parametrize("kind", ["bin", "safetensors"])
def test_mamba2_lm_dir_as_init_from_loads_backbone_and_text_table(tmp_path, small_json, kind):
    state = lm_state(TINY_LM)
    lm = write_lm(tmp_path / "mamba2-tiny", TINY_LM, state, kind)
    assert _init_source(str(lm)) == lm
    # 37 ids + [PAD] + 9 specials = 47 -> 48 rows: the file's 48 padded rows, exactly as the released model
    model = unified(TINY_LM, HFTokenizer(str(small_json), added_tokens="omnimamba"))
    lora_before = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" in k}
    _load_init_weights(model, str(lm), "stages.s1.init_from")
    own = model.state_dict()
    for name, value in state.items():
        if name.startswith("backbone.layers.") or name == "backbone.norm_f.weight":
            key = name.removeprefix("backbone.")
            key = key if key in model.backbone.state_dict() else key.replace("in_proj.", "in_proj.base_layer.")
            assert torch.equal(model.backbone.state_dict()[key], value.float()), name
    assert torch.equal(model.heads["text"].weight, state["backbone.embedding.weight"].float())
    assert all(torch.equal(own[k], v) for k, v in lora_before.items())  # adapters keep their init
    h = torch.randn(2, 64)  # the text head is still the (tied) table
    assert torch.equal(model.heads["text"].logits(h), h @ model.heads["text"].weight.T)


def test_mamba2_lm_rows_beyond_the_file_get_the_mean_of_its_token_rows(tmp_path, small_json):
    state = lm_state(TINY_LM)
    lm = write_lm(tmp_path / "lm", TINY_LM, state)
    model = unified(TINY_LM, HFTokenizer(str(small_json), pad_to_multiple_of=64, added_tokens="omnimamba"))
    assert model.heads["text"].weight.shape[0] == 64
    _load_init_weights(model, str(lm), "init_from")
    table, emb = model.heads["text"].weight, state["backbone.embedding.weight"].float()
    assert torch.equal(table[:48], emb)
    assert torch.equal(table[48:], emb[:37].mean(0).expand(16, -1))


def test_mamba2_lm_missing_unexpected_misshapen_tensors_are_named(tmp_path, small_json):
    model = unified(TINY_LM, HFTokenizer(str(small_json), added_tokens="omnimamba"))
    cases = {
        "missing tensor 'backbone.layers.1.mixer.D'": lambda s: s.pop("backbone.layers.1.mixer.D"),
        "unexpected tensor 'backbone.layers.0.mixer.extra'":
            lambda s: s.__setitem__("backbone.layers.0.mixer.extra", torch.zeros(3)),
        "shape mismatch for 'backbone.layers.0.mixer.in_proj.weight'":
            lambda s: s.__setitem__("backbone.layers.0.mixer.in_proj.weight", torch.zeros(10, 64).half()),
        "missing tensor 'backbone.embedding.weight'": lambda s: (s.pop("backbone.embedding.weight"),
                                                                 s.pop("lm_head.weight")),
        "shape mismatch for 'backbone.embedding.weight'":
            lambda s: (s.__setitem__("backbone.embedding.weight", torch.zeros(40, 64).half()),
                       s.__setitem__("lm_head.weight", s["backbone.embedding.weight"])),
        "'lm_head.weight' differs from 'backbone.embedding.weight'":
            lambda s: s.__setitem__("lm_head.weight", torch.zeros_like(s["lm_head.weight"])),
    }
    for i, (message, damage) in enumerate(cases.items()):
        state = lm_state(TINY_LM)
        damage(state)
        lm = write_lm(tmp_path / f"lm{i}", TINY_LM, state)
        with pytest.raises(CheckpointError) as info:
            _load_init_weights(model, str(lm), "stages.s1.init_from")
        text = one_line_error(info)
        assert text.startswith(f"stages.s1.init_from: {lm / 'pytorch_model.bin'}: ") and message in text, text


def test_mamba2_lm_config_that_does_not_fit_the_model_is_named(tmp_path, small_json):
    model = unified(TINY_LM, HFTokenizer(str(small_json), added_tokens="omnimamba"))
    ssm_default = {**TINY_LM, "ssm_cfg": {"layer": "Mamba2", "headdim": 16}}  # d_state: mamba_ssm's 128
    cases = [({**TINY_LM, "d_model": 32}, "d_model is 32 there, 64 in the model's backbone"),
             ({**TINY_LM, "n_layer": 3}, "n_layer is 3 there, 2 in the model's backbone"),
             (ssm_default, "ssm_cfg.d_state is 128 there, 16 in the model's backbone"),
             ({**TINY_LM, "ssm_cfg": {"layer": "Mamba1"}}, "ssm_cfg.layer is 'Mamba1'"),
             ({**TINY_LM, "tie_embeddings": False}, "tie_embeddings is false"),
             ({**TINY_LM, "vocab_size": 40}, "config.json vocab_size is 40, the model's tokenizer.json has 37 ids")]
    for i, (config, message) in enumerate(cases):
        state = lm_state(TINY_LM)
        if config["vocab_size"] != TINY_LM["vocab_size"]:
            state["backbone.embedding.weight"] = state["lm_head.weight"] = torch.zeros(48, 64).half()
        lm = write_lm(tmp_path / f"lm{i}", config, state)
        with pytest.raises(CheckpointError) as info:
            _load_init_weights(model, str(lm), "init_from")
        assert message in one_line_error(info)


QUICKSTART_LM = {**TINY_LM, "d_model": 128, "n_layer": 4, "vocab_size": 300,
                 "ssm_cfg": {"layer": "Mamba2", "d_state": 32, "headdim": 32, "chunk_size": 32}}


def stage_recipe(path: Path, init_from: Path) -> Path:
    path.write_text(textwrap.dedent(f"""\
        extends: quickstart
        stages:
          - name: mmu
            init_from: {json.dumps(str(init_from))}
            tasks:
              mmu:
                batch_size: 2
                data: {{type: synthetic_shapes, params: {{task: mmu, size: 4, image_size: 32}}}}
            train: {{roles: [projector]}}
            optimizer: {{lr: 1.0e-3}}
            steps: 1
        """))
    return path


def test_mamba2_lm_dir_from_a_recipe_and_its_error_through_the_cli(tmp_path, capsys):
    state = lm_state(QUICKSTART_LM)
    lm = write_lm(tmp_path / "mamba2-lm", QUICKSTART_LM, state)
    recipe = stage_recipe(tmp_path / "r.yaml", lm)
    run = run_recipe(str(recipe), ["~evaluation"], run_dir=tmp_path / "run",
                     console=Console(file=open(os.devnull, "w")))
    saved = load_state_dict_file(run / "model" / "model.safetensors")  # the backbone was not trained
    assert torch.equal(saved["backbone.layers.3.mixer.in_proj.base_layer.weight"],
                       state["backbone.layers.3.mixer.in_proj.weight"].float())
    assert torch.equal(saved["heads.text.embedding.weight"][:304], state["backbone.embedding.weight"].float())
    bad = write_lm(tmp_path / "bad-lm", {**QUICKSTART_LM, "n_layer": 2}, lm_state({**QUICKSTART_LM, "n_layer": 2}))
    rc = main(["recipe", "run", str(stage_recipe(tmp_path / "bad.yaml", bad)), "~evaluation",
               "--run-dir", str(tmp_path / "run2")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "n_layer is 2 there, 4 in the model's backbone" in err, err


# --- LlamaGen VQ checkpoints ----------------------------------------------------------------------------------------
LLAMAGEN_TINY = dict(preset="tiny", codebook_size=64, codebook_embed_dim=8, codebook_l2_norm=True)


def llamagen_file(path: Path, damage=None) -> dict[str, torch.Tensor]:
    """``{"model": state, ...}`` as LlamaGen saves it; its codebook_used holds recent code indices."""
    torch.manual_seed(3)
    state = {k: torch.randn_like(v) for k, v in omnicore.create("image_tokenizer", "vqgan", **LLAMAGEN_TINY)
             .state_dict().items()}
    state["quantize.codebook_used"] = torch.randint(0, 64, (65536,)).float()
    if damage:
        damage(state)
    torch.save({"model": state, "steps": 1000}, path)
    return state


def test_llamagen_vq_loads_bit_for_bit_and_ignores_codebook_used(tmp_path):
    state = llamagen_file(tmp_path / "vq_ds16_t2i.pt")
    vq = omnicore.create("image_tokenizer", "vqgan", **LLAMAGEN_TINY, weights=str(tmp_path / "vq_ds16_t2i.pt"))
    own = vq.state_dict()
    assert all(torch.equal(own[k], v) for k, v in state.items() if k != "quantize.codebook_used")
    assert not own["quantize.codebook_used"].any()  # ours counts usage; theirs is not read
    # the component's `weights` (ComponentSpec.weights) goes through the same loader; no usage record needed
    del state["quantize.codebook_used"]
    torch.save({"model": state}, tmp_path / "without_usage.pt")
    fresh = omnicore.create("image_tokenizer", "vqgan", **LLAMAGEN_TINY)
    load_component_weights(fresh, {"weights": str(tmp_path / "without_usage.pt")}, "model.image_tokenizer")
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())


def test_llamagen_vq_missing_unexpected_misshapen_tensors_are_named(tmp_path):
    cases = {
        "missing tensor 'decoder.conv_out.bias'": lambda s: s.pop("decoder.conv_out.bias"),
        "unexpected tensor 'encoder.extra.weight'": lambda s: s.__setitem__("encoder.extra.weight", torch.zeros(2)),
        "shape mismatch for 'quantize.embedding.weight'":
            lambda s: s.__setitem__("quantize.embedding.weight", torch.zeros(32, 8)),
    }
    for i, (message, damage) in enumerate(cases.items()):
        path = tmp_path / f"vq{i}.pt"
        llamagen_file(path, damage)
        with pytest.raises(CheckpointError) as info:
            omnicore.create("image_tokenizer", "vqgan", **LLAMAGEN_TINY, weights=str(path))
        text = one_line_error(info)
        assert text.startswith(f"{path}: image_tokenizer vqgan: ") and message in text, text


# --- timm / open_clip vision files ----------------------------------------------------------------------------------
def timm_state(name: str, seed: int, **kw) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    enc = omnicore.create("encoder", name, size="tiny", **kw)
    return {k: torch.randn_like(v) for k, v in enc.model.state_dict().items()}


def save_dino(path: Path, state: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def save_open_clip(path: Path, trunk: dict[str, torch.Tensor]) -> Path:
    """open_clip's layout: the timm trunk under visual.trunk., the text tower and logit scale/bias beside it."""
    state = {f"visual.trunk.{k}": v for k, v in trunk.items()}
    state.update({"text.token_embedding.weight": torch.randn(10, 8), "text.positional_embedding": torch.randn(4, 8),
                  "logit_scale": torch.tensor(2.3), "logit_bias": torch.tensor(-10.0)})
    torch.save(state, path)
    return path


def test_dinov2_timm_names_load_with_pos_embed_resampled_by_timm(tmp_path):
    from timm.models.vision_transformer import checkpoint_filter_fn

    state = timm_state("dinov2", 4, image_size=84)  # a 6x6 grid, as 518 px is 37x37
    path = save_dino(tmp_path / "dinov2.safetensors", state)
    enc = omnicore.create("encoder", "dinov2", size="tiny", weights=str(path))  # 56 px: 4x4
    own = enc.model.state_dict()
    assert state["pos_embed"].shape == (1, 36, 32) and own["pos_embed"].shape == (1, 16, 32)
    expected = checkpoint_filter_fn({k: v.clone() for k, v in state.items()}, enc.model)
    assert torch.equal(own["pos_embed"], expected["pos_embed"])  # timm's own bicubic resampling
    assert all(torch.equal(own[k], v) for k, v in state.items() if k != "pos_embed")
    assert set(own) == set(state) and enc.load_report.complete


def test_siglip_open_clip_file_loads_through_timms_filter(tmp_path):
    trunk = timm_state("siglip", 5)
    path = save_open_clip(tmp_path / "open_clip_pytorch_model.bin", trunk)
    enc = omnicore.create("encoder", "siglip", size="tiny", weights=str(path))
    own = enc.model.state_dict()
    assert set(own) == set(trunk) and all(torch.equal(own[k], v) for k, v in trunk.items())


@pytest.mark.parametrize("layout", ["dinov2", "open_clip"])
def test_vision_missing_unexpected_misshapen_tensors_are_named(tmp_path, layout):
    name = "dinov2" if layout == "dinov2" else "siglip"
    prefix = "" if layout == "dinov2" else "visual.trunk."
    cases = {
        "missing tensor 'blocks.1.mlp.fc2.weight'": lambda s: s.pop(prefix + "blocks.1.mlp.fc2.weight"),
        "unexpected tensor 'extra.weight'": lambda s: s.__setitem__(prefix + "extra.weight", torch.zeros(2)),
        "shape mismatch for 'blocks.0.attn.qkv.weight'":
            lambda s: s.__setitem__(prefix + "blocks.0.attn.qkv.weight", torch.zeros(5, 5)),
    }
    for i, (message, damage) in enumerate(cases.items()):
        trunk = timm_state(name, 6)
        if layout == "dinov2":
            damage(trunk)
            path = save_dino(tmp_path / f"w{i}.safetensors", trunk)
        else:
            trunk = {prefix + k: v for k, v in trunk.items()}
            damage(trunk)
            path = save_open_clip(tmp_path / f"w{i}.bin", {k[len(prefix):]: v for k, v in trunk.items()})
        with pytest.raises(CheckpointError) as info:
            omnicore.create("encoder", name, size="tiny", weights=str(path))
        text = one_line_error(info)
        assert text.startswith(f"{path}: encoder {name}") and message in text, text
