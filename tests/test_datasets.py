"""Dataset plugins: synthetic shapes, shape analysis, LLaVA JSON, T2I JSONL, image+caption folders, registry."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

import omnicore
from omnicore.plugins.datasets import (COLORS, HELDOUT, POSITIONS, SHAPES, DatasetError, analyze_shape_image,
                                       render, score_t2i, write_t2i_jsonl)
from omnicore.plugins.datasets.synthetic import ALL_COMBOS, QUESTIONS, TRAIN_COMBOS, SyntheticShapes
from omnicore.plugins.datasets.llava import LlavaJson
from omnicore.plugins.datasets.t2i_jsonl import ImageCaptionFolder, T2IJsonl


# ---------------------------------------------------------------- synthetic_shapes

def test_synthetic_is_deterministic_per_seed_split_index():
    a, b = SyntheticShapes("mmu", 20, seed=3), SyntheticShapes("mmu", 50, seed=3)
    for i in range(20):
        x, y = a[i], b[i]
        assert x["turns"] == y["turns"] and x["meta"] == y["meta"]
        assert np.array_equal(np.asarray(x["image"]), np.asarray(y["image"]))
    assert a[5]["meta"] == a[5]["meta"]
    other = SyntheticShapes("mmu", 20, seed=4)
    assert [a[i]["meta"] for i in range(20)] != [other[i]["meta"] for i in range(20)]
    # mmu and t2i views of the same (seed, split, i) show the same image
    t = SyntheticShapes("t2i", 20, seed=3)
    assert np.array_equal(np.asarray(t[7]["image"]), np.asarray(a[7]["image"]))


def test_heldout_combinations_are_exclusive():
    assert len(HELDOUT) == 4 and set(HELDOUT) <= set(ALL_COMBOS) and len(ALL_COMBOS) == 24
    for i, values in enumerate((COLORS, SHAPES, POSITIONS)):  # every attribute still seen in training
        assert {c[i] for c in TRAIN_COMBOS} == set(values)
    train = SyntheticShapes("t2i", 3000, split="train", seed=0)
    seen = {train.attributes(i) for i in range(len(train))}
    assert not seen & set(HELDOUT)
    assert seen == set(TRAIN_COMBOS)
    held = SyntheticShapes("mmu", 400, split="heldout", seed=5)
    seen_held = {held.attributes(i) for i in range(len(held))}
    assert seen_held == set(HELDOUT)
    for i in range(0, 400, 37):  # attributes() agrees with the samples
        m = held[i]["meta"]
        assert (m["color"], m["shape"], m["position"]) == held.attributes(i)


def test_partial_captions_name_only_some_attributes_of_training_images():
    full = SyntheticShapes("t2i", 400, seed=1)
    part = SyntheticShapes("t2i", 400, seed=1, partial_captions=0.5)
    forms, n_partial = set(), 0
    for i in range(400):
        a, b = full[i], part[i]
        assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))  # same images as without
        m = b["meta"]
        assert (m["color"], m["shape"], m["position"]) in TRAIN_COMBOS
        if b["caption"] == a["caption"]:
            continue
        n_partial += 1
        words = b["caption"].split()
        named = (m["color"] in words, m["shape"] in words, m["position"] in words)
        assert 0 < sum(named) < 3, b["caption"]
        assert b["caption"].startswith("a ") and ("shape" in words) == (not named[1])
        forms.add(named)
    assert 150 < n_partial < 250 and len(forms) == 6  # about half, every kind of subset
    assert part[17]["caption"] == SyntheticShapes("t2i", 400, seed=1, partial_captions=0.5)[17]["caption"]
    with pytest.raises(omnicore.ParamError, match="partial_captions"):
        SyntheticShapes("t2i", 5, partial_captions=1.5)
    with pytest.raises(omnicore.ParamError, match="partial_captions"):
        SyntheticShapes("mmu", 5, partial_captions=0.3)


def test_contrastive_pairs_match_partial_captions_to_every_image_they_describe():
    from omnicore.training.trainer import _ImagesAndCaptions

    tok = omnicore.create("text_tokenizer", "byte")
    collate = _ImagesAndCaptions(lambda image: torch.zeros(3, 8, 8), tok, max_tokens=32)
    ds = SyntheticShapes("t2i", 200, seed=3, partial_captions=0.6)
    samples = [ds[i] for i in range(40)]
    positive = collate(samples)["positive"]
    for i, image in enumerate(samples):  # row: an image; column: a caption
        m = image["meta"]
        for j, cap in enumerate(samples):
            words = cap["caption"].split()
            true_of_image = all(w in (m["color"], m["shape"], m["position"]) for w in words
                                if w in COLORS or w in SHAPES or w in POSITIONS)
            assert bool(positive[i, j]) == true_of_image, (m, cap["caption"])
    assert positive.sum() > positive.diagonal().sum() + 20  # partial captions match several images
    # samples without tags: equal captions match, as before
    plain = [{"image": Image.new("RGB", (8, 8)), "caption": c} for c in ("a b", "c", "a b")]
    assert collate(plain)["positive"].tolist() == [[True, False, True], [False, True, False], [True, False, True]]


def test_sample_formats():
    t = SyntheticShapes("t2i", 30, image_size=32)
    for i in range(30):
        s = t[i]
        m = s["meta"]
        assert s["task"] == "t2i" and s["codes"] is None
        assert s["caption"] == f"a {m['color']} {m['shape']} on the {m['position']}"
        assert s["image"].mode == "RGB" and s["image"].size == (32, 32)
    m1 = SyntheticShapes("mmu", 30)
    answers_for = {QUESTIONS["color"]: "color", QUESTIONS["shape"]: "shape", QUESTIONS["position"]: "position"}
    for i in range(30):
        s = m1[i]
        assert s["task"] == "mmu" and len(s["turns"]) == 1
        turn = s["turns"][0]
        assert turn["answer"] == s["meta"][answers_for[turn["question"]]]
    assert {m1[i]["turns"][0]["question"] for i in range(30)} == set(QUESTIONS.values())
    m3 = SyntheticShapes("mmu", 5, questions_per_sample=3, image_size=48)
    s = m3[2]
    assert s["image"].size == (48, 48)
    expected = [{"question": "What color is the shape?", "answer": s["meta"]["color"]},
                {"question": "What shape is it?", "answer": s["meta"]["shape"]},
                {"question": "Is the shape on the left or the right?", "answer": s["meta"]["position"]}]
    assert sorted(s["turns"], key=str) == sorted(expected, key=str)
    # the order varies between samples, so the turn number says nothing about the answer
    assert len({m3[i]["turns"][0]["question"] for i in range(5)}) > 1
    with pytest.raises(IndexError):
        m3[5]


@pytest.mark.parametrize("image_size", [32, 64])
def test_render_stays_in_its_half(image_size):
    for trial in range(10):
        for color, shape, position in ALL_COMBOS:
            arr = np.asarray(render(color, shape, position, image_size, random.Random(trial)))
            cols = np.nonzero((arr != 255).any(axis=(0, 2)))[0]
            assert cols.size
            if position == "left":
                assert cols.max() < image_size // 2
            else:
                assert cols.min() >= image_size - image_size // 2
            pixels = np.unique(arr.reshape(-1, 3), axis=0)
            assert {tuple(int(v) for v in p) for p in pixels} == {(255, 255, 255), COLORS[color]}


# ---------------------------------------------------------------- shape analysis

def _degrade(image: Image.Image, blur: float, down: int, noise: float, seed: int) -> np.ndarray:
    size = image.size[0]
    out = image.filter(ImageFilter.GaussianBlur(blur)).resize((down, down), Image.BILINEAR)
    out = np.asarray(out.resize((size, size), Image.BICUBIC), dtype=np.float64)
    out += np.random.default_rng(seed).normal(0.0, noise, out.shape)
    return np.clip(out, 0, 255).astype(np.uint8)


def test_analyze_recovers_all_combos():
    for trial in range(3):
        for color, shape, position in ALL_COMBOS:
            image = render(color, shape, position, 32, random.Random(trial))
            assert analyze_shape_image(image) == {"color": color, "position": position}
            # ndarray inputs: uint8 HWC, float [0, 1] CHW, float [-1, 1] HWC
            arr = np.asarray(image)
            assert analyze_shape_image(arr)["color"] == color
            assert analyze_shape_image(np.moveaxis(arr / 255.0, -1, 0)) == {"color": color, "position": position}
            assert analyze_shape_image(arr / 127.5 - 1.0)["position"] == position


@pytest.mark.parametrize("blur,down,noise", [(1.0, 16, 12.0), (1.5, 8, 20.0), (2.0, 6, 25.0)])
def test_analyze_robust_to_degradation(blur, down, noise):
    for trial in range(3):
        for color, shape, position in ALL_COMBOS:
            image = render(color, shape, position, 32, random.Random(100 + trial))
            got = analyze_shape_image(_degrade(image, blur, down, noise, seed=trial))
            assert got == {"color": color, "position": position}, (color, shape, position)


def test_analyze_blank_and_score():
    blank = {"color": None, "position": None}
    assert analyze_shape_image(Image.new("RGB", (32, 32), "white")) == blank
    noisy = np.clip(255 + np.random.default_rng(0).normal(0, 10, (32, 32, 3)), 0, 255).astype(np.uint8)
    assert analyze_shape_image(noisy) == blank
    ds = SyntheticShapes("t2i", 8, split="heldout")
    samples = [ds[i] for i in range(8)]
    images = [s["image"] for s in samples]
    assert score_t2i(images, [s["meta"] for s in samples])["color_acc"] == 1.0
    assert ds.score_images(images, samples) == {"color_acc": 1.0, "position_acc": 1.0, "both_acc": 1.0,
                                                "detected": 1.0}
    # flipped left/right: colours still right, positions all wrong; a blank image scores nothing
    flipped = [im.transpose(Image.FLIP_LEFT_RIGHT) for im in images[:-1]] + [Image.new("RGB", (32, 32), "white")]
    scores = score_t2i(flipped, samples)
    assert scores["color_acc"] == 7 / 8 and scores["position_acc"] == 0.0 and scores["detected"] == 7 / 8


# ---------------------------------------------------------------- llava_json

def _write_llava(tmp_path, records, name="data.json"):
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return path


def test_llava_json_parses_images_and_text_only(tmp_path):
    images = tmp_path / "imgs"
    (images / "sub").mkdir(parents=True)
    Image.new("L", (8, 6), 90).save(images / "sub" / "a.png")
    records = [
        {"id": "r0", "image": "sub/a.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A grey box."},
            {"from": "human", "value": "Is it big?"}, {"from": "gpt", "value": "No."}]},
        {"id": "r1", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "hi"}]},
    ]
    ds = omnicore.create("dataset", "llava_json", json_path=str(_write_llava(tmp_path, records)),
                         image_folder=str(images))
    assert len(ds) == 2
    s = ds[0]
    assert s["task"] == "mmu" and s["image"].mode == "RGB" and s["image"].size == (8, 6)
    assert s["turns"] == [{"question": "What is this?", "answer": "A grey box."},
                          {"question": "Is it big?", "answer": "No."}]
    assert s["meta"]["id"] == "r0"
    t = ds[1]
    assert t["image"] is None and t["turns"] == [{"question": "Say hi.", "answer": "hi"}]


def test_llava_json_errors(tmp_path):
    bad = [{"id": "ok", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
           {"id": "x", "conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]}]
    path = _write_llava(tmp_path, bad)
    with pytest.raises(DatasetError, match=r"data\.json: record 1 .*conversations\[0\].*'human'"):
        LlavaJson(str(path))
    odd = [{"conversations": [{"from": "human", "value": "q"}]}]
    with pytest.raises(DatasetError, match="record 0"):
        LlavaJson(str(_write_llava(tmp_path, odd, "odd.json")))
    with pytest.raises(FileNotFoundError, match="nope.json"):
        LlavaJson(str(tmp_path / "nope.json"))
    missing = [{"image": "gone.png", "conversations": [{"from": "human", "value": "<image>q"},
                                                      {"from": "gpt", "value": "a"}]}]
    ds = LlavaJson(str(_write_llava(tmp_path, missing, "m.json")))
    with pytest.raises(FileNotFoundError, match="gone.png") as info:
        ds[0]
    assert isinstance(info.value, omnicore.OmnicoreError) and "\n" not in str(info.value)


# ---------------------------------------------------------------- t2i_jsonl / image_caption_folder

def test_t2i_jsonl_round_trip(tmp_path):
    import torch

    path = tmp_path / "out" / "codes.jsonl"
    records = [{"caption": "a red circle on the left", "codes": [1, 2, 3, 4]},
               {"caption": "a blue square on the right", "codes": np.array([5, 6, 7, 8])},
               {"caption": "a green triangle on the left", "codes": torch.tensor([[9, 10], [11, 12]])}]
    assert write_t2i_jsonl(path, records) == 3
    assert [p.name for p in path.parent.iterdir()] == ["codes.jsonl"]  # no temp file left
    ds = omnicore.create("dataset", "t2i_jsonl", path=str(path), num_codes=4)
    assert len(ds) == 3
    s = ds[2]
    assert s == {"task": "t2i", "caption": "a green triangle on the left", "image": None,
                 "codes": [9, 10, 11, 12], "meta": s["meta"]}
    assert type(s["codes"][0]) is int and ds[1]["codes"] == [5, 6, 7, 8]
    # a failing write leaves the old file alone
    with pytest.raises(DatasetError, match="record 1"):
        write_t2i_jsonl(path, [{"caption": "x", "codes": [1]}, {"caption": 3, "codes": [1]}])
    assert len(T2IJsonl(str(path))) == 3 and len(list(path.parent.iterdir())) == 1


def test_t2i_jsonl_bad_line_names_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"caption": "a", "codes": [1, 2]}\n\n{"caption": "b", "codes": [1, 2]\n')
    with pytest.raises(DatasetError, match=r"bad\.jsonl:3: invalid JSON"):
        T2IJsonl(str(path))
    path.write_text('{"caption": "a", "codes": [1, 2]}\n{"caption": "b", "codes": [1, "x"]}\n')
    with pytest.raises(DatasetError, match=r"bad\.jsonl:2: .*integers"):
        T2IJsonl(str(path))
    path.write_text('{"caption": "a", "codes": [1, 2]}\n{"caption": "b", "codes": [1, 2, 3]}\n')
    with pytest.raises(DatasetError, match=r"bad\.jsonl:2: 3 codes, expected 2"):
        T2IJsonl(str(path), num_codes=2)
    with pytest.raises(FileNotFoundError, match="absent.jsonl"):
        omnicore.create("dataset", "t2i_jsonl", path=str(tmp_path / "absent.jsonl"))


def test_image_caption_folder(tmp_path):
    for i, color in enumerate(("red", "blue")):
        render(color, "square", "left", 32).save(tmp_path / f"img{i}.png")
        (tmp_path / f"img{i}.txt").write_text(f"a {color} square on the left\n")
    ds = omnicore.create("dataset", "image_caption_folder", folder=str(tmp_path))
    assert len(ds) == 2
    s = ds[1]
    assert s["task"] == "t2i" and s["caption"] == "a blue square on the left" and s["codes"] is None
    assert s["image"].size == (32, 32) and s["image"].mode == "RGB"
    # the pretokenize flow: folder -> codes -> JSONL -> t2i_jsonl
    out = tmp_path / "codes.jsonl"
    write_t2i_jsonl(out, ({"caption": ds[i]["caption"], "codes": [i] * 4} for i in range(len(ds))))
    assert [T2IJsonl(str(out))[i]["caption"] for i in range(2)] == [ds[0]["caption"], ds[1]["caption"]]
    # captions.jsonl takes precedence; a missing caption file is an error naming the image
    (tmp_path / "captions.jsonl").write_text(json.dumps({"image": "img0.png", "caption": "only one"}) + "\n")
    assert [ImageCaptionFolder(str(tmp_path))[0]["caption"]] == ["only one"]
    (tmp_path / "captions.jsonl").unlink()
    Image.new("RGB", (4, 4)).save(tmp_path / "lonely.jpg")
    with pytest.raises(DatasetError, match="lonely.jpg"):
        ImageCaptionFolder(str(tmp_path))


# ---------------------------------------------------------------- registry

def test_registry_builds_and_checks_params():
    names = {c.name for c in omnicore.list_components("dataset")}
    assert {"synthetic_shapes", "llava_json", "t2i_jsonl", "image_caption_folder"} <= names
    ds = omnicore.create("dataset", "synthetic_shapes", task="mmu", size=10)
    assert len(ds) == 10 and ds[9]["task"] == "mmu"
    with pytest.raises(omnicore.ParamError, match="task"):
        omnicore.create("dataset", "synthetic_shapes", task="vqa", size=10)
    with pytest.raises(omnicore.ParamError, match="sizes"):
        omnicore.create("dataset", "synthetic_shapes", task="mmu", size=10, sizes=10)
    with pytest.raises(omnicore.ParamError, match="questions_per_sample"):
        omnicore.create("dataset", "synthetic_shapes", task="mmu", size=10, questions_per_sample=5)
    with pytest.raises(omnicore.ParamError, match="split"):
        omnicore.create("dataset", "synthetic_shapes", task="t2i", size=10, split="test")
