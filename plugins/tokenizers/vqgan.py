"""VQGAN image tokenizer with LlamaGen VQ-16's architecture and parameter names.

Conv encoder (ResNet blocks, attention at the lowest resolution, channel multipliers) -> ``quant_conv`` ->
an L2-normalised codebook lookup (``quantize.embedding``, 16384 x 8) -> ``post_quant_conv`` -> mirror decoder.
256 px images become 16x16 codes. The released ``vq_ds16_t2i.pt`` keeps its weights under ``model``; they load
strictly through the ``weights`` param or the component's ``weights`` (every tensor but the usage record).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


_GROUPS = {"n": 32}  # set per model while it is built (LlamaGen: 32 groups)


def _norm(channels: int) -> nn.GroupNorm:
    # Few channels per group normalise colour away (a 1-channel group is an instance norm): small models use
    # fewer groups than LlamaGen's 32.
    return nn.GroupNorm(num_groups=min(_GROUPS["n"], channels), num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = _norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1 convolutions."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        b, c, hh, ww = h.shape
        q, k, v = (t.reshape(b, c, hh * ww).transpose(1, 2) for t in (self.q(h), self.k(h), self.v(h)))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding, as the taming/LlamaGen models do


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _run_level(block: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """One resolution level: ResNet blocks (each followed by attention where the level has it), then resampling."""
    for i, res in enumerate(block.res):
        h = res(h)
        if len(block.attn):
            h = block.attn[i](h)
    for resample in ("downsample", "upsample"):
        if hasattr(block, resample):
            h = getattr(block, resample)(h)
    return h


class Encoder(nn.Module):
    def __init__(self, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, z_channels: int, dropout: float) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch, 3, 1, 1)
        in_mult = (1,) + tuple(ch_mult)
        self.conv_blocks = nn.ModuleList()
        last = len(ch_mult) - 1
        for level, mult in enumerate(ch_mult):
            block = nn.Module()
            block_in, block_out = ch * in_mult[level], ch * mult
            block.res = nn.ModuleList()
            block.attn = nn.ModuleList()
            for _ in range(num_res_blocks):
                block.res.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if level == last:
                    block.attn.append(AttnBlock(block_in))
            if level != last:
                block.downsample = Downsample(block_in)
            self.conv_blocks.append(block)
        self.mid = nn.ModuleList([ResnetBlock(block_in, block_in, dropout), AttnBlock(block_in),
                                  ResnetBlock(block_in, block_in, dropout)])
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, z_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in self.conv_blocks:
            h = _run_level(block, h)
        for layer in self.mid:
            h = layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, z_channels: int, dropout: float) -> None:
        super().__init__()
        n = len(ch_mult)
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, 1, 1)
        self.mid = nn.ModuleList([ResnetBlock(block_in, block_in, dropout), AttnBlock(block_in),
                                  ResnetBlock(block_in, block_in, dropout)])
        self.conv_blocks = nn.ModuleList()
        for level in range(n):  # lowest resolution first
            block = nn.Module()
            block_out = ch * ch_mult[n - level - 1]
            block.res = nn.ModuleList()
            block.attn = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                block.res.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if level == 0:
                    block.attn.append(AttnBlock(block_in))
            if level != n - 1:
                block.upsample = Upsample(block_in)
            self.conv_blocks.append(block)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 3, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for layer in self.mid:
            h = layer(h)
        for block in self.conv_blocks:
            h = _run_level(block, h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest-code lookup on L2-normalised vectors; straight-through gradients."""

    def __init__(self, codebook_size: int, embed_dim: int, beta: float, l2_norm: bool) -> None:
        super().__init__()
        self.codebook_size, self.embed_dim, self.beta, self.l2_norm = codebook_size, embed_dim, beta, l2_norm
        self.embedding = nn.Embedding(codebook_size, embed_dim)
        self.embedding.weight.data.uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
        if l2_norm:
            self.embedding.weight.data = F.normalize(self.embedding.weight.data, p=2, dim=-1)
        # LlamaGen keeps a usage record in its checkpoints; kept so they load key for key
        self.register_buffer("codebook_used", torch.zeros(65536))

    def codebook(self) -> torch.Tensor:
        w = self.embedding.weight
        return F.normalize(w, p=2, dim=-1) if self.l2_norm else w

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, C, h, w) -> codes (B, h, w)."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, self.embed_dim)
        if self.l2_norm:
            flat = F.normalize(flat, p=2, dim=-1)
        book = self.codebook()
        dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ book.t() + book.pow(2).sum(1)[None]
        return dist.argmin(1).view(z.shape[0], z.shape[2], z.shape[3])

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, h, w) -> vectors (B, C, h, w)."""
        return F.embedding(codes, self.codebook()).permute(0, 3, 1, 2).contiguous()

    @torch.no_grad()
    def _revive(self, z: torch.Tensor, codes: torch.Tensor) -> None:
        """Training only: seed the codebook from encoder outputs, then re-seed codes that fell out of use.

        A codebook trained from scratch otherwise collapses onto a few codes. Usage is an exponential moving
        count kept in the first ``codebook_size`` entries of ``codebook_used``.
        """
        flat = z.permute(0, 2, 3, 1).reshape(-1, self.embed_dim)
        flat = F.normalize(flat, p=2, dim=-1) if self.l2_norm else flat
        usage = self.codebook_used[: self.codebook_size]
        fresh = usage.sum() == 0
        usage.mul_(0.99).add_(torch.bincount(codes.flatten(), minlength=self.codebook_size).to(usage.dtype))
        dead = torch.ones_like(usage, dtype=torch.bool) if fresh else usage < 1e-3 * usage.sum() / self.codebook_size
        n = int(dead.sum())
        if n:
            pick = torch.randint(0, flat.shape[0], (n,), device=flat.device)
            noise = 0.01 * torch.randn(n, self.embed_dim, device=flat.device, dtype=flat.dtype)
            self.embedding.weight.data[dead] = (flat[pick] + noise).to(self.embedding.weight.dtype)
            usage[dead] = usage.sum() / self.codebook_size  # a grace period before it can be revived again

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        codes = self.indices(z)
        if self.training:
            self._revive(z, codes)
            codes = self.indices(z)
        zq = self.lookup(codes)
        zn = F.normalize(z, p=2, dim=1) if self.l2_norm else z
        losses = {"codebook": F.mse_loss(zq, zn.detach()), "commitment": self.beta * F.mse_loss(zn, zq.detach())}
        return zn + (zq - zn).detach(), codes, losses


@dataclass(frozen=True)
class VQConfig:
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    z_channels: int = 256
    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    commit_beta: float = 0.25
    dropout: float = 0.0
    image_size: int = 256
    norm_groups: int = 32


PRESETS: dict[str, VQConfig] = {
    "vq16": VQConfig(),  # LlamaGen VQ-16: 256 px -> 16x16 codes
    # quick start / tests: 32 px -> 4x4 codes, trains on a CPU in a minute or two
    "tiny": VQConfig(ch=16, ch_mult=(1, 2, 2, 4), num_res_blocks=1, z_channels=32, codebook_size=128,
                     codebook_embed_dim=16, codebook_l2_norm=False, image_size=32, norm_groups=8),
}


class VQGAN(nn.Module):
    # Not read from weight files (load_component_weights): LlamaGen's ``codebook_used`` is a ring of recently
    # used code indices, ours a usage count that training's codebook revival reads (VectorQuantizer._revive);
    # loading theirs would mark random codes as used. Present or absent in a file, it is never an error.
    ignored_weights: tuple[str, ...] = ("quantize.codebook_used",)

    def __init__(self, config: VQConfig) -> None:
        super().__init__()
        self.config = config
        _GROUPS["n"] = config.norm_groups
        try:
            self.encoder = Encoder(config.ch, config.ch_mult, config.num_res_blocks, config.z_channels, config.dropout)
            self.decoder = Decoder(config.ch, config.ch_mult, config.num_res_blocks, config.z_channels, config.dropout)
        finally:
            _GROUPS["n"] = 32
        self.quantize = VectorQuantizer(config.codebook_size, config.codebook_embed_dim, config.commit_beta,
                                        config.codebook_l2_norm)
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.codebook_embed_dim, config.z_channels, 1)

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.config.ch_mult) - 1)

    def grid_size(self, image_size: int) -> tuple[int, int]:
        side = image_size // self.downsample
        return side, side

    def _check(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-1] % self.downsample:
            raise ValueError(f"vqgan: expected images (B, 3, H, W) with H, W multiples of {self.downsample}, "
                             f"got {tuple(images.shape)}")

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> codes (B, h, w)."""
        self._check(images)
        return self.quantize.indices(self.quant_conv(self.encoder(images)))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w) -> images in [-1, 1]."""
        return self.decoder(self.post_quant_conv(self.quantize.lookup(codes))).clamp(-1, 1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        zq, _, losses = self.quantize(self.quant_conv(self.encoder(images)))
        return self.decoder(self.post_quant_conv(zq)), losses

    def training_losses(self, images: torch.Tensor, recon_weight: float = 1.0) -> dict[str, torch.Tensor]:
        """Reconstruction (L2 + L1), codebook and commitment losses; ``loss`` is their sum."""
        self._check(images)
        recon, losses = self(images)
        rec = F.mse_loss(recon, images) + F.l1_loss(recon, images)
        total = recon_weight * rec + losses["codebook"] + losses["commitment"]
        return {"loss": total, "recon": rec.detach(), "codebook": losses["codebook"].detach(),
                "commitment": losses["commitment"].detach()}
