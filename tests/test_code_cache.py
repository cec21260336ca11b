"""T2I images encoded once per stage (frozen tokenizer) train exactly like images encoded at every draw."""

from __future__ import annotations

import json
import os

import torch
from rich.console import Console

import omnicore
from omnicore.runner import run_recipe
from omnicore.training.code_cache import WithCodes, encode_dataset, worth_caching

# tokenizer (3 steps) then stage 1 T2I alone: 4 steps x batch 4 draw the 16-sample dataset once
T2I_ONLY = ["~stages.encoder", "~stages.stage1_mmu", "~stages.stage2_unified", "~evaluation",
            "stages.tokenizer.steps=3", "stages.tokenizer.batch_size=8", "stages.stage1_t2i.steps=4",
            "stages.stage1_t2i.tasks.t2i.batch_size=4", "stages.stage1_t2i.tasks.t2i.data.params.size=16"]


def quiet() -> Console:
    return Console(file=open(os.devnull, "w"))


def test_cached_codes_train_exactly_like_per_step_encoding(tmp_path):
    cached = run_recipe("quickstart", T2I_ONLY, run_dir=tmp_path / "cached", console=quiet())
    plain = run_recipe("quickstart", T2I_ONLY + ["stages.stage1_t2i.cache_codes=false"], run_dir=tmp_path / "plain",
                       console=quiet())
    losses = {}
    for name in ("cached", "plain"):
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [r["loss_t2i"] for r in rows if r.get("stage") == "stage1_t2i" and "loss_t2i" in r]
    assert losses["cached"] and losses["cached"] == losses["plain"]
    a, b = (omnicore.load(run / "model").state_dict() for run in (cached, plain))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_encode_dataset_matches_the_tokenizer_and_keeps_order():
    torch.manual_seed(0)
    model = omnicore.build("quickstart").eval()
    ds = omnicore.create("dataset", "synthetic_shapes", task="t2i", size=5, image_size=32)
    seen = []
    codes = encode_dataset(ds, 32, model.images_to_codes, seen.append)
    from omnicore.training.data import image_to_tensor

    direct = model.images_to_codes(torch.stack([image_to_tensor(ds[i]["image"], 32) for i in range(5)]))
    assert codes.shape == (5, model.num_image_codes) and torch.equal(codes.long(), direct.long())
    assert sum(seen) == 5
    wrapped = WithCodes(ds, codes)
    assert wrapped[3]["codes"] == direct[3].tolist() and wrapped[3]["caption"] == ds[3]["caption"]


def test_caching_is_chosen_only_when_it_saves_work():
    ds = omnicore.create("dataset", "synthetic_shapes", task="t2i", size=10, image_size=32)
    assert worth_caching(None, ds, samples_drawn=10, tokenizer_frozen=True)
    assert not worth_caching(None, ds, samples_drawn=9, tokenizer_frozen=True)  # most images never drawn
    assert not worth_caching(None, ds, samples_drawn=100, tokenizer_frozen=False)  # codes would go stale
    assert not worth_caching(False, ds, samples_drawn=100, tokenizer_frozen=True)
    assert worth_caching(True, ds, samples_drawn=1, tokenizer_frozen=True)
    pretokenized = WithCodes(ds, torch.zeros(10, 16, dtype=torch.int32))
    assert not worth_caching(True, pretokenized, samples_drawn=100, tokenizer_frozen=True)  # codes already there
