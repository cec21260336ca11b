"""Decoupled vocabularies: tied text and image heads, caption MLP, position tables."""

from __future__ import annotations

import pytest
import torch

import omnicore
from omnicore.errors import OmnicoreError, ParamError


def test_text_head_scores_only_text_vocab_and_is_tied():
    head = omnicore.create("head", "text_vocab", vocab_size=50, d_model=16)
    assert [n for n, _ in head.named_parameters()] == ["embedding.weight"]  # one table, no separate head
    ids = torch.tensor([[1, 2, 49]])
    e = head.embed(ids)
    assert e.shape == (1, 3, 16)
    h = torch.randn(2, 4, 16, requires_grad=True)
    logits = head.logits(h)
    assert logits.shape == (2, 4, 50)
    torch.testing.assert_close(logits, h @ head.embedding.weight.T)
    logits.sum().backward()
    assert head.embedding.weight.grad is not None and head.embedding.weight.grad.abs().sum() > 0
    torch.testing.assert_close(head.embedding.weight.grad, h.detach().sum((0, 1)).expand(50, 16))
    assert 0.015 < float(head.embedding.weight.detach().std()) < 0.025
    with torch.no_grad():  # tied: editing the table changes the scores
        head.embedding.weight[7] = 0
    assert torch.all(head.logits(h.detach())[..., 7] == 0)


def test_image_head_scores_only_codebook_and_is_tied():
    head = omnicore.create("head", "image_vocab", codebook_size=64, d_model=16)
    assert head.embedding.weight.shape == (64, 16) and head.head_proj is None
    linears = [m for m in head.proj if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(16, 64), (64, 16), (16, 16)]  # OmniMamba's fused MLP
    codes = torch.randint(0, 64, (2, 9))
    assert head.embed(codes).shape == (2, 9, 16)
    h = torch.randn(2, 9, 16)
    logits = head.logits(h)
    assert logits.shape == (2, 9, 64)
    torch.testing.assert_close(logits, h @ head.embedding.weight.T)
    head.zero_grad()
    head.logits(h).sum().backward()
    assert head.embedding.weight.grad.abs().sum() > 0  # the head's gradient lands in the image table
    assert all(p.grad is None for n, p in head.named_parameters() if n.startswith("proj."))


def test_image_head_with_narrow_table():
    head = omnicore.create("head", "image_vocab", codebook_size=32, d_model=24, embed_dim=8, proj="gelu")
    assert head.embedding.weight.shape == (32, 8) and head.head_proj.weight.shape == (8, 24)
    assert [m.out_features for m in head.proj if isinstance(m, torch.nn.Linear)] == [24, 24]
    assert head.embed(torch.tensor([[0, 31]])).shape == (1, 2, 24)
    h = torch.randn(3, 24)
    logits = head.logits(h)
    assert logits.shape == (3, 32)
    torch.testing.assert_close(logits, head.head_proj(h) @ head.embedding.weight.T)


def test_text_and_image_vocabularies_are_separate():
    text = omnicore.create("head", "text_vocab", vocab_size=40, d_model=16)
    image = omnicore.create("head", "image_vocab", codebook_size=24, d_model=16)
    h = torch.randn(5, 16)
    assert text.logits(h).shape[-1] == 40 and image.logits(h).shape[-1] == 24
    assert not set(map(id, text.parameters())) & set(map(id, image.parameters()))


def test_caption_mlp():
    mlp = omnicore.create("head", "caption_mlp", d_model=16)
    assert [(m.in_features, m.out_features) for m in (mlp.fc1, mlp.fc2)] == [(16, 16), (16, 16)]
    assert mlp.fc1.bias is None and mlp(torch.randn(2, 7, 16)).shape == (2, 7, 16)
    assert omnicore.create("head", "caption_mlp", d_model=16, hidden_dim=48).fc1.out_features == 48


def test_position_table():
    table = omnicore.create("head", "position_table", num_positions=329, d_model=16)
    assert table.weight.shape == (329, 16)
    w = table.weight.detach()
    assert 0.015 < float(w.std()) < 0.025 and float(w.abs().max()) < 0.2
    assert table(10).shape == (10, 16)
    torch.testing.assert_close(table(10), table.weight[:10])
    pos = torch.arange(12).expand(3, -1)
    assert table(pos).shape == (3, 12, 16)
    assert table(torch.arange(5)).shape == (5, 16)
    torch.testing.assert_close(table(torch.tensor([[4, 0]]))[0, 0], table.weight[4])
    with pytest.raises(OmnicoreError, match="330 positions"):
        table(330)
    x = torch.zeros(2, 6, 16)
    assert (x + table(torch.arange(6))).shape == (2, 6, 16)  # the unified model's add_positions


def test_registry_and_param_errors():
    names = {c.name for c in omnicore.list_components("head")}
    assert names >= {"text_vocab", "image_vocab", "caption_mlp", "position_table"}
    built = {
        "text_vocab": dict(vocab_size=10, d_model=8),
        "image_vocab": dict(codebook_size=12, d_model=8),
        "caption_mlp": dict(d_model=8),
        "position_table": dict(num_positions=20, d_model=8),
    }
    for name, params in built.items():
        assert isinstance(omnicore.create("head", name, **params), torch.nn.Module)
    with pytest.raises(ParamError, match="missing required parameter 'vocab_size'"):
        omnicore.create("head", "text_vocab", d_model=8)
    with pytest.raises(ParamError, match="num_positions"):
        omnicore.create("head", "position_table", num_positions="many", d_model=8)
    with pytest.raises(ParamError, match="proj"):
        omnicore.create("head", "image_vocab", codebook_size=12, d_model=8, proj="linear")
    with pytest.raises(ParamError, match="did you mean embed_dim"):
        omnicore.create("head", "image_vocab", codebook_size=12, d_model=8, embed_dims=4)
    with pytest.raises(OmnicoreError, match="d_model must be >= 1"):
        omnicore.create("head", "caption_mlp", d_model=0)


def test_contrastive_tower_learns_to_match_captions():
    # image features that identify the caption (plus noise); a few Adam steps on the SigLIP loss must rank each
    # image's own caption first: a sign error in the labels or a wrong positive mask makes this fail
    torch.manual_seed(0)
    tok = omnicore.create("text_tokenizer", "byte", words=["a", "red", "blue", "circle", "square"])
    tower = omnicore.create("head", "contrastive_text", vocab_size=tok.vocab_size, encoder_dim=16, dim=32)
    captions = ["a red circle", "a blue circle", "a red square", "a blue square"]
    ids = torch.tensor([tok.encode(c) for c in captions])
    mask = torch.ones_like(ids, dtype=torch.bool)
    codes = torch.randn(4, 16)
    opt = torch.optim.Adam(tower.parameters(), lr=1e-2)
    batch = torch.arange(4).repeat(4)  # 16 pairs; every caption four times, so several positives per row
    positive = batch[:, None] == batch[None, :]
    first = None
    for _ in range(60):
        feats = (codes[batch] + 0.1 * torch.randn(16, 16))[:, None, :].expand(16, 3, 16)
        loss = tower.loss(feats, ids[batch], mask[batch], positive)
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        sims = tower.embed_image(codes[:, None, :]) @ tower.embed_text(ids, mask).T
    assert float(loss.detach()) < 0.2 * first
    assert torch.equal(sims.argmax(-1), torch.arange(4))


def test_contrastive_tower_rejects_bad_sizes():
    with pytest.raises(omnicore.OmnicoreError, match="contrastive_text"):
        omnicore.create("head", "contrastive_text", vocab_size=10, encoder_dim=8, dim=30, num_heads=4)
