"""Writes the released OmniMamba files at a reduced width, for the converter's tests.

``OmniMamba-*.pth``: a flat dict of fp16 tensors under the released names (see
/work/shared/reference/omnimamba-official-layout.md), shapes derived from a few dimensions, with untied copies of
lm_head and img_head equal to their tables, saved with plain ``torch.save``. Beside it: a tokenizer.json whose id 0
is <|endoftext|> (WordLevel, built with the ``tokenizers`` library), a VQ checkpoint in LlamaGen's names
(``{"model": state}``), and DINOv2 / SigLIP files in timm's and open_clip's names. ``Dims.release()`` gives the
1.3B release's own sizes (full towers and VQ-16; benchmarks/bench_convert.py writes those), the defaults a tiny
model for the tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

P = "llm_backbone.mamba.backbone."
LM_HEAD = "llm_backbone.mamba.lm_head.weight"
IMG_HEAD = "llm_backbone.mamba.img_head.weight"
TASKS = ("mmu", "t2i")
WORDS = ["USER", "ASSISTANT", ":", "In", "Out", "what", "colour", "is", "the", "shape", "a", "red", "blue", "circle",
         "square", "on", "left", "right", "?", "."]
N_ADDED = 10  # [PAD] and the nine specials (<|soi|> ... <|lvg|>)
# the tiny towers and the tiny VQ the tests build (dinosiglip size "tiny": 56 px, a 4x4 grid, 32 + 48 wide)
VISION_DIM = 32 + 48
VQ_PARAMS = dict(ch=16, ch_mult=[1, 2, 2], num_res_blocks=1, z_channels=8, codebook_embed_dim=8)
VQ_DOWNSAMPLE = {"tiny": 4, "full": 16}  # LlamaGen VQ-16 downsamples by 16


@dataclass(frozen=True)
class Dims:
    """The released model's dimensions, shrunk. Names as mamba_ssm's Mamba2 and OmniMamba's code use them."""

    d_model: int = 32
    n_layer: int = 2
    d_state: int = 8
    headdim: int = 8
    expand: int = 2
    d_conv: int = 4
    lora_r: int = 8
    codebook_size: int = 64
    caption_tokens: int = 68
    image_size: int = 16  # VQ pixels: a 4x4 code grid with the tiny VQ's downsampling by 4
    mmu_rows: int = 48
    vision_dim: int = VISION_DIM
    base_vocab: int = 4 + 2 * len(WORDS)  # the tokenizer.json's own ids (tokenizer_vocab)
    parts: str = "tiny"  # the vision towers and the VQ: "tiny" for tests, "full" as released

    @staticmethod
    def release() -> "Dims":
        """OmniMamba-1.3B as released: 2048 wide, 48 layers, 50277 + 10 tokens in 50288 rows, 16384 codes."""
        return Dims(d_model=2048, n_layer=48, d_state=128, headdim=64, codebook_size=16384, image_size=256,
                    mmu_rows=1500, vision_dim=1024 + 1152, base_vocab=50277, parts="full")

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def nheads(self) -> int:
        return self.d_inner // self.headdim

    @property
    def vocab_rows(self) -> int:
        return -(-(self.base_vocab + N_ADDED) // 16) * 16

    @property
    def n_codes(self) -> int:
        return (self.image_size // VQ_DOWNSAMPLE[self.parts]) ** 2

    @property
    def t2i_rows(self) -> int:
        return self.caption_tokens + 4 + self.n_codes + 1  # 329 = 72 + 256 + 1 in the release


def official_shapes(d: Dims) -> dict[str, tuple[int, ...]]:
    """Every name of the released file with its shape at dimensions ``d``."""
    D, di, gs = d.d_model, d.d_inner, d.d_state  # ngroups 1
    shapes: dict[str, tuple[int, ...]] = {
        P + "img_embeddings.word_embeddings.weight": (d.codebook_size, D),
        P + "img_embeddings.project_in.projector.0.weight": (4 * D, D),
        P + "img_embeddings.project_in.projector.0.bias": (4 * D,),
        P + "img_embeddings.project_in.projector.2.weight": (D, 4 * D),
        P + "img_embeddings.project_in.projector.2.bias": (D,),
        P + "img_embeddings.project_in.projector.4.weight": (D, D),
        P + "img_embeddings.project_in.projector.4.bias": (D,),
        P + "pos_embed": (1, d.t2i_rows, D),
        P + "caption_embed.cap_proj.fc1.weight": (D, D),
        P + "caption_embed.cap_proj.fc2.weight": (D, D),
        P + "mmu_pos_embed": (1, d.mmu_rows, D),
        P + "embedding.weight": (d.vocab_rows, D),
    }
    d_in_proj = 2 * di + 2 * gs + d.nheads
    for i in range(d.n_layer):
        m = f"{P}layers.{i}.mixer."
        shapes[f"{P}layers.{i}.norm.weight"] = (D,)
        shapes[m + "in_proj.weight"] = (d_in_proj, D)
        for task in TASKS:
            shapes[m + f"in_proj.{task}_lora_A0.weight"] = (d.lora_r, D)
            shapes[m + f"in_proj.{task}_lora_B0.weight"] = (d_in_proj, d.lora_r)
        shapes[m + "conv1d.weight"] = (di + 2 * gs, 1, d.d_conv)
        shapes[m + "conv1d.bias"] = (di + 2 * gs,)
        for name in ("dt_bias", "A_log", "D"):
            shapes[m + name] = (d.nheads,)
        shapes[m + "norm.weight"] = (di,)
        shapes[m + "out_proj.weight"] = (D, di)
    shapes[P + "norm_f.weight"] = (D,)
    shapes[IMG_HEAD] = (d.codebook_size, D)
    shapes[LM_HEAD] = (d.vocab_rows, D)
    hidden = 4 * d.vision_dim
    shapes.update({"projector.projector.0.weight": (hidden, d.vision_dim), "projector.projector.0.bias": (hidden,),
                   "projector.projector.2.weight": (D, hidden), "projector.projector.2.bias": (D,),
                   "projector.projector.4.weight": (D, D), "projector.projector.4.bias": (D,)})
    return shapes


def official_state(d: Dims, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random values of a trained model's kind of scale (norm weights near 1, A and dt in Mamba-2's init ranges,
    LoRA B nonzero), rounded to fp16 as the release stores them."""
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, shape in official_shapes(d).items():
        if name in (LM_HEAD, IMG_HEAD):
            continue
        if name.endswith(("norm.weight", "norm_f.weight")):
            t = 1 + 0.1 * torch.randn(shape, generator=g)
        elif name.endswith("A_log"):
            t = torch.empty(shape).uniform_(1, 16, generator=g).log()
        elif name.endswith("dt_bias"):
            dt = torch.empty(shape).uniform_(0.001, 0.1, generator=g)
            t = dt + torch.log(-torch.expm1(-dt))  # inverse softplus
        elif name.endswith(".D"):
            t = 1 + 0.1 * torch.randn(shape, generator=g)
        elif name.endswith("bias"):
            t = 0.1 * torch.randn(shape, generator=g)
        elif name in (P + "embedding.weight", P + "img_embeddings.word_embeddings.weight"):
            # rows of one norm: no row wins every argmax of a tied head, so greedy sequences vary
            t = torch.randn(shape, generator=g)
            t = t / t.norm(dim=-1, keepdim=True) * shape[-1] ** 0.5
        elif "pos_embed" in name:
            t = torch.randn(shape, generator=g)
        else:  # matrices: unit-variance outputs
            t = torch.randn(shape, generator=g) / shape[-1] ** 0.5
        state[name] = t.half()
    state[LM_HEAD] = state[P + "embedding.weight"].clone()  # untied copies, as the release holds
    state[IMG_HEAD] = state[P + "img_embeddings.word_embeddings.weight"].clone()
    return state


def write_checkpoint(path: Path, state: dict[str, torch.Tensor]) -> Path:
    torch.save(dict(state), path)
    return path


def tokenizer_vocab(size: int = 0) -> dict[str, int]:
    """id 0 <|endoftext|>, then each word bare and after a space (as GPT-2-style pieces), then whitespace runs, then
    filler pieces up to ``size`` ids."""
    pieces = [p for w in WORDS for p in (w, " " + w)] + [" ", "\n"]
    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{p: i + 2 for i, p in enumerate(pieces)}}
    vocab.update({f"filler{i}": i for i in range(len(vocab), size)})
    return vocab


def write_tokenizer(path: Path, size: int = 0) -> Path:
    """A WordLevel tokenizer.json whose pieces keep their leading space (so "a ?b" and "a ? b" differ, as with
    GPT-NeoX-20B's BPE); id 0 <|endoftext|>; no BOS/EOS added."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(tokenizer_vocab(size), unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r" ?\w+| ?[^\w\s]+|\s+"), behavior="isolated")
    tok.decoder = decoders.Fuse()  # the pieces carry their spaces
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    tok.save(str(path))
    return path


def write_vq(path: Path, d: Dims, seed: int = 1) -> dict[str, torch.Tensor]:
    """LlamaGen's file: ``{"model": state}`` with its 65536-entry usage record (``d.parts`` "full": VQ-16's sizes)."""
    import omnicore

    torch.manual_seed(seed)
    params = VQ_PARAMS if d.parts == "tiny" else {}
    vq = omnicore.create("image_tokenizer", "vqgan", codebook_size=d.codebook_size, **params)
    state = {k: torch.randn_like(v) * 0.2 for k, v in vq.state_dict().items() if k != "quantize.codebook_used"}
    state["quantize.codebook_used"] = torch.zeros(65536)
    torch.save({"model": state}, path)
    return state


def write_towers(directory: Path, seed: int = 2, size: str = "tiny") -> tuple[Path, Path]:
    """DINOv2 (timm names, safetensors) and SigLIP (open_clip names: ``visual.trunk.*``, a text tower beside);
    ``size`` "full": ViT-L/14-reg4 at its released 518 px (37x37 positions, which loading resamples to 27x27) and
    SO400M/14 at 384 px."""
    import omnicore
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    dino = omnicore.create("encoder", "dinov2", size=size, **({"image_size": 518} if size == "full" else {}))
    dino = dino.model.state_dict()
    siglip = omnicore.create("encoder", "siglip", size=size).model.state_dict()
    dino = {k: (torch.randn_like(v) * 0.2 if v.is_floating_point() else v).contiguous() for k, v in dino.items()}
    siglip = {k: torch.randn_like(v) * 0.2 if v.is_floating_point() else v for k, v in siglip.items()}
    dino_path, siglip_path = directory / "dinov2.safetensors", directory / "open_clip_pytorch_model.bin"
    save_file(dino, str(dino_path))
    torch.save({**{f"visual.trunk.{k}": v for k, v in siglip.items()},
                "text.token_embedding.weight": torch.randn(10, 8), "logit_scale": torch.tensor(2.3)}, siglip_path)
    return dino_path, siglip_path


@dataclass
class OfficialFiles:
    dims: Dims
    checkpoint: Path
    tokenizer: Path
    vq: Path
    dino: Path
    siglip: Path
    state: dict[str, torch.Tensor] = field(repr=False)


def write_all(directory: Path, dims: Dims = Dims(), seed: int = 0) -> OfficialFiles:
    directory.mkdir(parents=True, exist_ok=True)
    state = official_state(dims, seed)
    checkpoint = write_checkpoint(directory / f"OmniMamba-{dims.parts}.pth", state)
    (directory / "tokenizer").mkdir(exist_ok=True)
    tokenizer = write_tokenizer(directory / "tokenizer" / "tokenizer.json", dims.base_vocab)
    vq = directory / "vq_ds16_t2i.pt"
    write_vq(vq, dims)
    dino, siglip = write_towers(directory, size=dims.parts)
    return OfficialFiles(dims, checkpoint, tokenizer, vq, dino, siglip, state)
