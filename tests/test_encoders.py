"""Encoders (timm, random init, no downloads) and the MMU projector."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import omnicore
from omnicore.errors import CheckpointError, OmnicoreError, ParamError
from omnicore.interfaces import Encoder

TINY_VIT = dict(model_name="vit_tiny_patch16_224", image_size=32,
                model_kwargs={"patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2})


def tiny_vit(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return omnicore.create("encoder", "timm_vit", **{**TINY_VIT, **overrides}).eval()


@pytest.fixture(scope="module")
def full_dinosiglip():
    """The released configuration, built once. Built on the meta device and materialised with a plain normal
    init, which is much faster on a CPU than timm's init (random weights either way)."""
    with torch.device("meta"):
        enc = omnicore.create("encoder", "dinosiglip", prune=True)
    enc = enc.to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in enc.parameters():
            p.normal_(0.0, 0.02)
    enc.reset_buffers()
    return enc.eval()


# --- the OmniMamba encoders at full size ------------------------------------------------------------------------
def test_dinosiglip_384_gives_729_by_2176(full_dinosiglip):
    enc = full_dinosiglip
    assert isinstance(enc, Encoder)
    assert (enc.image_size, enc.num_patches, enc.embed_dim) == (384, 729, 2176)
    assert (enc.dino.embed_dim, enc.siglip.embed_dim) == (1024, 1152)
    assert enc.dino.model_name == "vit_large_patch14_reg4_dinov2" and enc.siglip.model_name == "vit_so400m_patch14_siglip_384"
    assert enc.dino.num_prefix_tokens == 5 and enc.siglip.num_prefix_tokens == 0  # cls + 4 registers dropped
    assert enc.dino.feature_layer == 24 - 2 and enc.siglip.feature_layer == 27 - 2  # second-to-last block
    with torch.inference_mode():
        out = enc(torch.randn(1, 3, 384, 384))
    assert out.shape == (1, 729, 2176) and torch.isfinite(out).all()


def test_siglip_and_dinov2_full_configs():
    with torch.device("meta"):  # shapes only: no memory, no init time
        sig = omnicore.create("encoder", "siglip")
        dino = omnicore.create("encoder", "dinov2")
        assert sig(torch.empty(2, 3, 384, 384)).shape == (2, 729, 1152)
    assert (sig.embed_dim, sig.num_patches, sig.image_size, sig.grid) == (1152, 729, 384, (27, 27))
    assert (dino.embed_dim, dino.num_patches, dino.image_size, dino.grid) == (1024, 729, 384, (27, 27))
    assert sig.mean == (0.5, 0.5, 0.5) and sig.std == (0.5, 0.5, 0.5)
    assert dino.mean == pytest.approx((0.485, 0.456, 0.406)) and dino.std == pytest.approx((0.229, 0.224, 0.225))


# --- tiny encoders -------------------------------------------------------------------------------------------------
def test_timm_vit_tiny_shapes_and_second_to_last_block():
    enc = tiny_vit()
    assert isinstance(enc, Encoder)
    assert (enc.embed_dim, enc.num_patches, enc.image_size, enc.feature_layer) == (32, 16, 32, 1)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = enc(x)
        ref = enc.model.get_intermediate_layers(x, n={1})[0]  # block 1 of 3, class token dropped
    assert out.shape == (2, 16, 32)
    torch.testing.assert_close(out, ref)
    last = tiny_vit(feature_layer=-1)
    assert last.feature_layer == 2
    with pytest.raises(OmnicoreError, match="feature_layer"):
        tiny_vit(feature_layer=5)
    with pytest.raises(OmnicoreError, match=r"\(B, 3, 32, 32\)"):
        enc(torch.randn(1, 3, 48, 48))


def test_tiny_named_encoders():
    sig = omnicore.create("encoder", "siglip", size="tiny")
    dino = omnicore.create("encoder", "dinov2", size="tiny", model_kwargs={"embed_dim": 24})
    both = omnicore.create("encoder", "dinosiglip", size="tiny").eval()
    assert (sig.image_size, sig.num_patches, sig.embed_dim) == (56, 16, 48)
    assert (dino.num_patches, dino.embed_dim, dino.num_prefix_tokens) == (16, 24, 5)
    assert (both.num_patches, both.embed_dim) == (16, 32 + 48)
    with torch.no_grad():
        assert both(torch.randn(2, 3, 56, 56)).shape == (2, 16, 80)


# --- preprocessing -------------------------------------------------------------------------------------------------
def colour_image(size=(50, 30), colour=(255, 0, 128), mode="RGB"):
    return Image.new(mode, size, colour if mode == "RGB" else colour + (255,))


def test_image_transform_shape_and_normalisation():
    enc = tiny_vit()  # vit_tiny's config: mean/std 0.5 -> pixels in [-1, 1]
    x = enc.image_transform()(colour_image(mode="RGBA"))
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    torch.testing.assert_close(x[:, 5, 5], torch.tensor([1.0, -1.0, 128 / 255 * 2 - 1]))
    dino = omnicore.create("encoder", "dinov2", size="tiny")
    y = dino.image_transform()(colour_image())
    assert y.shape == (3, 56, 56)
    expected = (torch.tensor([1.0, 0.0, 128 / 255]) - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(y[:, 0, 0], expected)
    custom = tiny_vit(mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0], resize="crop")
    torch.testing.assert_close(custom.image_transform()(colour_image())[:, 3, 3], torch.tensor([1.0, 0.0, 128 / 255]))
    import pickle

    assert pickle.loads(pickle.dumps(enc.image_transform()))(colour_image()).shape == (3, 32, 32)  # DataLoader workers
    letter = tiny_vit(resize="letterbox").image_transform()(colour_image((64, 32)))
    assert letter.shape == (3, 32, 32) and abs(float(letter[:, 0, 16].mean())) < 0.02  # padding ~ the mean


def test_dinosiglip_feeds_each_tower_its_own_normalisation():
    enc = omnicore.create("encoder", "dinosiglip", size="tiny").eval()
    torch.manual_seed(0)
    img = Image.fromarray((torch.rand(70, 90, 3) * 255).to(torch.uint8).numpy())
    x = enc.image_transform()(img)
    assert x.shape == (3, 56, 56)
    dino_px, siglip_px = enc.tower_pixels(x[None])
    torch.testing.assert_close(dino_px[0], enc.dino.image_transform()(img), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(siglip_px[0], enc.siglip.image_transform()(img), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        out = enc(x[None])
        ref = torch.cat([enc.dino(enc.dino.image_transform()(img)[None]),
                         enc.siglip(enc.siglip.image_transform()(img)[None])], -1)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


# --- local weights -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_change_outputs_to_match(tmp_path, suffix):
    from safetensors.torch import save_file

    source, target = tiny_vit(seed=1), tiny_vit(seed=2)
    x = torch.randn(2, 3, 32, 32)
    path = tmp_path / f"vit{suffix}"
    state = {k: v.contiguous() for k, v in source.model.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save({"state_dict": state}, path)
    with torch.no_grad():
        assert not torch.allclose(source(x), target(x))
        loaded = tiny_vit(seed=2, weights=str(path))
        torch.testing.assert_close(loaded(x), source(x))
    assert loaded.load_report.complete and loaded.load_report.path == str(path)


def test_partial_weights_are_an_error_naming_the_tensor(tmp_path):
    """A vision file with a tensor missing or one the model lacks is refused (never random weights kept silently)."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in tiny_vit(seed=1).model.state_dict().items()}
    missing = dict(state)
    del missing["blocks.2.mlp.fc2.weight"]
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(CheckpointError, match="missing.safetensors.*missing tensor 'blocks.2.mlp.fc2.weight'"):
        tiny_vit(weights=str(tmp_path / "missing.safetensors"))
    save_file({**state, "extra.weight": torch.zeros(3)}, str(tmp_path / "extra.safetensors"))
    with pytest.raises(CheckpointError, match="extra.safetensors.*extra.weight"):
        tiny_vit(weights=str(tmp_path / "extra.safetensors"))


def test_weights_errors_name_the_path(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere.safetensors: weights file not found"):
        tiny_vit(weights=str(tmp_path / "nowhere.safetensors"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth: cannot read weights"):
        tiny_vit(weights=str(junk))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        tiny_vit(weights=str(bad))
    wrong = tmp_path / "wrong.pth"
    torch.save(tiny_vit(model_kwargs={**TINY_VIT["model_kwargs"], "embed_dim": 16}).model.state_dict(), wrong)
    with pytest.raises(CheckpointError, match="wrong.pth.*shape mismatch"):
        tiny_vit(weights=str(wrong))


def test_dinosiglip_tower_weights_and_pos_embed_resampling(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(3)
    src = omnicore.create("encoder", "dinosiglip", size="tiny").eval()
    # the dino file comes from a 84 px model (6x6 grid): its position table is resampled to 4x4, like 518 -> 384
    torch.manual_seed(4)
    big = omnicore.create("encoder", "dinov2", size="tiny", image_size=84)
    dino_path, sig_path = tmp_path / "dino.pth", tmp_path / "siglip.safetensors"
    torch.save(big.model.state_dict(), dino_path)
    save_file({k: v.contiguous() for k, v in src.siglip.model.state_dict().items()}, str(sig_path))
    enc = omnicore.create("encoder", "dinosiglip", size="tiny", dino_weights=str(dino_path),
                          siglip_weights=str(sig_path)).eval()
    assert enc.load_report["dino"].complete and enc.load_report["siglip"].complete
    torch.testing.assert_close(enc.dino.model.blocks[0].attn.qkv.weight, big.model.blocks[0].attn.qkv.weight)
    assert enc.dino.model.pos_embed.shape[1] == 16  # no_embed_class: patch positions only
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(enc(x)[..., 32:], src(x)[..., 32:])


# --- projector -----------------------------------------------------------------------------------------------------
def test_projector_layouts():
    proj = omnicore.create("projector", "mlp_gelu", in_dim=80, out_dim=16)
    linears = [m for m in proj.projector if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(80, 16), (16, 16)]  # prismatic gelu-mlp
    assert isinstance(proj.projector[1], torch.nn.GELU)
    assert proj(torch.randn(2, 5, 80)).shape == (2, 5, 16)
    fused = omnicore.create("projector", "mlp_gelu", in_dim=8, out_dim=16, fused=True)
    assert [(m.in_features, m.out_features) for m in fused.projector if isinstance(m, torch.nn.Linear)] == \
        [(8, 32), (32, 16), (16, 16)]  # fused-gelu-mlp
    deep = omnicore.create("projector", "mlp_gelu", in_dim=8, out_dim=16, hidden_dim=64, depth=3)
    assert deep(torch.randn(3, 8)).shape == (3, 16) and deep.projector[0].out_features == 64
    assert omnicore.create("projector", "mlp_gelu", in_dim=8, out_dim=4, depth=1)(torch.randn(8)).shape == (4,)


def test_encoder_to_projector_chain():
    enc = tiny_vit()
    proj = omnicore.create("projector", "mlp_gelu", in_dim=enc.embed_dim, out_dim=24)
    assert proj(enc(torch.randn(2, 3, 32, 32))).shape == (2, enc.num_patches, 24)


# --- registry ------------------------------------------------------------------------------------------------------
def test_registered_and_params_checked():
    assert {c.name for c in omnicore.list_components("encoder")} >= {"siglip", "dinov2", "dinosiglip", "timm_vit"}
    assert [c.name for c in omnicore.list_components("projector")] == ["mlp_gelu"]
    with pytest.raises(ParamError, match="size"):
        omnicore.create("encoder", "siglip", size="huge")
    with pytest.raises(ParamError, match="did you mean image_size"):
        omnicore.create("encoder", "timm_vit", model_name="vit_tiny_patch16_224", img_size=32)
    with pytest.raises(ParamError, match="missing required parameter 'model_name'"):
        omnicore.create("encoder", "timm_vit", image_size=32)
    with pytest.raises(ParamError, match="resize"):
        omnicore.create("encoder", "dinosiglip", size="tiny", resize="stretch")
    with pytest.raises(ParamError, match="depth"):
        omnicore.create("projector", "mlp_gelu", in_dim=8, out_dim=4, depth="deep")
    with pytest.raises(ParamError, match="out_dim"):
        omnicore.create("projector", "mlp_gelu", in_dim=8)
    with pytest.raises(OmnicoreError, match="cannot build timm model"):
        omnicore.create("encoder", "timm_vit", model_name="no_such_model_xyz", image_size=32)
