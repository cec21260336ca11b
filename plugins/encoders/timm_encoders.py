"""Understanding encoders built with timm: SigLIP, DINOv2, both fused (DINO-SigLIP), and any timm ViT.

Every encoder returns per-patch features of one block (by default the second-to-last, as prismatic/Cobra/OmniMamba
do), taken with timm's ``forward_intermediates`` with the prefix (class/register) tokens dropped:
``(B, num_patches, embed_dim)``. Models are always built with ``pretrained=False``; real weights come from local
files (``weights=``). Each encoder carries its preprocessing: ``image_transform()`` turns one PIL image into a
``(3, image_size, image_size)`` tensor normalised with the encoder's ``mean``/``std``.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Sequence

import torch
from torch import nn

from omnicore.errors import OmnicoreError

from .weights import LoadReport, load_timm_weights

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

ResizeMode = Literal["naive", "crop", "letterbox"]
Size = Literal["full", "tiny"]

SIGLIP_MODEL = "vit_so400m_patch14_siglip_384"
DINOV2_MODEL = "vit_large_patch14_reg4_dinov2"
# "tiny": the same architectures (patch 14, registers, layer scale, mlp ratio...) shrunk for tests and CPU runs;
# 56 px -> a 4x4 patch grid.
TINY_IMAGE_SIZE = 56
TINY_KWARGS = {
    SIGLIP_MODEL: {"embed_dim": 48, "depth": 3, "num_heads": 2},
    DINOV2_MODEL: {"embed_dim": 32, "depth": 3, "num_heads": 2},
}


# --- preprocessing -----------------------------------------------------------------------------------------------
class _ToRGB:
    def __call__(self, image):
        return image.convert("RGB") if getattr(image, "mode", "RGB") != "RGB" else image


class _LetterboxPad:
    """Pad a PIL image to a square with a constant fill (the normalisation mean, so padding maps to ~0)."""

    def __init__(self, fill: tuple[int, int, int]) -> None:
        self.fill = fill

    def __call__(self, image):
        from PIL import Image

        w, h = image.size
        side = max(w, h)
        if w == h:
            return image
        canvas = Image.new("RGB", (side, side), self.fill)
        canvas.paste(image, ((side - w) // 2, (side - h) // 2))
        return canvas


def build_image_transform(image_size: int, mean: Sequence[float], std: Sequence[float], resize: str = "naive",
                          interpolation: str = "bicubic") -> Callable[[Any], torch.Tensor]:
    """PIL image -> ``(3, S, S)`` float tensor: to RGB, resize (naive squash, resize+center crop, or letterbox),
    to [0, 1], then ``(x - mean) / std``. Picklable (DataLoader workers)."""
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode

    mode = InterpolationMode(interpolation)
    steps: list[Any] = [_ToRGB()]
    if resize == "naive":
        steps.append(T.Resize((image_size, image_size), interpolation=mode, antialias=True))
    elif resize == "crop":
        steps += [T.Resize(image_size, interpolation=mode, antialias=True), T.CenterCrop(image_size)]
    elif resize == "letterbox":
        steps += [_LetterboxPad(tuple(int(round(m * 255)) for m in mean)),
                  T.Resize((image_size, image_size), interpolation=mode, antialias=True)]
    else:
        raise OmnicoreError(f"unknown resize mode {resize!r}; use naive, crop or letterbox")
    steps += [T.ToTensor(), T.Normalize(mean=list(mean), std=list(std))]
    return T.Compose(steps)


# --- one timm tower ----------------------------------------------------------------------------------------------
class TimmEncoder(nn.Module):
    """One timm ViT: pixels ``(B, 3, S, S)`` (normalised with ``mean``/``std``) -> ``(B, num_patches, embed_dim)``.

    Attributes: ``model`` (the timm module), ``embed_dim``, ``num_patches``, ``grid`` (h, w), ``image_size``,
    ``feature_layer`` (absolute block index), ``mean``, ``std``, ``resize``, ``load_report`` (LoadReport or None).
    """

    def __init__(self, model_name: str, image_size: int, feature_layer: int = -2,
                 model_kwargs: dict[str, Any] | None = None, weights: str | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 resize: str = "naive", prune: bool = False, label: str = "encoder") -> None:
        super().__init__()
        import timm

        kwargs = dict(model_kwargs or {})
        for reserved in ("pretrained", "img_size"):
            if reserved in kwargs:
                raise OmnicoreError(f"{label}: model_kwargs may not set {reserved!r} (use image_size / weights)")
        kwargs.setdefault("num_classes", 0)
        try:
            self.model = timm.create_model(model_name, pretrained=False, img_size=image_size, **kwargs)
        except Exception as exc:
            raise OmnicoreError(f"{label}: cannot build timm model {model_name!r} with img_size={image_size}, "
                                f"{kwargs}: {type(exc).__name__}: {exc}") from None
        if not hasattr(self.model, "forward_intermediates") or not hasattr(self.model, "blocks"):
            raise OmnicoreError(f"{label}: timm model {model_name!r} has no forward_intermediates/blocks "
                                "(a ViT-style model is needed)")
        depth = len(self.model.blocks)
        index = feature_layer + depth if feature_layer < 0 else feature_layer
        if not 0 <= index < depth:
            raise OmnicoreError(f"{label}: feature_layer {feature_layer} is out of range for {depth} blocks")
        self.model_name = model_name
        self.feature_layer = index
        self.image_size = int(image_size)
        self.load_report: LoadReport | None = None
        if weights:
            self.load_report = load_timm_weights(self.model, weights, label=label)
        if prune:  # drop the blocks after the feature layer, the final norm and the head (saves memory)
            self.model.prune_intermediate_layers([index], prune_norm=True, prune_head=True)

        cfg = getattr(self.model, "pretrained_cfg", {}) or {}
        self.mean = tuple(float(m) for m in (mean if mean is not None else cfg.get("mean", IMAGENET_MEAN)))
        self.std = tuple(float(s) for s in (std if std is not None else cfg.get("std", IMAGENET_STD)))
        if len(self.mean) != 3 or len(self.std) != 3:
            raise OmnicoreError(f"{label}: mean and std need 3 values each")
        self.interpolation = cfg.get("interpolation", "bicubic") or "bicubic"
        self.resize = resize
        self.embed_dim = int(self.model.embed_dim)
        grid = tuple(self.model.patch_embed.grid_size)
        self.grid = grid
        self.num_patches = int(grid[0] * grid[1])
        self.num_prefix_tokens = int(getattr(self.model, "num_prefix_tokens", 0))

    def image_transform(self) -> Callable[[Any], torch.Tensor]:
        return build_image_transform(self.image_size, self.mean, self.std, self.resize, self.interpolation)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.dim() != 4 or pixels.shape[1] != 3 or tuple(pixels.shape[-2:]) != (self.image_size, self.image_size):
            raise OmnicoreError(f"encoder expects pixels (B, 3, {self.image_size}, {self.image_size}); "
                                f"got {tuple(pixels.shape)}")
        (feats,) = self.model.forward_intermediates(pixels, indices=[self.feature_layer], norm=False,
                                                    stop_early=True, output_fmt="NLC", intermediates_only=True)
        return feats

    def extra_repr(self) -> str:
        return (f"model={self.model_name}, image_size={self.image_size}, feature_layer={self.feature_layer}, "
                f"embed_dim={self.embed_dim}, num_patches={self.num_patches}")


# --- DINOv2 + SigLIP ---------------------------------------------------------------------------------------------
class DinoSigLIPEncoder(nn.Module):
    """DINOv2 and SigLIP side by side; per-patch features concatenated ``[dino, siglip]`` on the channel axis.

    ``image_transform()`` resizes once and normalises with this encoder's ``mean``/``std`` (SigLIP's 0.5/0.5 by
    default); ``forward`` undoes that and applies each tower's own normalisation (DINOv2: ImageNet statistics,
    SigLIP: 0.5/0.5), which is exact, so each tower sees the same pixels as with its own transform.
    """

    def __init__(self, dino: TimmEncoder, siglip: TimmEncoder, mean: Sequence[float] = SIGLIP_MEAN,
                 std: Sequence[float] = SIGLIP_STD, resize: str = "naive") -> None:
        super().__init__()
        if dino.image_size != siglip.image_size or dino.grid != siglip.grid:
            raise OmnicoreError(f"dinosiglip: the towers disagree: dino {dino.image_size} px grid {dino.grid}, "
                                f"siglip {siglip.image_size} px grid {siglip.grid}")
        self.dino, self.siglip = dino, siglip
        self.image_size = dino.image_size
        self.num_patches = dino.num_patches
        self.grid = dino.grid
        self.embed_dim = dino.embed_dim + siglip.embed_dim
        self.mean, self.std, self.resize = tuple(mean), tuple(std), resize
        self.interpolation = "bicubic"
        for name in ("dino", "siglip"):
            self.register_buffer(f"{name}_scale", torch.ones(1, 3, 1, 1), persistent=False)
            self.register_buffer(f"{name}_shift", torch.zeros(1, 3, 1, 1), persistent=False)
        self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """(Re)compute the per-tower affine maps (after ``to_empty`` from the meta device, say):
        ``x_tower = (x * std_in + mean_in - mean_t) / std_t = x * scale_t + shift_t``."""
        for name, tower in (("dino", self.dino), ("siglip", self.siglip)):
            m_in, s_in = torch.tensor(self.mean), torch.tensor(self.std)
            m_t, s_t = torch.tensor(tower.mean), torch.tensor(tower.std)
            scale, shift = getattr(self, f"{name}_scale"), getattr(self, f"{name}_shift")
            if scale.device.type != "meta":
                scale.copy_((s_in / s_t).view(1, 3, 1, 1))
                shift.copy_(((m_in - m_t) / s_t).view(1, 3, 1, 1))

    @property
    def load_report(self) -> dict[str, LoadReport | None]:
        return {"dino": self.dino.load_report, "siglip": self.siglip.load_report}

    def image_transform(self) -> Callable[[Any], torch.Tensor]:
        return build_image_transform(self.image_size, self.mean, self.std, self.resize, self.interpolation)

    def tower_pixels(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (dino, siglip) inputs, each with its own tower's normalisation."""
        dino = pixels * self.dino_scale.to(pixels.dtype) + self.dino_shift.to(pixels.dtype)
        siglip = pixels * self.siglip_scale.to(pixels.dtype) + self.siglip_shift.to(pixels.dtype)
        return dino, siglip

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        dino_px, siglip_px = self.tower_pixels(pixels)
        return torch.cat([self.dino(dino_px), self.siglip(siglip_px)], dim=-1)


# --- factories (registered; every parameter annotated so recipes are validated) ----------------------------------
def _tower(default_model: str, size: str, model_name: str | None, image_size: int | None,
           model_kwargs: dict[str, Any] | None) -> tuple[str, int, dict[str, Any]]:
    name = model_name or default_model
    kwargs: dict[str, Any] = {}
    if size == "tiny":
        kwargs.update(TINY_KWARGS.get(name, {"embed_dim": 32, "depth": 3, "num_heads": 2}))
        size_px = image_size or TINY_IMAGE_SIZE
    else:
        size_px = image_size or 384
    kwargs.update(model_kwargs or {})
    return name, size_px, kwargs


def timm_vit(model_name: str, image_size: int = 224, feature_layer: int = -2,
             model_kwargs: dict[str, Any] | None = None, weights: str | None = None,
             mean: tuple[float, float, float] | None = None, std: tuple[float, float, float] | None = None,
             resize: ResizeMode = "naive", prune: bool = False) -> TimmEncoder:
    """Any timm ViT (model_kwargs: patch_size, embed_dim, depth, num_heads...), per-patch features of one block."""
    return TimmEncoder(model_name, image_size, feature_layer, model_kwargs, weights, mean, std, resize, prune,
                       label=f"encoder timm_vit ({model_name})")


def siglip(size: Size = "full", model_name: str | None = None, image_size: int | None = None,
           feature_layer: int = -2, weights: str | None = None, model_kwargs: dict[str, Any] | None = None,
           resize: ResizeMode = "naive", prune: bool = False) -> TimmEncoder:
    """SigLIP SO400M/14 at 384 px (27x27 patches, width 1152), mean/std 0.5; size=tiny for tests."""
    name, px, kwargs = _tower(SIGLIP_MODEL, size, model_name, image_size, model_kwargs)
    return TimmEncoder(name, px, feature_layer, kwargs, weights, SIGLIP_MEAN, SIGLIP_STD, resize, prune,
                       label="encoder siglip")


def dinov2(size: Size = "full", model_name: str | None = None, image_size: int | None = None,
           feature_layer: int = -2, weights: str | None = None, model_kwargs: dict[str, Any] | None = None,
           resize: ResizeMode = "naive", prune: bool = False) -> TimmEncoder:
    """DINOv2 ViT-L/14 with 4 registers at 384 px (27x27 patches, width 1024), ImageNet mean/std; size=tiny for tests."""
    name, px, kwargs = _tower(DINOV2_MODEL, size, model_name, image_size, model_kwargs)
    return TimmEncoder(name, px, feature_layer, kwargs, weights, IMAGENET_MEAN, IMAGENET_STD, resize, prune,
                       label="encoder dinov2")


def dinosiglip(size: Size = "full", image_size: int | None = None, feature_layer: int = -2,
               dino_weights: str | None = None, siglip_weights: str | None = None,
               dino_model: str | None = None, siglip_model: str | None = None,
               dino_kwargs: dict[str, Any] | None = None, siglip_kwargs: dict[str, Any] | None = None,
               resize: ResizeMode = "naive", prune: bool = False) -> DinoSigLIPEncoder:
    """DINOv2 ViT-L/14-reg4 + SigLIP SO400M/14 at 384 px, patch features concatenated: (B, 729, 2176)."""
    d_name, px, d_kwargs = _tower(DINOV2_MODEL, size, dino_model, image_size, dino_kwargs)
    s_name, _, s_kwargs = _tower(SIGLIP_MODEL, size, siglip_model, image_size, siglip_kwargs)
    dino = TimmEncoder(d_name, px, feature_layer, d_kwargs, dino_weights, IMAGENET_MEAN, IMAGENET_STD, resize,
                       prune, label="encoder dinosiglip (dino)")
    sig = TimmEncoder(s_name, px, feature_layer, s_kwargs, siglip_weights, SIGLIP_MEAN, SIGLIP_STD, resize, prune,
                      label="encoder dinosiglip (siglip)")
    return DinoSigLIPEncoder(dino, sig, SIGLIP_MEAN, SIGLIP_STD, resize)
