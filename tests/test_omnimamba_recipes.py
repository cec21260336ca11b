"""recipes/omnimamba-1.3b/: the model they describe is the converted release's, and the fine-tune recipes train a
converted model (at a reduced width) whose export converts back to the same tensors and the same greedy outputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import omnicore
from omnicore.cli.main import main
from omnicore.convert.omnimamba import OmniMambaDims, release_spec
from omnicore.convert.strict import shapes
from omnicore.generation.engine import generate_codes, generate_text
from omnicore.generation.sampling import Sampling
from omnicore.model.unified import _strip_weight_params, build_from_spec
from omnicore.recipe import load_recipe

sys.path.insert(0, str(Path(__file__).parent))
from omnimamba_files import WORDS, write_all, write_tokenizer  # noqa: E402

torch.set_num_threads(2)
RELEASE = OmniMambaDims(d_model=2048, n_layer=48, d_inner=4096, d_state=128, nheads=64, d_conv=4, lora_r=8,
                        vocab_rows=50288, codebook_size=16384, caption_hidden=2048, t2i_rows=329, mmu_rows=1500,
                        vision_dim=2176, vision_hidden=8704)


@pytest.mark.parametrize("recipe", ["omnimamba-1.3b/stage1_mmu", "omnimamba-1.3b/finetune_mmu",
                                    "omnimamba-1.3b/finetune_t2i", "omnimamba-1.3b/stage2_unified"])
def test_the_recipes_model_has_every_tensor_of_the_converted_release(recipe, tmp_path):
    """Built on the meta device (no memory): the same names and shapes, so a converted model is the recipes'
    ``init_from`` with nothing missing, extra or misshapen."""
    tokenizer = write_tokenizer(tmp_path / "tokenizer.json", 50277)  # GPT-NeoX-20B's 50277 ids
    model = load_recipe(recipe).data["model"]
    for spec in [model.get(k) for k in ("encoder", "image_tokenizer")]:
        _strip_weight_params(spec)
    model["text_tokenizer"]["params"]["path"] = str(tokenizer)
    converted = release_spec(RELEASE, tokenizer, {}, 256, 1500 - 733, mmu_template=model["mmu_template"])
    with torch.device("meta"):
        ours = shapes(build_from_spec(model).state_dict())
        release = shapes(build_from_spec(converted).state_dict())
    assert ours == release, sorted(set(ours.items()) ^ set(release.items()))[:5]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    files = write_all(tmp_path_factory.mktemp("release"), seed=1)
    out = tmp_path_factory.mktemp("converted") / "model"
    assert main(_convert_args(files, files.checkpoint, out)) == 0
    return files, out


def _convert_args(files, checkpoint: Path, out: Path) -> list[str]:
    return ["convert", "omnimamba", "--checkpoint", str(checkpoint), "--tokenizer", str(files.tokenizer),
            "--vq", str(files.vq), "--dino", str(files.dino), "--siglip", str(files.siglip), "--out", str(out),
            "--vision-size", "tiny"]


def _model_override(converted: Path) -> str:
    """The recipes' model block replaced by the converted (reduced-width) model's, as one override."""
    spec = json.loads((converted / "config.json").read_text())["model"]
    params = spec["text_tokenizer"]["params"]
    params["path"] = params["path"].replace("@model_dir", str(converted))  # the tokenizer the directory bundles
    return "model=" + json.dumps(spec)


def _rounded(model) -> dict[str, torch.Tensor]:
    """The model's language side and projector as the export stores them (fp16), back in fp32."""
    return {k: (v.half().float() if not k.startswith(("encoder.", "image_tokenizer.")) else v)
            for k, v in model.state_dict().items()}


def _t2i_data(tmp_path: Path, n_codes: int, codebook: int) -> Path:
    g = torch.Generator().manual_seed(3)
    path = tmp_path / "t2i.jsonl"
    with path.open("w") as fh:
        for i in range(8):
            caption = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(4))
            codes = torch.randint(0, codebook, (n_codes,), generator=g).tolist()
            fh.write(json.dumps({"caption": caption, "codes": codes}) + "\n")
    return path


def _mmu_data(tmp_path: Path) -> tuple[Path, Path]:
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    rows = []
    for i, colour in enumerate(["red", "blue", "red", "blue"]):
        Image.new("RGB", (40, 40), colour).save(folder / f"{i}.png")
        rows.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat colour is the shape ?"}, {"from": "gpt", "value": colour}]})
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(rows))
    return path, folder


@pytest.mark.parametrize("task", ["t2i", "mmu"])
def test_finetune_recipe_trains_a_converted_model_that_exports_and_converts_back(release, task, tmp_path):
    files, converted = release
    stage = f"finetune_{task}"
    if task == "t2i":
        data = [f"stages.{stage}.tasks.t2i.data.params.path={_t2i_data(tmp_path, files.dims.n_codes, 64)}"]
    else:
        json_path, folder = _mmu_data(tmp_path)
        data = [f"stages.{stage}.tasks.mmu.data.params.json_path={json_path}",
                f"stages.{stage}.tasks.mmu.data.params.image_folder={folder}"]
    run = tmp_path / "run"
    args = ["recipe", "run", f"omnimamba-1.3b/{stage}", _model_override(converted), *data,
            f"stages.{stage}.init_from={converted}", f"stages.{stage}.tasks.{task}.batch_size=2",
            f"stages.{stage}.tasks.{task}.data.num_workers=0", f"stages.{stage}.steps=3",
            f"stages.{stage}.schedule.warmup_steps=1", f"stages.{stage}.precision=fp32",
            f"stages.{stage}.optimizer.lr=0.01", "--run-dir", str(run), "--device", "cpu"]
    assert main(args) == 0
    trained, before = omnicore.load(run / "model"), omnicore.load(converted)
    adapter = f"backbone.layers.0.mixer.in_proj.lora_B.{task}.weight"
    assert not torch.equal(trained.state_dict()[adapter], before.state_dict()[adapter])  # it trained
    frozen = "backbone.layers.1.mixer.in_proj.base_layer.weight"  # started from the converted model, kept frozen
    assert torch.equal(trained.state_dict()[frozen], before.state_dict()[frozen])

    exported = tmp_path / "OmniMamba-finetuned.pth"
    assert main(["export", "omnimamba", str(run / "model"), "--out", str(exported)]) == 0
    back_dir = tmp_path / "back"
    assert main(_convert_args(files, exported, back_dir)) == 0
    back = omnicore.load(back_dir)
    expected = _rounded(trained)
    got = back.state_dict()
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    again = tmp_path / "again.pth"  # and out again: the same file
    assert main(["export", "omnimamba", str(back_dir), "--out", str(again)]) == 0
    first, second = torch.load(exported, weights_only=True), torch.load(again, weights_only=True)
    assert set(first) == set(second) and all(torch.equal(first[k], second[k]) for k in first)

    trained.load_state_dict(expected)  # the fine-tuned model with the weights the export holds
    if task == "t2i":
        s = Sampling(greedy=True)
        caption = "a red circle on the left"
        assert torch.equal(generate_codes(back, [caption], 1.0, s), generate_codes(trained, [caption], 1.0, s))
    else:
        q = [back.layout.question_ids("what colour is the shape ?")]
        s = Sampling(greedy=True, max_new_tokens=8, ignore_eos=True)
        pixels = torch.rand(1, 3, back.encoder.image_size, back.encoder.image_size)
        assert generate_text(back, pixels, None, q, s) == generate_text(trained, pixels, None, q, s)


def test_models_without_the_releases_parts_do_not_export(release, tmp_path, capsys):
    """The quick start's model (its own ViT, byte tokenizer, pooled caption, contrastive tower) has no place in the
    release's file: exit 2 with the reason, and no file written. So has a converted model given an extra head."""
    quick = omnicore.build("quickstart")
    quick.save(tmp_path / "quick")
    out = tmp_path / "quick.pth"
    assert main(["export", "omnimamba", str(tmp_path / "quick"), "--out", str(out)]) == 2
    assert "model.encoder is 'timm_vit'" in capsys.readouterr().err and not out.exists()

    _, converted = release
    spec = json.loads((converted / "config.json").read_text())["model"]
    spec["text_tokenizer"]["params"]["path"] = spec["text_tokenizer"]["params"]["path"].replace(
        "@model_dir", str(converted))
    spec["heads"]["caption_pool"] = {"type": "caption_pool"}
    extra = build_from_spec(spec)
    missing, _ = extra.load_state_dict(omnicore.load(converted).state_dict(), strict=False)
    assert all(m.startswith("heads.caption_pool.") for m in missing)
    extra.save(tmp_path / "extra")
    assert main(["export", "omnimamba", str(tmp_path / "extra"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "heads.caption_pool has no place in the OmniMamba release's layout" in err and len(err.splitlines()) == 1
    assert not out.exists()
