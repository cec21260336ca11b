"""The ``transformer`` backbone: Llama, Qwen2 and InternLM2 directories (written here: random weights, safetensors,
config.json) load strictly and compute what transformers (or, for InternLM2, a plain-torch reading of its packed
layout) computes; left padding and the KV cache leave real rows unchanged; a tiny Transformer VLM trains and answers
through the ordinary MMU stage with the InternVL layout."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from safetensors.torch import save_file

import omnicore
from omnicore.errors import CheckpointError, OmnicoreError
from omnicore.runner import _load_init_weights, run_recipe

HF_VOCAB = 264  # the directory's embedding rows: the test tokenizer's 262 ids and 2 padding rows
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>"]


def write_tokenizer(path: Path) -> Path:
    """A byte-level tokenizer.json (every byte one token, no merges) with InternVL's special tokens added."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def base_config(model_type: str, **extra) -> dict:
    """A tiny config.json as the hub's files write it (legacy rope_theta at the top level)."""
    return {"model_type": model_type, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "intermediate_size": 64, "vocab_size": HF_VOCAB, "rms_norm_eps": 1e-5,
            "rope_theta": 1000.0, "max_position_embeddings": 128, "hidden_act": "silu", **extra}


def randomize(module: torch.nn.Module, seed: int, std: float = 0.08) -> None:
    """Every weight random, norms around 1 (all-ones norms would hide a swapped norm)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))


def hf_reference(model_type: str, config: dict, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cls, cfg_cls = (Qwen2ForCausalLM, Qwen2Config) if model_type == "qwen2" else (LlamaForCausalLM, LlamaConfig)
    cfg = cfg_cls.from_dict({**config, "model_type": model_type})
    cfg._attn_implementation = "eager"
    model = cls(cfg).eval()
    randomize(model, seed)
    return model


def save_dir(directory: Path, config: dict, state: dict[str, torch.Tensor], shards: int = 1) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    state = {k: v.detach().contiguous().clone() for k, v in state.items()}
    if shards == 1:
        save_file(state, str(directory / "model.safetensors"))
        return directory
    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[i::shards]}
        save_file(part, str(directory / name))
        weight_map.update({k: name for k in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def loaded(directory: Path, tied_head: bool = False):
    """Backbone from the directory's config.json, weights and token tables loaded (as a stage's init_from)."""
    backbone = omnicore.create("backbone", "transformer", config_dir=str(directory))
    head = omnicore.create("head", "text_vocab" if tied_head else "text_lm", vocab_size=272, d_model=32)
    backbone.load_hf_directory(directory, head)
    return backbone.eval(), head.eval()


def our_logits(backbone, head, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return head.logits(backbone(head.embed(ids)))


IDS = torch.tensor([[5, 17, 200, 3, 99, 42, 7, 250, 1], [9, 8, 7, 6, 5, 4, 3, 2, 1]])


# --- directories against transformers ------------------------------------------------------------------------------
def test_llama_directory_computes_transformers_logits(tmp_path):
    config = base_config("llama", tie_word_embeddings=False)
    ref = hf_reference("llama", config)
    directory = save_dir(tmp_path / "llama", config, ref.state_dict())
    backbone, head = loaded(directory)
    assert type(backbone.layers[1].self_attn).__name__ == "LlamaAttention"
    with torch.no_grad():
        expected = ref(IDS).logits
    got = our_logits(backbone, head, IDS)
    torch.testing.assert_close(got[..., :HF_VOCAB], expected, atol=1e-5, rtol=1e-4)
    # the tokenizer's added rows start at the mean of the file's rows, in the embedding and the LM head
    torch.testing.assert_close(head.embedding.weight[HF_VOCAB:], ref.model.embed_tokens.weight.mean(0).expand(8, -1))
    torch.testing.assert_close(head.lm_head.weight[HF_VOCAB:], ref.lm_head.weight.mean(0).expand(8, -1))


def test_qwen2_sharded_tied_directory_computes_transformers_logits(tmp_path):
    config = base_config("qwen2", tie_word_embeddings=True)
    ref = hf_reference("qwen2", config, seed=1)
    state = {k: v for k, v in ref.state_dict().items() if k != "lm_head.weight"}  # tied: stored once
    directory = save_dir(tmp_path / "qwen2", config, state, shards=3)
    assert ref.model.layers[0].self_attn.q_proj.bias.abs().sum() > 0  # the biases are real, and loaded
    for tied_head in (True, False):
        backbone, head = loaded(directory, tied_head=tied_head)
        assert type(backbone.layers[0].self_attn).__name__ == "Qwen2Attention"
        with torch.no_grad():
            expected = ref(IDS).logits
        torch.testing.assert_close(our_logits(backbone, head, IDS)[..., :HF_VOCAB], expected, atol=1e-5, rtol=1e-4)


def pack_wqkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, kv_heads: int) -> torch.Tensor:
    """InternLM2's layout, written out: for each kv head h, its G query heads' rows, then its k rows, then v."""
    d = q.shape[0] // heads
    g = heads // kv_heads
    rows = []
    for h in range(kv_heads):
        rows += [q[(h * g + j) * d:(h * g + j + 1) * d] for j in range(g)]
        rows += [k[h * d:(h + 1) * d], v[h * d:(h + 1) * d]]
    return torch.cat(rows)


def internlm2_from_llama(llama) -> dict[str, torch.Tensor]:
    sd = llama.state_dict()
    out = {"model.tok_embeddings.weight": sd["model.embed_tokens.weight"], "output.weight": sd["lm_head.weight"],
           "model.norm.weight": sd["model.norm.weight"]}
    for i in range(llama.config.num_hidden_layers):
        p, o = f"model.layers.{i}.", f"model.layers.{i}."
        out[o + "attention.wqkv.weight"] = pack_wqkv(sd[p + "self_attn.q_proj.weight"],
                                                     sd[p + "self_attn.k_proj.weight"],
                                                     sd[p + "self_attn.v_proj.weight"], 4, 2)
        out[o + "attention.wo.weight"] = sd[p + "self_attn.o_proj.weight"]
        out[o + "feed_forward.w1.weight"] = sd[p + "mlp.gate_proj.weight"]
        out[o + "feed_forward.w3.weight"] = sd[p + "mlp.up_proj.weight"]
        out[o + "feed_forward.w2.weight"] = sd[p + "mlp.down_proj.weight"]
        out[o + "attention_norm.weight"] = sd[p + "input_layernorm.weight"]
        out[o + "ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
    return out


def internlm2_reference(state: dict[str, torch.Tensor], ids: torch.Tensor, heads=4, kv_heads=2, theta=1e6,
                        eps=1e-5) -> torch.Tensor:
    """InternLM2's forward in plain float64 torch, straight from the packed file's tensors."""
    sd = {k: v.double() for k, v in state.items()}
    x = sd["model.tok_embeddings.weight"][ids]
    b, n, dim = x.shape
    d, g = dim // heads, heads // kv_heads

    def rms(t, w):
        return w * t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps)

    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(n, dtype=torch.float64)[:, None] * inv
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)

    def rope(t):  # (b, n, h, d)
        half = torch.cat([-t[..., d // 2:], t[..., : d // 2]], -1)
        return t * cos[:, None] + half * sin[:, None]

    causal = torch.ones(n, n, dtype=torch.bool).tril()
    for i in range(2):
        p = f"model.layers.{i}."
        h = rms(x, sd[p + "attention_norm.weight"])
        qkv = (h @ sd[p + "attention.wqkv.weight"].T).view(b, n, kv_heads, g + 2, d)
        q = rope(qkv[..., :g, :].reshape(b, n, heads, d))
        k = rope(qkv[..., g, :]).repeat_interleave(g, dim=2)
        v = qkv[..., g + 1, :].repeat_interleave(g, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
        att = torch.einsum("bhqk,bkhd->bqhd", scores.masked_fill(~causal, -math.inf).softmax(-1), v)
        x = x + att.reshape(b, n, dim) @ sd[p + "attention.wo.weight"].T
        h = rms(x, sd[p + "ffn_norm.weight"])
        x = x + (F.silu(h @ sd[p + "feed_forward.w1.weight"].T) * (h @ sd[p + "feed_forward.w3.weight"].T)) \
            @ sd[p + "feed_forward.w2.weight"].T
    return rms(x, sd["model.norm.weight"]) @ sd["output.weight"].T


def test_internlm2_packed_directory_equals_llama_and_a_plain_reading(tmp_path):
    llama_config = base_config("llama", rope_theta=1e6)
    ref = hf_reference("llama", llama_config, seed=2)
    config = {k: v for k, v in llama_config.items() if k != "model_type"} | {
        "model_type": "internlm2", "architectures": ["InternLM2ForCausalLM"], "bias": False}
    state = internlm2_from_llama(ref)
    directory = save_dir(tmp_path / "internlm2", config, state)
    backbone, head = loaded(directory)
    got = our_logits(backbone, head, IDS)[..., :HF_VOCAB]
    with torch.no_grad():
        torch.testing.assert_close(got, ref(IDS).logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.double(), internlm2_reference(state, IDS), atol=1e-4, rtol=1e-4)
    # the plugin's own packing helpers agree with the layout written out above
    from omnicore.plugins.backbones.transformer import pack_internlm2_qkv, unpack_internlm2_qkv

    wqkv = state["model.layers.1.attention.wqkv.weight"]
    q, k, v = unpack_internlm2_qkv(wqkv, 4, 2, 8)
    assert torch.equal(q, ref.model.layers[1].self_attn.q_proj.weight)
    assert torch.equal(pack_internlm2_qkv(q, k, v, 4, 2, 8), wqkv)


# --- strict loading ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    config = base_config("llama")
    ref = hf_reference("llama", config, seed=3)
    return save_dir(tmp_path_factory.mktemp("hf") / "llama", config, ref.state_dict()), config, ref.state_dict()


@pytest.mark.parametrize("edit, fragment", [
    (lambda s: s.pop("model.layers.1.mlp.up_proj.weight"), "missing tensor 'model.layers.1.mlp.up_proj.weight'"),
    (lambda s: s.__setitem__("model.layers.0.self_attn.k_proj.weight", torch.zeros(8, 32)),
     "shape mismatch for 'model.layers.0.self_attn.k_proj.weight': file (8, 32) vs model (16, 32)"),
    (lambda s: s.__setitem__("model.layers.0.self_attn.q_norm.weight", torch.ones(8)),
     "unexpected tensor 'model.layers.0.self_attn.q_norm.weight'"),
    (lambda s: s.pop("lm_head.weight"), "missing tensor 'lm_head.weight' (tie_word_embeddings is false)"),
])
def test_a_missing_misshapen_or_unexpected_tensor_is_named(llama_dir, tmp_path, edit, fragment):
    _, config, state = llama_dir
    state = dict(state)
    edit(state)
    directory = save_dir(tmp_path / "bad", config, state)
    backbone = omnicore.create("backbone", "transformer", config_dir=str(directory))
    with pytest.raises(CheckpointError) as info:
        backbone.load_hf_directory(directory, omnicore.create("head", "text_lm", vocab_size=272, d_model=32))
    message = str(info.value)
    assert fragment in message and str(directory) in message and "\n" not in message


def test_a_shard_missing_a_tensor_its_index_names_is_an_error(llama_dir, tmp_path):
    _, config, state = llama_dir
    directory = save_dir(tmp_path / "sharded", config, state, shards=2)
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.extra.weight"] = next(iter(index["weight_map"].values()))
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    backbone = omnicore.create("backbone", "transformer", config_dir=str(directory))
    with pytest.raises(CheckpointError, match="missing tensor 'model.extra.weight', which model.safetensors.index"):
        backbone.load_hf_directory(directory)


def test_a_directory_of_another_architecture_names_the_field(llama_dir):
    directory, config, _ = llama_dir
    other = omnicore.create("backbone", "transformer", d_model=32, n_layer=2, n_head=4, n_kv_head=2,
                            d_intermediate=64, rope_theta=10000.0, rms_norm_eps=1e-5)
    with pytest.raises(CheckpointError, match=r"config.json: rope is \{.*'rope_theta': 1000.0.*\} there"):
        other.load_hf_directory(directory)
    with pytest.raises(OmnicoreError, match="give config_dir or the architecture"):
        omnicore.create("backbone", "transformer", config_dir=str(directory), n_layer=1)
    with pytest.raises(OmnicoreError, match="model_type 'mamba' is not a decoder"):
        bad = directory.parent / "mamba"
        bad.mkdir()
        (bad / "config.json").write_text(json.dumps({"model_type": "mamba"}))
        omnicore.create("backbone", "transformer", config_dir=str(bad))


# --- padding and the KV cache --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_backbone():
    torch.manual_seed(0)
    backbone = omnicore.create("backbone", "transformer", d_model=32, n_layer=2, n_head=4, n_kv_head=2,
                               d_intermediate=64)
    randomize(backbone, 4)
    return backbone.eval()


def test_left_padding_leaves_real_rows_unchanged_with_and_without_a_state(tiny_backbone):
    torch.manual_seed(1)
    rows = [torch.randn(7, 32), torch.randn(4, 32)]
    x = torch.zeros(2, 7, 32)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    for i, r in enumerate(rows):
        x[i, 7 - len(r):], mask[i, 7 - len(r):] = r, True
    with torch.no_grad():
        alone = [tiny_backbone(r[None])[0] for r in rows]
        padded = tiny_backbone(x, mask=mask)
        state = tiny_backbone.allocate_inference_state(2, 16)
        prefill = tiny_backbone(x, state=state, mask=mask)
        step_in = torch.randn(2, 1, 32)
        step = tiny_backbone(step_in, state=state)
        alone_step = [tiny_backbone(torch.cat([r, step_in[i]])[None])[0, -1] for i, r in enumerate(rows)]
    for i, r in enumerate(rows):
        torch.testing.assert_close(padded[i, 7 - len(r):], alone[i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(prefill[i, 7 - len(r):], alone[i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(step[i, 0], alone_step[i], atol=1e-5, rtol=1e-5)
    assert state.seqlen_offset == 8 and state.positions.tolist() == [8, 5]


def test_prefill_then_steps_equal_one_full_forward(tiny_backbone):
    torch.manual_seed(2)
    x = torch.randn(2, 10, 32)
    with torch.no_grad():
        full = tiny_backbone(x)
        state = tiny_backbone.allocate_inference_state(2, 16)
        parts = [tiny_backbone(x[:, :6], state=state)]
        parts += [tiny_backbone(x[:, t:t + 1], state=state) for t in range(6, 10)]
        torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
        state.reset()  # a new sequence from the same state
        torch.testing.assert_close(tiny_backbone(x[:, :6], state=state), full[:, :6], atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="exceeds the state's max_seqlen"):
            tiny_backbone(torch.randn(2, 11, 32), state=state)


# --- a tiny Transformer VLM, end to end -----------------------------------------------------------------------------
def vlm_spec(tokenizer: Path, **backbone) -> dict:
    return {"image_size": 32, "max_text_tokens": 64, "mmu_template": "internvl",
            "encoder": {"type": "timm_vit", "params": {
                "model_name": "vit_tiny_patch16_224", "image_size": 32,
                "model_kwargs": {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}}},
            "projector": {"type": "mlp_gelu"},
            "text_tokenizer": {"type": "hf_tokenizer", "params": {"path": str(tokenizer)}},
            "backbone": {"type": "transformer", "params": backbone or {
                "d_model": 64, "n_layer": 2, "n_head": 4, "n_kv_head": 2, "d_intermediate": 128}},
            "heads": {"text": {"type": "text_lm"}}}


def test_batched_left_padded_generation_equals_one_by_one(tmp_path):
    from omnicore.generation.engine import generate_text
    from omnicore.generation.sampling import Sampling

    torch.manual_seed(0)
    model = omnicore.build(vlm_spec(write_tokenizer(tmp_path / "tok" / "tokenizer.json"))).eval()
    # sharp attention (large weights): what a token attends to, and at which RoPE distance, shows in the argmax
    randomize(model.backbone, 5, std=0.3)
    randomize(model.heads, 6)
    qs = [model.layout.question_ids(q) for q in ("What color is it?", "hi", "Is it a red square?")]
    pixels = torch.rand(3, 3, 32, 32) * 2 - 1
    has = torch.ones(3)
    s = Sampling(greedy=True, max_new_tokens=10, ignore_eos=True)
    batch = generate_text(model, pixels, has, qs, s)
    alone = [generate_text(model, pixels[i:i + 1], has[i:i + 1], [q], s)[0] for i, q in enumerate(qs)]
    assert batch == alone and len({t for row in batch for t in row}) > 10, batch


def test_tiny_transformer_vlm_trains_mmu_with_the_internvl_layout_and_answers(tmp_path):
    tokenizer = write_tokenizer(tmp_path / "tok" / "tokenizer.json")
    recipe = {"seed": 0, "model": vlm_spec(tokenizer), "stages": [{
        "name": "mmu", "steps": 30, "log_every": 10, "optimizer": {"lr": 3.0e-3},
        "tasks": {"mmu": {"batch_size": 16, "data": {"type": "synthetic_shapes",
                                                     "params": {"task": "mmu", "size": 512, "image_size": 32}}}},
        "train": {"roles": ["encoder", "projector", "backbone", "heads.text"]}}]}
    path = tmp_path / "teacher.yaml"
    import yaml

    path.write_text(yaml.safe_dump(recipe))
    run = run_recipe(str(path), [], run_dir=tmp_path / "run", console=Console(file=open(os.devnull, "w")))
    records = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    losses = [r["loss_mmu"] for r in records if "loss_mmu" in r]
    assert len(losses) == 3 and losses[-1] < 0.7 * losses[0], losses
    model = omnicore.load(run / "model")
    layout = model.layout
    assert model.config["model"]["mmu_template"] == "internvl"
    assert model.mmu_prefix_len == len(layout.mmu_head_ids) + model.num_patches + len(layout.mmu_tail_ids)
    ds = omnicore.create("dataset", "synthetic_shapes", task="mmu", size=4, image_size=32)
    samples = [ds[i] for i in range(4)]
    answers = model.answer([s["image"] for s in samples], [s["turns"][0]["question"] for s in samples],
                           max_new_tokens=8)
    assert all(isinstance(a, str) and a for a in answers)
    streamed = "".join(model.stream_answer(samples[0]["image"], samples[0]["turns"][0]["question"], max_new_tokens=8))
    assert streamed.strip() == answers[0]


def test_init_from_a_hugging_face_directory_loads_backbone_and_text_head(tmp_path):
    config = base_config("llama", tie_word_embeddings=False)
    ref = hf_reference("llama", config, seed=6)
    directory = save_dir(tmp_path / "teacher", config, ref.state_dict())
    write_tokenizer(directory / "tokenizer.json")
    spec = vlm_spec(directory / "tokenizer.json", config_dir=str(directory))
    model = omnicore.build(spec).eval()
    _load_init_weights(model, str(directory), "stages.s.init_from")
    with torch.no_grad():
        got = model.heads["text"].logits(model.backbone(model.text_embed(IDS)))
        torch.testing.assert_close(got[..., :HF_VOCAB], ref(IDS).logits, atol=1e-5, rtol=1e-4)
    mamba = omnicore.build({**spec, "backbone": {"type": "mamba2", "params": {"size": "tiny", "d_model": 32}}})
    with pytest.raises(OmnicoreError, match="Hugging Face model directory \\(model_type 'llama'\\); the model's "
                                            "backbone cannot load one"):
        _load_init_weights(mamba, str(directory), "stages.s.init_from")
    tied = omnicore.build({**spec, "heads": {"text": {"type": "text_vocab"}}})
    with pytest.raises(CheckpointError, match="'lm_head.weight' differs from 'model.embed_tokens.weight'"):
        _load_init_weights(tied, str(directory), "stages.s.init_from")


@pytest.mark.parametrize("keys", [7, 1024, 2500])
def test_one_token_attention_over_a_cache_is_grouped_query_attention(keys):
    """The decode step's attention (grouped product, the cache split in blocks of keys) equals scaled dot-product
    attention over the cache with kv heads repeated, masked keys left out, on both sides of a block boundary."""
    from omnicore.plugins.backbones.transformer.attention import _one_token_attention

    g = torch.Generator().manual_seed(keys)
    q = torch.randn(2, 8, 1, 16, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 4, keys, 16, generator=g, dtype=torch.float64) for _ in range(2))
    allowed = torch.rand(2, 1, 1, keys, generator=g) < 0.6
    allowed[..., 0] = True
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1), attn_mask=allowed, scale=0.25)[:, :, 0]
    got = _one_token_attention(q, k, v, allowed, 0.25)
    assert got.shape == (2, 8, 16)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
