"""The unified model end to end on the quick-start recipe, shrunk: build, save/load, run, resume (multi-process
runs and kills: test_distributed.py)."""

from __future__ import annotations

import copy

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

import omnicore
from omnicore.errors import OmnicoreError
from omnicore.runner import run_recipe

# Every stage a few steps, tiny data: the pipeline, not the learning (the quick start itself shows learning).
TINY = ["stages.tokenizer.steps=3", "stages.encoder.steps=3", "stages.encoder.batch_size=8", "stages.stage1_mmu.steps=3", "stages.stage1_t2i.steps=3",
        "stages.stage2_unified.steps=4", "stages.tokenizer.batch_size=8", "stages.stage1_mmu.tasks.mmu.batch_size=4",
        "stages.stage1_t2i.tasks.t2i.batch_size=4", "stages.stage2_unified.tasks.mmu.batch_size=4",
        "stages.stage2_unified.tasks.t2i.batch_size=4",
        "evaluation.mmu.params.size=2", "evaluation.t2i.params.size=2"]


def quiet() -> Console:
    return Console(file=open(os.devnull, "w"))


def omni(*args, env=None):
    return subprocess.run([sys.executable, "-m", "omnicore.cli", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return omnicore.build("quickstart")


def mmu_batch(model, n=2):
    ds = omnicore.create("dataset", "synthetic_shapes", task="mmu", size=n, image_size=32)
    from omnicore.training.data import MMUCollator

    return MMUCollator(model.layout, model.encoder.image_transform(), 32)([ds[i] for i in range(n)])


def t2i_batch(model, n=2):
    ds = omnicore.create("dataset", "synthetic_shapes", task="t2i", size=n, image_size=32)
    from omnicore.training.data import T2ICollator

    return T2ICollator(model.layout, 32, model.num_image_codes)([ds[i] for i in range(n)])


def test_layouts_and_losses(tiny_model):
    m = tiny_model.eval()
    assert m.num_image_codes == 16 and m.mmu_prefix_len == 4 + m.encoder.num_patches
    mb, tb = mmu_batch(m), t2i_batch(m)
    assert (mb["labels"] != -100).any() and tb["prefix_ids"].shape == (2, m.layout.t2i_prefix_len)
    with torch.no_grad():
        lm, lt = m.loss("mmu", mb), m.loss("t2i", tb)
    # untrained: close to uniform over each head's own vocabulary
    assert abs(float(lt) - torch.log(torch.tensor(float(m.image_tokenizer.codebook_size)))) < 1.5
    assert torch.isfinite(lm)


def test_code_balance_reaches_the_t2i_loss(tiny_model):
    """The stage option arrives as forward(batches, options): balance 0 is the plain loss, 1 differs from it."""
    m = tiny_model.eval()
    tb = t2i_batch(m, n=4)
    with torch.no_grad():
        plain = m({"t2i": tb})["t2i"]
        assert torch.equal(m({"t2i": tb}, {"t2i": {"code_balance": 0.0}})["t2i"], plain)
        balanced = m({"t2i": tb}, {"t2i": {"code_balance": 1.0}})["t2i"]
    assert torch.isfinite(balanced) and not torch.allclose(balanced, plain)


def test_tasks_use_their_own_adapters(tiny_model):
    m = tiny_model.eval()
    batch = mmu_batch(m)
    with torch.no_grad():  # make adapters non-trivial (peft starts lora_B at zero)
        for name, p in m.backbone.named_parameters():
            if "lora_B" in name:
                p.add_(0.05 * torch.randn_like(p))
        x = m.mmu_embeddings(batch["pixels"], batch["has_image"], batch["text_ids"], 2)
        assert not torch.allclose(m.backbone(x, task="mmu"), m.backbone(x, task="t2i"))


def test_save_and_load_restore_the_same_model(tiny_model, tmp_path):
    m = tiny_model.eval()
    m.save(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["adapters.safetensors", "config.json",
                                                                  "model.safetensors"]
    loaded = omnicore.load(tmp_path / "m")
    batch = t2i_batch(m)
    with torch.no_grad():
        assert torch.equal(m.loss("t2i", batch), loaded.loss("t2i", batch))
    for (k, a), (k2, b) in zip(m.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k


def test_a_model_saved_in_bfloat16_loads_in_bfloat16(tiny_model, tmp_path):
    """The saved type is kept (a bf16 model served in float32 ran its GPU decoding several times slower);
    ``dtype`` overrides it, and the values are the saved ones either way."""
    m = copy.deepcopy(tiny_model).eval().to(torch.bfloat16)
    m.save(tmp_path / "m")
    loaded = omnicore.load(tmp_path / "m")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    for (k, a), (k2, b) in zip(m.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    wide = omnicore.load(tmp_path / "m", dtype=torch.float32)
    assert {p.dtype for p in wide.parameters()} == {torch.float32}
    assert all(torch.equal(a.float(), b) for a, b in zip(m.state_dict().values(), wide.state_dict().values()))
    with pytest.raises(OmnicoreError, match="floating-point"):
        omnicore.load(tmp_path / "m", dtype=torch.int64)


def test_load_rejects_non_model_dirs(tmp_path):
    with pytest.raises(OmnicoreError, match="not a model directory"):
        omnicore.load(tmp_path)


def test_tiny_quickstart_runs_end_to_end(tmp_path):
    run = tmp_path / "run"
    r = omni("recipe", "run", "quickstart", *TINY, "--run-dir", str(run))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == f"final model: {run / 'model'}"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = {rec["stage"]: rec["step"] for rec in records if "step" in rec}
    assert last == {"tokenizer": 3, "encoder": 3, "stage1_mmu": 3, "stage1_t2i": 3, "stage2_unified": 4}
    starts = {rec["stage"]: rec["trainable"] for rec in records if rec.get("event") == "start"}
    assert set(starts["stage1_t2i"]) == {"heads.image", "heads.caption", "heads.caption_pool", "heads.t2i_positions",
                                         "backbone"}  # backbone: the t2i adapter only
    assert starts["stage1_t2i"]["backbone"] < starts["stage2_unified"]["backbone"]
    assert "encoder" not in starts["stage1_mmu"] and "encoder" not in starts["stage2_unified"]  # pretrained, frozen
    evaluation = json.loads((run / "eval.json").read_text())
    assert 0 <= evaluation["mmu_accuracy"] <= 1 and 0 <= evaluation["t2i_color_acc"] <= 1
    by_question = evaluation["mmu_accuracy_by_question"]  # the three synthetic questions, each scored apart
    assert len(by_question) == 3 and "What shape is it?" in by_question
    # every image is asked all three questions, so the overall accuracy is their mean
    assert abs(sum(by_question.values()) / 3 - evaluation["mmu_accuracy"]) < 1e-9
    assert (run / "eval" / "t2i_samples.png").is_file() and (run / "recipe.yaml").is_file()
    model = omnicore.load(run / "model")
    assert isinstance(model.answer([None], ["What shape is it?"], max_new_tokens=4)[0], str)


def test_rerun_into_existing_run_dir_is_refused(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    r = omni("recipe", "run", "quickstart", *TINY, "--run-dir", str(run))
    assert r.returncode == 2 and "already holds a run" in r.stderr


def _final_state(run: Path) -> dict:
    return omnicore.load(run / "model").state_dict()


def test_interrupted_run_resumes_to_the_same_weights(tmp_path):
    """Stop mid-stage right after a checkpoint (in process), resume, and match an uninterrupted run exactly."""
    overrides = TINY + ["stages.stage1_mmu.steps=6", "stages.stage1_mmu.checkpoint_every=2", "~evaluation"]
    full = run_recipe("quickstart", overrides, run_dir=tmp_path / "full", console=quiet())
    with pytest.raises(KeyboardInterrupt):
        run_recipe("quickstart", overrides, run_dir=tmp_path / "cut", console=quiet(), stop_after_step=4)
    assert (tmp_path / "cut" / "checkpoints" / "latest").read_text().strip() == "02-stage1_mmu-step0000004"
    run_recipe("quickstart", overrides, run_dir=tmp_path / "cut", resume=True, console=quiet())
    a, b = _final_state(full), _final_state(tmp_path / "cut")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _checkpoint_weights(run: Path, name: str) -> dict:
    from omnicore.training.checkpoint import load_state_dict_file

    return load_state_dict_file(run / "checkpoints" / name / "model.safetensors")


def test_ema_stage_saves_the_average_of_its_weights(tmp_path):
    """With ``ema`` the saved model holds the (bias-corrected) moving average of the stage's weights after each step,
    not the last step's weights. The trajectory comes from the same run without ema (a checkpoint every step; the
    average changes nothing else); untrained weights stay those of the previous stage's final checkpoint."""
    decay, steps = 0.6, 4
    plain = TINY + ["~evaluation", "stages.stage2_unified.checkpoint_every=1", "stages.stage2_unified.schedule.kind=constant"]
    run_recipe("quickstart", plain, run_dir=tmp_path / "plain", console=quiet())
    run_recipe("quickstart", plain + [f"stages.stage2_unified.ema={decay}"], run_dir=tmp_path / "ema",
               console=quiet())
    trajectory = [_checkpoint_weights(tmp_path / "plain", "03-stage1_t2i-step0000003")]
    trajectory += [_checkpoint_weights(tmp_path / "plain", f"04-stage2_unified-step{n:07d}") for n in range(1, steps + 1)]
    average = {k: torch.zeros_like(v) for k, v in trajectory[0].items()}
    for n, weights in enumerate(trajectory[1:], start=1):  # the weights after each step, the last weighted most
        for k in average:
            average[k] += (1 - decay) * decay ** (steps - n) * weights[k]
    average = {k: v / (1 - decay ** steps) for k, v in average.items()}
    saved, last = _final_state(tmp_path / "ema"), _final_state(tmp_path / "plain")
    trained = [k for k in saved if not torch.equal(trajectory[0][k], trajectory[-1][k])]
    assert any(k.startswith("backbone.") for k in trained)  # stage 2 trains the backbone
    for k in saved:
        assert torch.allclose(saved[k], average[k], atol=1e-6), k
    # not the last step's weights: a clear part of how far the stage moved them
    moved = max(float((trajectory[-1][k] - trajectory[0][k]).abs().max()) for k in trained)
    assert max(float((saved[k] - last[k]).abs().max()) for k in trained) > 0.05 * moved
    # the stage's final checkpoint holds the average too (a resumed run continues from it)
    final = _checkpoint_weights(tmp_path / "ema", f"04-stage2_unified-step{steps:07d}")
    assert all(torch.equal(final[k], saved[k]) for k in saved)


def test_interrupted_ema_stage_resumes_to_the_same_average(tmp_path):
    overrides = TINY + ["stages.stage2_unified.steps=6", "stages.stage2_unified.checkpoint_every=2",
                        "stages.stage2_unified.ema=0.9", "~evaluation"]
    full = run_recipe("quickstart", overrides, run_dir=tmp_path / "full", console=quiet())
    with pytest.raises(KeyboardInterrupt):
        run_recipe("quickstart", overrides, run_dir=tmp_path / "cut", console=quiet(), stop_after_step=4)
    run_recipe("quickstart", overrides, run_dir=tmp_path / "cut", resume=True, console=quiet())
    a, b = _final_state(full), _final_state(tmp_path / "cut")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_trained_lora_layers_keep_their_dropout_on(tiny_model):
    """Frozen parts run in eval mode; parameter-free modules (dropout) follow the module they sit in, so the dropout
    of an adapter being trained is active and that of a frozen encoder is not."""
    from omnicore.recipe.schema import TrainSpec
    from omnicore.training.freeze import apply_trainable
    from omnicore.training.trainer import _set_train_modes

    m = tiny_model
    apply_trainable(m, m.roles(), TrainSpec(roles=["projector"], adapters=["mmu"]))
    try:
        _set_train_modes(m)
        lora_dropout = [mod for name, mod in m.backbone.named_modules() if name.endswith("lora_dropout.mmu")]
        assert lora_dropout and all(mod.training for mod in lora_dropout)
        assert m.projector.training and not m.encoder.training
        assert not any(mod.training for mod in m.encoder.modules())
    finally:
        m.eval()
        for p in m.parameters():
            p.requires_grad_(True)


def test_long_caption_is_truncated_with_a_warning(tiny_model):
    layout = tiny_model.layout
    words = "a red circle on the left " * 4
    with pytest.warns(UserWarning, match="max_caption_tokens"):
        prefix = layout.t2i_prefix(words)
    assert len(prefix) == layout.t2i_prefix_len  # the layout keeps its fixed length
    assert layout.t2i_prefix("a red circle on the left")[-8:-2] == layout.tokenizer.encode("a red circle on the left")


def test_caption_read_twice(tmp_path):
    """``caption_reads: 2``: the caption block comes twice before <|soi|> in training and in generation, the saved
    model keeps it, and the schema bounds it."""
    from omnicore.generation.api import generate_images
    from omnicore.recipe import load_recipe

    recipe = load_recipe("quickstart", ["model.caption_reads=2"]).recipe
    torch.manual_seed(0)
    m = omnicore.build(recipe).eval()
    layout = m.layout
    caption = layout.tokenizer.encode("a red circle on the left")
    prefix = layout.t2i_prefix("a red circle on the left")
    block = prefix[1:1 + layout.max_caption_tokens + 2]
    assert len(prefix) == layout.t2i_prefix_len == 2 * (layout.max_caption_tokens + 2) + 2
    assert prefix[1 + len(block):-1] == block and block[-1 - len(caption):-1] == caption
    assert t2i_batch(m)["prefix_ids"].shape == (2, layout.t2i_prefix_len)
    with torch.no_grad():
        assert torch.isfinite(m.loss("t2i", t2i_batch(m)))
    images = generate_images(m, ["a red circle on the left"], guidance_scale=2.0, top_k=4, seed=0)
    assert images[0].size == (32, 32)
    loaded = omnicore.load(m.save(tmp_path / "model"))
    loaded = getattr(loaded, "model", loaded)
    assert loaded.layout.t2i_prefix("a red circle on the left") == prefix
    with pytest.raises(Exception, match="caption_reads"):
        load_recipe("quickstart", ["model.caption_reads=0"])


LEARN_RECIPE = """\
extends: quickstart
stages:
  - name: t2i
    tasks: {t2i: {batch_size: 16, data: {type: synthetic_shapes, params: {task: t2i, size: 1024, image_size: 32}}}}
    train: {roles: [backbone, heads.image, heads.caption, heads.caption_pool, heads.t2i_positions]}
    optimizer: {lr: 2.0e-3}
    schedule: {warmup_steps: 10}
    steps: 40
    log_every: 10
"""


def test_training_learns(tmp_path):
    """40 steps of T2I take the loss on held-out captions (colour/shape/side combinations training never shows) from
    that of uniform guessing, ln 128 = 4.85, which a frozen model or a broken optimizer keeps, to well below it."""
    import math

    from omnicore.runner import seed_everything
    from omnicore.training.data import T2ICollator

    recipe = tmp_path / "learn.yaml"
    recipe.write_text(LEARN_RECIPE)
    heldout = omnicore.create("dataset", "synthetic_shapes", task="t2i", split="heldout", size=64, image_size=32,
                              seed=5)

    def heldout_loss(model) -> float:
        batch = T2ICollator(model.layout, 32, model.num_image_codes)([heldout[i] for i in range(len(heldout))])
        with torch.no_grad():
            return float(model.eval().loss("t2i", batch))

    seed_everything(0)
    before = heldout_loss(omnicore.build(str(recipe)))
    run_recipe(str(recipe), ["~evaluation"], run_dir=tmp_path / "run", console=quiet())
    after = heldout_loss(omnicore.load(tmp_path / "run" / "model"))
    assert before > 0.95 * math.log(128)
    assert after < 0.7 * math.log(128), (before, after)


def test_cuda_graph_stages_refuse_what_they_cannot_run(tmp_path):
    """cuda_graph is read: on a CPU run it stops the stage with one line naming it; other stage kinds refuse it."""
    r = omni("recipe", "run", "quickstart", *TINY, "stages.stage1_t2i.cuda_graph=true", "--run-dir",
             str(tmp_path / "run"), "--device", "cpu")
    assert r.returncode != 0
    assert "stage 'stage1_t2i': cuda_graph needs a CUDA device (this run is on cpu)" in r.stderr
    r = omni("recipe", "validate", "quickstart", "stages.tokenizer.cuda_graph=true")
    assert r.returncode == 2 and "cuda_graph is for unified stages, not vqgan" in r.stderr


def test_mmu_text_padded_to_a_multiple_gives_the_same_loss(tiny_model):
    """A graphed stage pads MMU text to a multiple of 64 tokens (few shapes, few graphs): the loss must not move."""
    from omnicore.training.data import MMUCollator

    ds = omnicore.create("dataset", "synthetic_shapes", task="mmu", size=3, image_size=32)
    samples = [ds[i] for i in range(3)]
    plain = MMUCollator(tiny_model.layout, tiny_model.encoder.image_transform(), 32)(samples)
    padded = MMUCollator(tiny_model.layout, tiny_model.encoder.image_transform(), 32, pad_multiple=64)(samples)
    assert padded["text_ids"].shape[1] == 64 > plain["text_ids"].shape[1]
    with torch.no_grad():
        a, b = tiny_model.mmu_loss(plain), tiny_model.mmu_loss(padded)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
