"""Importing a released mmMamba checkpoint (``mmMamba_chat``): a tiny release is written here in its key layout
(HoVLE's holistic embedding under ``embedding_model.*``, the language model under ``language_model.*``, packed
``wvkqgdt`` mixers, hybrid layers as InternLM2 ``wqkv``/``wo``) with random weights, imported, and its forward on an
image and a question compared with a reference written below in plain torch from what HoVLE and mmMamba compute:
patch convolution plus positions, HoVLE's pixel shuffle, the MLP, image features in the ``<IMG_CONTEXT>`` slots,
the embedding layers then the language model's layers (no norm between), the final norm and the output."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import omnicore
from omnicore.errors import CheckpointError, OmnicoreError

sys.path.insert(0, str(Path(__file__).parent))
from test_transformer_backbone import write_tokenizer  # noqa: E402

D, H, HKV, HD, FF = 32, 4, 2, 8, 64  # width, heads, kv heads, head dim, MLP width
G = H // HKV
N_EMB, N_LLM = 2, 2
PATCH, IMAGE = 14, 56  # a 4x4 patch grid -> 4 image slots
TEXT_ROWS = 258  # llm_text_embeddings' rows; the tokenizer's later ids come from special_text_embeddings
EPS = 1e-5
THETA = 1000.0
SYSTEM = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def llm_config() -> dict:
    return {"hidden_size": D, "num_hidden_layers": N_LLM, "num_attention_heads": H, "num_key_value_heads": HKV,
            "intermediate_size": FF, "rms_norm_eps": EPS, "rope_theta": THETA, "max_position_embeddings": 256,
            "hidden_act": "silu"}


def release_config(hybrid: list[int], position_image: int = IMAGE, **extra) -> dict:
    emb = {"hidden_size": D, "num_hidden_layers": N_EMB, "num_attention_heads": H, "num_key_value_heads": HKV,
           "intermediate_size": FF, "rms_norm_eps": EPS, "rope_theta": THETA, "hidden_act": "silu",
           "image_size": position_image, "patch_size": PATCH, "downsample_ratio": 0.5, "pixel_shuffle_loc": "pre",
           "use_pixel_shuffle_proj": True, "llm_hidden_size": D, "llm_vocab_size": TEXT_ROWS,
           "layers_block_type": ["mha" if i in hybrid else "mamba2" for i in range(N_EMB)]}
    llm = {**llm_config(), "layers_block_type": ["mha" if N_EMB + i in hybrid else "mamba2" for i in range(N_LLM)]}
    return {"model_type": "mmMamba_chat", "embedding_config": emb, "llm_config": llm, "template": "internlm2-chat",
            "downsample_ratio": 0.5, "force_image_size": IMAGE, "dynamic_image_size": True, "max_dynamic_patch": 12,
            "use_thumbnail": True, "normalize_encoder_output": False, **extra}


def release_tensors(hybrid: list[int], vocab: int, position_grid: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the release's names (global layer index: embedding i -> i, language i -> N_EMB + i)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.2):
        return std * torch.randn(*shape, generator=g)

    def norm(n):
        return 0.5 + torch.rand(n, generator=g)

    t = {"embedding_model.vision_embeddings.patch_embedding.weight": rnd(D, 3, PATCH, PATCH, std=0.05),
         "embedding_model.vision_embeddings.patch_embedding.bias": rnd(D),
         "embedding_model.vision_embeddings.position_embedding": rnd(1, position_grid ** 2 + 1, D),
         "embedding_model.vision_embeddings.class_embedding": rnd(1, 1, D),
         "embedding_model.pixel_shuffle_proj.0.weight": rnd(D, 4 * D),
         "embedding_model.pixel_shuffle_proj.0.bias": rnd(D),
         "embedding_model.pixel_shuffle_proj.2.weight": rnd(D, D),
         "embedding_model.pixel_shuffle_proj.2.bias": rnd(D),
         "embedding_model.llm_text_embeddings.weight": rnd(TEXT_ROWS, D, std=1.0),
         "embedding_model.special_text_embeddings.weight": rnd(vocab + 2 - TEXT_ROWS, D, std=1.0),
         "language_model.model.tok_embeddings.weight": rnd(vocab + 2, D),  # never read by HoVLE
         "language_model.model.norm.weight": norm(D), "language_model.output.weight": rnd(vocab + 2, D)}
    for i in range(N_EMB + N_LLM):
        p = f"embedding_model.encoder.{i}." if i < N_EMB else f"language_model.model.layers.{i - N_EMB}."
        t.update({p + "attention_norm.weight": norm(D), p + "ffn_norm.weight": norm(D),
                  p + "feed_forward.w1.weight": rnd(FF, D), p + "feed_forward.w3.weight": rnd(FF, D),
                  p + "feed_forward.w2.weight": rnd(D, FF)})
        if i in hybrid:
            t.update({p + "attention.wqkv.weight": rnd((H + 2 * HKV) * HD, D),
                      p + "attention.wo.weight": rnd(D, H * HD)})
        else:
            conv = HKV * HD * 2 + H * HD
            t.update({p + "attention.wvkqgdt.weight": rnd(2 * HKV * HD + 2 * H * HD + H, D),
                      p + "attention.conv1d.weight": rnd(conv, 1, 2, std=0.5), p + "attention.conv1d.bias": rnd(conv),
                      p + "attention.g_norm_swish_gate.weight": norm(HD),
                      p + "attention.dt_bias": rnd(H, std=0.5), p + "attention.A_log_bias": rnd(H, std=0.5),
                      p + "attention.o_proj.weight": rnd(D, H * HD)})
    return t


def write_release(directory: Path, tensors: dict[str, torch.Tensor], config: dict, tokenizer: Path) -> Path:
    """Two shards and an index, config.json, tokenizer.json."""
    directory.mkdir(parents=True)
    keys = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, names in halves.items():
        save_file({k: tensors[k].contiguous() for k in names}, str(directory / name))
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: name for name, names in halves.items() for k in names}}))
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "tokenizer.json").write_bytes(tokenizer.read_bytes())
    return directory


# ---- the reference: plain torch ops ---------------------------------------------------------------------------
def rms(x, w, eps=EPS):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def image_features(t: dict, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) -> (B, slots, D): conv, positions (class row skipped, resized bicubic), pixel shuffle, MLP."""
    v = "embedding_model.vision_embeddings."
    x = F.conv2d(pixels, t[v + "patch_embedding.weight"], t[v + "patch_embedding.bias"], stride=PATCH)
    n, c, gh, gw = x.shape
    x = x.flatten(2).transpose(1, 2)
    table = t[v + "position_embedding"][:, 1:]
    pg = int(math.isqrt(table.shape[1]))
    if pg != gh:
        table = F.interpolate(table.reshape(1, pg, pg, c).permute(0, 3, 1, 2), size=(gh, gw), mode="bicubic",
                              align_corners=False).reshape(1, c, gh * gw).permute(0, 2, 1)
    x = x + table
    # HoVLE's pixel shuffle, scale 0.5, step by step
    n, l, c = x.shape
    h = w = int(l ** 0.5)
    x = x.reshape(n, w, h // 2, c * 2).permute(0, 2, 1, 3)
    x = x.reshape(n, h // 2, w // 2, c * 4).permute(0, 2, 1, 3).reshape(n, l // 4, c * 4)
    p = "embedding_model.pixel_shuffle_proj."
    x = F.gelu(F.linear(x, t[p + "0.weight"], t[p + "0.bias"]))
    return F.linear(x, t[p + "2.weight"], t[p + "2.bias"])


def mixer(t: dict, p: str, u: torch.Tensor) -> torch.Tensor:
    """mmMamba's layer on (L, D): [v,k,q] -> causal conv (width 2) -> silu; kv heads repeated; SSM recurrence with
    x=v, B=k, C=q, dt = softplus(dt_proj(u) + dt_bias), A = -exp(A_log_bias); per-head RMSNorm then silu gate."""
    L = u.shape[0]
    wv, wk, wq, wg, wdt = torch.split(t[p + "wvkqgdt.weight"], [HKV * HD, HKV * HD, H * HD, H * HD, H])
    xbc = torch.cat([u @ wv.T, u @ wk.T, u @ wq.T], -1)
    w, b = t[p + "conv1d.weight"][:, 0], t[p + "conv1d.bias"]
    prev = torch.cat([torch.zeros_like(xbc[:1]), xbc[:-1]])
    y = F.silu(prev * w[:, 0] + xbc * w[:, 1] + b)
    v, k, q = torch.split(y, [HKV * HD, HKV * HD, H * HD], -1)
    v = v.view(L, HKV, HD).repeat_interleave(G, 1)
    k = k.view(L, HKV, HD).repeat_interleave(G, 1)
    q = q.view(L, H, HD)
    dt = F.softplus(u @ wdt.T + t[p + "dt_bias"])
    a = -torch.exp(t[p + "A_log_bias"])
    state = torch.zeros(H, HD, HD)
    out = []
    for s in range(L):
        state = torch.exp(dt[s] * a)[:, None, None] * state + dt[s][:, None, None] * v[s][:, :, None] * k[s][:, None, :]
        out.append((state @ q[s][:, :, None])[..., 0])
    y = rms(torch.stack(out), t[p + "g_norm_swish_gate.weight"], 1e-5) * F.silu(u @ wg.T).view(L, H, HD)
    return y.reshape(L, H * HD) @ t[p + "o_proj.weight"].T


def attention(t: dict, p: str, u: torch.Tensor) -> torch.Tensor:
    """InternLM2 attention on (L, D): wqkv as (kv head, [G queries, k, v], d), RoPE (rotate half), causal softmax."""
    L = u.shape[0]
    qkv = (u @ t[p + "wqkv.weight"].T).view(L, HKV, G + 2, HD)
    q, k, v = qkv[:, :, :G].reshape(L, H, HD), qkv[:, :, G], qkv[:, :, G + 1]
    inv = 1.0 / THETA ** (torch.arange(0, HD, 2).float() / HD)
    freqs = torch.outer(torch.arange(L).float(), inv)
    cos, sin = torch.cat([freqs, freqs], -1).cos()[:, None], torch.cat([freqs, freqs], -1).sin()[:, None]

    def rot(x):
        return torch.cat([-x[..., HD // 2:], x[..., :HD // 2]], -1)

    q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(HD)
    scores = scores.masked_fill(torch.triu(torch.ones(L, L, dtype=torch.bool), 1), float("-inf"))
    out = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(L, H * HD)
    return out @ t[p + "wo.weight"].T


def reference_logits(t: dict, hybrid: list[int], ids: list[int], pixels: torch.Tensor, image_id: int) -> torch.Tensor:
    """HoVLE with mmMamba's layers: (L, vocab) logits of one sequence."""
    table = torch.cat([t["embedding_model.llm_text_embeddings.weight"],
                       t["embedding_model.special_text_embeddings.weight"]])
    ids_t = torch.tensor(ids)
    h = table[ids_t].clone()
    h[ids_t == image_id] = image_features(t, pixels[None])[0]
    for i in range(N_EMB + N_LLM):
        p = f"embedding_model.encoder.{i}." if i < N_EMB else f"language_model.model.layers.{i - N_EMB}."
        u = rms(h, t[p + "attention_norm.weight"])
        h = h + (attention if i in hybrid else mixer)(t, p + "attention.", u)
        x = rms(h, t[p + "ffn_norm.weight"])
        h = h + F.silu(x @ t[p + "feed_forward.w1.weight"].T) * (x @ t[p + "feed_forward.w3.weight"].T) \
            @ t[p + "feed_forward.w2.weight"].T
    return rms(h, t["language_model.model.norm.weight"]) @ t["language_model.output.weight"].T


def pixels_of(image) -> torch.Tensor:
    """One tile: resized to IMAGE px (bicubic), [0, 1], ImageNet mean/std."""
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode

    return T.Compose([T.Resize((IMAGE, IMAGE), interpolation=InterpolationMode.BICUBIC), T.ToTensor(),
                      T.Normalize(MEAN, STD)])(image)


def prompt(question: str, slots: int) -> str:
    return (f"<|im_start|>system\n{SYSTEM}<|im_end|><|im_start|>user\n<img>" + "<IMG_CONTEXT>" * slots
            + f"</img>\n{question}<|im_end|><|im_start|>assistant\n")


def an_image():
    from PIL import Image

    g = torch.Generator().manual_seed(3)
    return Image.fromarray((torch.rand(48, 64, 3, generator=g) * 255).to(torch.uint8).numpy())


@pytest.fixture()
def tokenizer(tmp_path) -> Path:
    return write_tokenizer(tmp_path / "tok" / "tokenizer.json")


def _release(tmp_path: Path, tokenizer: Path, hybrid: list[int], position_grid: int = IMAGE // PATCH, **extra):
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(tokenizer)).get_vocab_size()
    tensors = release_tensors(hybrid, vocab, position_grid)
    config = release_config(hybrid, position_image=position_grid * PATCH, **extra)
    return write_release(tmp_path / "release", tensors, config, tokenizer), tensors


def assert_structure_reads_requests_as(model, directory) -> None:
    """``omni serve``'s HTTP side reads requests with the model built without weights: same prompt ids, image
    transform and sizes as the loaded model."""
    from PIL import Image

    from omnicore.model.unified import load_structure

    shell = load_structure(directory)
    assert next(shell.parameters()).device.type == "meta"
    question = "What is in the picture?"
    assert shell.layout.question_ids(question) == model.layout.question_ids(question)
    assert shell.mmu_prefix_len == model.mmu_prefix_len and shell.image_size == model.image_size
    image = Image.new("RGB", (40, 30), "red")
    assert torch.equal(shell.encoder.image_transform()(image), model.encoder.image_transform()(image))
    assert shell.text_tokenizer.decode(model.layout.question_ids(question)) == \
        model.text_tokenizer.decode(model.layout.question_ids(question))


@pytest.mark.parametrize("hybrid, position_grid", [([], 4), ([1, 3], 2)])
def test_an_mmmamba_release_imports_and_computes_hovle_with_its_layers(hybrid, position_grid, tokenizer, tmp_path):
    """Every tensor lands; logits on an image + question equal the reference; answer() runs and is its greedy."""
    from tokenizers import Tokenizer

    from omnicore.plugins.backbones.transformer.mmmamba_import import convert_mmmamba

    release, t = _release(tmp_path, tokenizer, hybrid, position_grid)
    model = omnicore.load(convert_mmmamba(release, tmp_path / "imported"))
    assert_structure_reads_requests_as(model, tmp_path / "imported")
    info = model.config["imported_from"]
    assert info["not_imported"] == [] and info["unused"] == ["language_model.model.tok_embeddings.weight"]
    assert info["layers"] == {"embedding": N_EMB, "language_model": N_LLM}
    assert model.backbone.hybrid == hybrid and model.backbone.n_layer == N_EMB + N_LLM
    assert model.num_patches == (IMAGE // PATCH // 2) ** 2
    held = sum(v.numel() for v in model.state_dict().values())
    release_values = sum(v.numel() for k, v in t.items() if "tok_embeddings" not in k)
    # the text table and output keep the tokenizer's rows (the release's 2 padding rows dropped); mixers unpacked
    assert held >= release_values - 4 * D

    tok = Tokenizer.from_file(str(tokenizer))
    question = "What colour is the square?"
    ids = tok.encode(prompt(question, model.num_patches), add_special_tokens=False).ids
    image_id = tok.token_to_id("<IMG_CONTEXT>")
    image = an_image()
    pixels = pixels_of(image)
    with torch.no_grad():
        want = reference_logits(t, hybrid, ids, pixels, image_id)
        q_ids = torch.tensor([model.layout.question_ids(question)])
        x = model.mmu_embeddings(pixels[None], None, q_ids, 1)
        got = model.heads["text"].logits(model.backbone(x, task="mmu"))[0]
    assert got.shape[0] == len(ids)  # the layout's head, slots, tail and question are HoVLE's prompt
    real = tok.get_vocab_size()  # the model's rows past the tokenizer file's ids are its own padding
    torch.testing.assert_close(got[:, :real], want[:, :real], rtol=1e-4, atol=1e-4)

    # omnicore.load(...).answer: greedy decoding equals the reference's
    steps = 4
    seq = list(ids)
    stops = {tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")}
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(reference_logits(t, hybrid, seq, pixels, image_id)[-1, :real].argmax())
            if nxt in stops:
                break
            seq.append(nxt)
    want_text = tok.decode(seq[len(ids):], skip_special_tokens=True).strip()
    assert want_text and model.answer([image], [question], max_new_tokens=steps, greedy=True) == [want_text]


def test_the_encoder_refuses_dynamic_tiling():
    with pytest.raises(OmnicoreError, match="only single-tile preprocessing"):
        omnicore.create("encoder", "hovle_patch", width=8, image_size=56, patch_size=14, tiles=2)


def test_a_broken_release_is_named_in_one_line(tokenizer, tmp_path):
    from safetensors.torch import load_file

    from omnicore.plugins.backbones.transformer.mmmamba_import import convert_mmmamba

    release, _ = _release(tmp_path, tokenizer, [])
    index = json.loads((release / "model.safetensors.index.json").read_text())["weight_map"]
    key = "embedding_model.encoder.1.attention.wvkqgdt.weight"
    shard = release / index[key]
    state = load_file(str(shard))
    state[key] = state[key][:-1]  # one dt row short
    save_file(state, str(shard))
    with pytest.raises(CheckpointError, match=r"encoder\.1\.attention: shape mismatch for 'wvkqgdt.weight'"):
        convert_mmmamba(release, tmp_path / "imported")
    config = json.loads((release / "config.json").read_text())
    for change, message in ((lambda c: c["embedding_config"].update(pixel_shuffle_loc="post"),
                             "pixel_shuffle_loc 'post' is not supported"),
                            (lambda c: c.update(normalize_encoder_output=True),
                             "normalize_encoder_output true is not supported"),
                            (lambda c: c.pop("embedding_config"), "no embedding_config"),
                            (lambda c: c.update(model_type="internlm2"), "model_type 'internlm2' is not")):
        broken = json.loads(json.dumps(config))
        change(broken)
        (release / "config.json").write_text(json.dumps(broken))
        with pytest.raises(CheckpointError, match=message) as err:
            convert_mmmamba(release, tmp_path / "imported")
        assert len(str(err.value).splitlines()) == 1


def test_a_missing_image_tensor_is_named(tokenizer, tmp_path):
    from safetensors.torch import load_file

    from omnicore.plugins.backbones.transformer.mmmamba_import import convert_mmmamba

    release, _ = _release(tmp_path, tokenizer, [])
    key = "embedding_model.pixel_shuffle_proj.2.bias"
    shard = release / json.loads((release / "model.safetensors.index.json").read_text())["weight_map"][key]
    state = load_file(str(shard))
    del state[key]
    save_file(state, str(shard))
    with pytest.raises(CheckpointError, match=r"missing tensor 'embedding_model\.pixel_shuffle_proj\.2\.bias'"):
        convert_mmmamba(release, tmp_path / "imported")


def test_omni_convert_mmmamba(tokenizer, tmp_path, capsys):
    """The command line: a release becomes a model directory; a broken one is one line and exit 2."""
    from omnicore.cli.main import main

    release, _ = _release(tmp_path, tokenizer, [2])
    assert main(["convert", "mmmamba", str(release), "--out", str(tmp_path / "imported")]) == 0
    assert omnicore.load(tmp_path / "imported").backbone.hybrid == [2]
    config = json.loads((release / "config.json").read_text())
    (release / "config.json").write_text(json.dumps({**config, "model_type": "internlm2"}))
    assert main(["convert", "mmmamba", str(release), "--out", str(tmp_path / "again")]) == 2
    err = capsys.readouterr().err.strip()
    assert "is not 'mmMamba_chat'" in err and len(err.splitlines()) == 1 and not (tmp_path / "again").exists()
