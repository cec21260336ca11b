"""The VQGAN tokenizer: LlamaGen VQ-16 layout, real-size shapes, tiny round trips, training, weight files."""

from __future__ import annotations

import pytest
import torch

import omnicore
from omnicore.errors import CheckpointError, ParamError

# (key, shape) pairs of LlamaGen's VQ-16 checkpoint (tokenizer/tokenizer_image/vq_model.py, VQ_16)
VQ16_LAYOUT = {
    "encoder.conv_in.weight": (128, 3, 3, 3),
    "encoder.conv_blocks.0.res.0.norm1.weight": (128,),
    "encoder.conv_blocks.0.res.0.conv1.weight": (128, 128, 3, 3),
    "encoder.conv_blocks.0.downsample.conv.weight": (128, 128, 3, 3),
    "encoder.conv_blocks.2.res.0.nin_shortcut.weight": (256, 128, 1, 1),
    "encoder.conv_blocks.4.res.0.nin_shortcut.weight": (512, 256, 1, 1),
    "encoder.conv_blocks.4.attn.1.proj_out.weight": (512, 512, 1, 1),
    "encoder.mid.1.q.weight": (512, 512, 1, 1),
    "encoder.mid.2.conv2.weight": (512, 512, 3, 3),
    "encoder.norm_out.weight": (512,),
    "encoder.conv_out.weight": (256, 512, 3, 3),
    "quant_conv.weight": (8, 256, 1, 1),
    "quantize.embedding.weight": (16384, 8),
    "quantize.codebook_used": (65536,),
    "post_quant_conv.weight": (256, 8, 1, 1),
    "decoder.conv_in.weight": (512, 256, 3, 3),
    "decoder.conv_blocks.0.res.2.conv2.weight": (512, 512, 3, 3),
    "decoder.conv_blocks.0.attn.2.v.weight": (512, 512, 1, 1),
    "decoder.conv_blocks.0.upsample.conv.weight": (512, 512, 3, 3),
    "decoder.conv_blocks.1.res.0.nin_shortcut.weight": (256, 512, 1, 1),
    "decoder.conv_blocks.4.res.2.conv1.weight": (128, 128, 3, 3),
    "decoder.norm_out.weight": (128,),
    "decoder.conv_out.weight": (3, 128, 3, 3),
}


@pytest.fixture(scope="module")
def vq16():
    torch.manual_seed(0)
    return omnicore.create("image_tokenizer", "vqgan").eval()  # the default is the real VQ-16


def test_vq16_state_dict_matches_llamagen_layout(vq16):
    sd = vq16.state_dict()
    for key, shape in VQ16_LAYOUT.items():
        assert tuple(sd[key].shape) == shape, key
    assert len(sd) == 344
    assert not any("attn" in k for k in sd if k.startswith("encoder.conv_blocks.3"))  # attention only at 16x16
    assert vq16.codebook_size == 16384 and vq16.downsample == 16


def test_vq16_256px_to_16x16_codes_and_back(vq16):
    images = torch.rand(1, 3, 256, 256) * 2 - 1
    with torch.no_grad():
        codes = vq16.encode(images)
        assert codes.shape == (1, 16, 16) and codes.dtype == torch.long
        assert 0 <= int(codes.min()) and int(codes.max()) < 16384
        out = vq16.decode(codes)
    assert out.shape == (1, 3, 256, 256) and float(out.abs().max()) <= 1.0


def test_tiny_round_trip_is_stable():
    torch.manual_seed(0)
    vq = omnicore.create("image_tokenizer", "vqgan", preset="tiny").eval()
    with torch.no_grad():
        codes = vq.encode(torch.rand(2, 3, 32, 32) * 2 - 1)
        assert codes.shape == (2, 4, 4) and int(codes.max()) < vq.codebook_size
        images = vq.decode(codes)
        assert images.shape == (2, 3, 32, 32)
        # decoding a code and looking it up again returns the same vectors
        assert torch.allclose(vq.quantize.lookup(codes), vq.quantize.lookup(vq.quantize.indices(vq.quantize.lookup(codes))))


def test_training_reduces_reconstruction_loss():
    torch.manual_seed(0)
    vq = omnicore.create("image_tokenizer", "vqgan", preset="tiny")
    ds = omnicore.create("dataset", "synthetic_shapes", task="t2i", size=16, image_size=32)
    from omnicore.training.data import image_to_tensor

    images = torch.stack([image_to_tensor(ds[i]["image"], 32) for i in range(16)])
    opt = torch.optim.Adam(vq.parameters(), lr=3e-3)
    first = None
    for _ in range(25):
        out = vq.training_losses(images)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        first = first if first is not None else float(out["recon"])
    assert float(out["recon"]) < 0.6 * first
    assert set(out) == {"loss", "recon", "codebook", "commitment"}


def test_loads_llamagen_style_and_safetensors_files(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    src = omnicore.create("image_tokenizer", "vqgan", preset="tiny")
    torch.save({"model": src.state_dict(), "optimizer": {}, "steps": 7}, tmp_path / "vq.pt")
    save_file(src.state_dict(), str(tmp_path / "vq.safetensors"))
    for name in ("vq.pt", "vq.safetensors"):
        vq = omnicore.create("image_tokenizer", "vqgan", preset="tiny", weights=str(tmp_path / name))
        for k, v in src.state_dict().items():
            assert torch.equal(vq.state_dict()[k], v), (name, k)


def test_wrong_shaped_weights_are_a_clear_error(tmp_path):
    other = omnicore.create("image_tokenizer", "vqgan", preset="tiny", codebook_size=64)
    torch.save({"model": other.state_dict()}, tmp_path / "vq.pt")
    with pytest.raises(CheckpointError, match="shape mismatch for 'quantize.embedding.weight'"):
        omnicore.create("image_tokenizer", "vqgan", preset="tiny", weights=str(tmp_path / "vq.pt"))


def test_bad_params():
    with pytest.raises(ParamError, match="parameter 'preset'"):
        omnicore.create("image_tokenizer", "vqgan", preset="huge")
    with pytest.raises(ParamError, match="unknown parameter 'codebook'"):
        omnicore.create("image_tokenizer", "vqgan", codebook=5)
