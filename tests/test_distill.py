"""mmMamba distillation: the student backbone (seeded from a Transformer teacher, hybrid layers kept), the
distill_layerwise / distill_e2e stages (losses fall, only the intended parameters move, padding weighs nothing),
exact resume of each stage after kill -9, and the WSD schedule."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import omnicore
from omnicore.errors import OmnicoreError

WORDS = ["a", "red", "green", "blue", "yellow", "circle", "square", "triangle", "on", "the", "left", "right", "What",
         "color", "is", "shape", "it", "Is", "or", "?"]


def teacher_spec(n_layer: int = 3) -> dict:
    return {"image_size": 32, "max_text_tokens": 64,
            "encoder": {"type": "timm_vit", "params": {
                "model_name": "vit_tiny_patch16_224", "image_size": 32,
                "model_kwargs": {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}}},
            "projector": {"type": "mlp_gelu"},
            "text_tokenizer": {"type": "byte", "params": {"words": WORDS}},
            "backbone": {"type": "transformer", "params": {"d_model": 32, "n_layer": n_layer, "n_head": 4,
                                                           "n_kv_head": 2, "d_intermediate": 64}},
            "heads": {"text": {"type": "text_lm"}}}


def randomize(module: torch.nn.Module, seed: int, std: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(0.5 + torch.rand(p.shape, generator=g) if "norm" in name else std * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    model = omnicore.build(teacher_spec()).eval()
    randomize(model.backbone, 1, std=0.2)
    randomize(model.heads, 2)
    return model


def samples(n: int, seed: int = 0) -> list[dict]:
    ds = omnicore.create("dataset", "synthetic_shapes", task="mmu", size=n, image_size=32, seed=seed)
    return [ds[i] for i in range(n)]


def collate(model, rows: list[dict]) -> dict:
    from omnicore.distill.stages import DistillCollator

    return DistillCollator(model.layout, model.encoder.image_transform(), model.encoder.image_size)(rows)


# --- the student backbone --------------------------------------------------------------------------------------------
def test_student_keeps_the_teacher_and_an_all_hybrid_student_computes_the_teacher(teacher):
    from omnicore.distill.losses import mmu_logits
    from omnicore.distill.student import make_student

    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = make_student(teacher, hybrid=[1]).eval()
    t, s = teacher.state_dict(), student.state_dict()
    for k, v in t.items():
        if ".self_attn." in k and not k.startswith("backbone.layers.1."):
            assert k in s and torch.equal(s[k], v), k  # q/k/v/o copied into the mixers
        else:
            assert torch.equal(s[k], v), k  # MLPs, norms, hybrid attention, encoder, projector, heads
    new = {k.split(".self_attn.")[1].split(".")[0] for k in s if k not in t}
    assert new == {"conv1d", "in_proj", "g_proj", "g_norm", "dt_bias", "A_log_bias"}
    assert not any(k.startswith("backbone.layers.1.self_attn.") and k not in t for k in s)
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())  # the teacher is untouched
    batch = collate(teacher, samples(3))
    every = make_student(teacher, hybrid=[0, 1, 2]).eval()
    with torch.no_grad():
        torch.testing.assert_close(mmu_logits(every, batch), mmu_logits(teacher, batch), rtol=0, atol=0)
        assert not torch.allclose(mmu_logits(student, batch), mmu_logits(teacher, batch), atol=1e-3)


def test_student_prefill_and_steps_equal_its_full_forward_and_batches_equal_one_by_one(teacher):
    from omnicore.distill.student import make_student
    from omnicore.generation.engine import generate_text
    from omnicore.generation.sampling import Sampling

    torch.manual_seed(3)
    student = make_student(teacher, hybrid=[1]).eval()
    backbone = student.backbone
    with torch.no_grad():
        randomize(backbone, 4, std=0.2)
        x = torch.randn(2, 10, 32)
        full = backbone(x)
        state = backbone.allocate_inference_state(2, 16)
        parts = [backbone(x[:, :6], state=state)] + [backbone(x[:, t:t + 1], state=state) for t in range(6, 10)]
        torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
        kinds = repr(state)
    assert "'MAM'" in kinds, kinds  # mixer caches for layers 0 and 2, a KV cache for the hybrid layer
    rows = samples(3)
    qs = [student.layout.question_ids(r["turns"][0]["question"]) for r in rows][:2] + [student.layout.question_ids("a")]
    pixels = torch.stack([student.encoder.image_transform()(r["image"]) for r in rows])
    s = Sampling(greedy=True, max_new_tokens=8, ignore_eos=True)
    batch = generate_text(student, pixels, torch.ones(3), qs, s)
    alone = [generate_text(student, pixels[i:i + 1], torch.ones(1), [q], s)[0] for i, q in enumerate(qs)]
    assert batch == alone


def test_student_saves_as_a_model_directory_that_load_serves(teacher, tmp_path):
    from test_distill_import import assert_structure_reads_requests_as

    from omnicore.distill.student import make_student

    student = make_student(teacher, hybrid=[2], mixer_options={"dt_max": 0.05}).eval()
    student.save(tmp_path / "student")
    loaded = omnicore.load(tmp_path / "student")
    assert_structure_reads_requests_as(loaded, tmp_path / "student")
    assert loaded.config["model"]["backbone"]["type"] == "student"
    assert loaded.config["model"]["backbone"]["params"]["hybrid"] == [2]
    for k, v in student.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    rows = samples(2)
    images, questions = [r["image"] for r in rows], [r["turns"][0]["question"] for r in rows]
    assert loaded.answer(images, questions, max_new_tokens=6) == student.answer(images, questions, max_new_tokens=6)
    streamed = "".join(loaded.stream_answer(images[0], questions[0], max_new_tokens=6))
    assert streamed.strip() == loaded.answer(images[:1], questions[:1], max_new_tokens=6)[0]


# --- the losses ---------------------------------------------------------------------------------------------------
def _padded(batch: dict, extra: int, pad_id: int) -> dict:
    from omnicore.model.layout import IGNORE

    b = batch["text_ids"].shape[0]
    out = dict(batch)
    out["text_ids"] = torch.cat([batch["text_ids"], torch.full((b, extra), pad_id)], 1)
    out["labels"] = torch.cat([batch["labels"], torch.full((b, extra), IGNORE)], 1)
    return out


def test_padding_changes_neither_loss(teacher):
    from omnicore.distill.losses import kl_loss, layerwise_loss
    from omnicore.distill.student import make_student

    torch.manual_seed(5)
    student = make_student(teacher, hybrid=[1]).eval()
    randomize(student.backbone.layers[0].self_attn, 6)
    batch = collate(teacher, samples(4))
    padded = _padded(batch, 9, teacher.text_tokenizer.pad_id)
    with torch.no_grad():
        mse, layers = layerwise_loss(student, teacher, batch)
        mse_padded, layers_padded = layerwise_loss(student, teacher, padded)
        torch.testing.assert_close(mse_padded, mse, rtol=1e-5, atol=0)
        assert sorted(layers) == [0, 2]
        kl = kl_loss(student, teacher, batch, temperature=2.0)
        torch.testing.assert_close(kl_loss(student, teacher, padded, temperature=2.0), kl, rtol=1e-5, atol=0)
        assert float(kl) > 0
        # counting the padding (every text position real) would change the layerwise loss
        padded["text_len"] = torch.full_like(batch["text_len"], padded["text_ids"].shape[1])
        assert abs(float(layerwise_loss(student, teacher, padded)[0]) - float(mse)) > 1e-4 * float(mse)


def test_layerwise_is_teacher_forced_each_layer_sees_the_teachers_hidden_states(teacher):
    """Changing the first mixer changes its own loss only: later layers get the teacher's hidden states, not the
    student's."""
    from omnicore.distill.losses import layerwise_loss
    from omnicore.distill.student import make_student

    torch.manual_seed(8)
    student = make_student(teacher).eval()
    batch = collate(teacher, samples(3))
    with torch.no_grad():
        _, before = layerwise_loss(student, teacher, batch)
        randomize(student.backbone.layers[0].self_attn, 9)
        _, after = layerwise_loss(student, teacher, batch)
    assert after[0] != before[0]
    assert after[1] == before[1] and after[2] == before[2]


def test_kl_is_teacher_to_student_on_the_answer_tokens_at_the_temperature(teacher):
    import torch.nn.functional as F

    from omnicore.distill.losses import kl_loss, mmu_logits
    from omnicore.distill.student import make_student
    from omnicore.model.layout import IGNORE

    torch.manual_seed(7)
    student = make_student(teacher).eval()
    batch = collate(teacher, samples(3))
    answer = batch["labels"] != IGNORE
    with torch.no_grad():
        p = F.log_softmax(mmu_logits(teacher, batch)[answer] / 3.0, -1)
        q = F.log_softmax(mmu_logits(student, batch)[answer] / 3.0, -1)
        want = F.kl_div(q, p, log_target=True, reduction="batchmean") * 9.0  # KL(p || q), per answer token
        torch.testing.assert_close(kl_loss(student, teacher, batch, temperature=3.0), want, rtol=1e-5, atol=1e-7)


# --- the schedule and the schema ---------------------------------------------------------------------------------------
def test_wsd_schedule_warms_up_holds_then_decays_to_its_floor():
    from omnicore.training.schedule import lr_factor

    got = [lr_factor(s, 10, 2, 0.1, "wsd", decay_steps=3) for s in range(10)]
    assert got[:2] == [0.5, 1.0] and got[2:7] == [1.0] * 5
    assert got[7] > got[8] > got[9] and got[9] == pytest.approx(0.1)


@pytest.mark.parametrize("stage,fragment", [
    ({"kind": "distill_layerwise", "distill": {"temperature": 2.0}}, "distill.temperature is for distill_e2e"),
    ({"kind": "distill_e2e", "distill": {"loss_scale": 10.0}}, "distill.loss_scale is for distill_layerwise"),
    ({"kind": "distill_e2e", "train": {"roles": ["backbone"]}}, "does not take 'train'"),
    ({"kind": "distill_e2e", "distill": {"train_params": ["mlp"]}}, "train_params"),
    ({"kind": "distill_e2e", "distill": {"student": {"mixer_options": {"dt_maxx": 1}}}}, "dt_maxx"),
    ({"kind": "distill_e2e", "schedule": {"kind": "wsd"}}, "needs decay_steps"),
    ({"kind": "distill_e2e", "schedule": {"kind": "wsd", "warmup_steps": 3, "decay_steps": 3}}, "exceed"),
    ({"kind": "unified", "distill": {}, "tasks": {"mmu": {"batch_size": 2, "data": {"type": "synthetic_shapes"}}}},
     "'distill' is for kinds"),
])
def test_distill_options_a_stage_would_not_read_are_refused(stage, fragment):
    from omnicore.recipe.schema import StageSpec

    base = {"name": "s", "optimizer": {"lr": 1e-3}, "steps": 4, "batch_size": 2,
            "data": {"type": "synthetic_shapes"}}
    with pytest.raises(Exception, match=fragment):
        StageSpec.model_validate({**base, **stage})


# --- the stages end to end, and resume after kill -9 -----------------------------------------------------------------
def _stage(name: str, kind: str, steps: int, seed: int, lr: float, **extra) -> dict:
    return {"name": name, "kind": kind, "steps": steps, "batch_size": 8, "log_every": 1, "checkpoint_every": 1,
            "optimizer": {"lr": lr},
            "data": {"type": "synthetic_shapes", "params": {"task": "mmu", "size": 64, "image_size": 32, "seed": seed}},
            **extra}


RECIPE = {
    "seed": 0, "model": teacher_spec(),
    "stages": [
        {"name": "teacher", "steps": 4, "log_every": 1, "optimizer": {"lr": 3.0e-3},
         "tasks": {"mmu": {"batch_size": 8, "data": {"type": "synthetic_shapes",
                                                     "params": {"task": "mmu", "size": 64, "image_size": 32}}}},
         "train": {"roles": ["encoder", "projector", "backbone", "heads.text"]}},
        _stage("s1", "distill_layerwise", 6, 1, 1e-2, distill={"student": {"hybrid": [1]}}, save_model="after_s1",
               schedule={"kind": "wsd", "warmup_steps": 1, "decay_steps": 2}),
        _stage("s2", "distill_layerwise", 6, 2, 1e-3, save_model="after_s2",
               distill={"train_params": ["conv1d", "in_proj", "g_proj", "g_norm", "dt_bias", "A_log_bias",
                                         "q_proj", "k_proj", "v_proj"]}),
        _stage("s3", "distill_e2e", 6, 3, 3e-3, distill={"temperature": 2.0}),
    ],
    "evaluation": {"mmu": {"type": "synthetic_shapes", "params": {"task": "mmu", "split": "heldout", "size": 2,
                                                                   "image_size": 32, "seed": 9}},
                   "models": {"teacher": "teacher"}},
}
STAGE_CHECKPOINTS = {"s1": (2, 7), "s2": (8, 13), "s3": (14, 19)}  # the teacher stage writes checkpoint 1
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _command(recipe: Path, run: Path, resume: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "omnicore.cli", "recipe", "run", str(recipe), "--run-dir", str(run)]
    return cmd + (["--resume"] if resume else [])


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "distill.yaml"
    path.write_text(yaml.safe_dump(RECIPE, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def reference(recipe_file, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("reference") / "run"
    r = subprocess.run(_command(recipe_file, run), capture_output=True, text=True, timeout=600, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == f"final model: {run / 'model'}"
    return run


def _records(run: Path, stage: str) -> list[dict]:
    lines = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return [r for r in lines if r.get("stage") == stage and "step" in r]


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def test_layerwise_mse_and_e2e_kl_fall(reference):
    for stage in ("s1", "s2"):
        mse = [r["loss_mse"] for r in _records(reference, stage)]
        assert len(mse) == 6 and mse[-1] < mse[0], (stage, mse)
        assert {"loss_mse_layer0", "loss_mse_layer2"} <= set(_records(reference, stage)[0])
    kl = [r["loss_kl"] for r in _records(reference, "s3")]
    assert len(kl) == 6 and kl[-1] < kl[0], kl
    evaluated = json.loads((reference / "eval.json").read_text())
    assert "mmu_accuracy" in evaluated and "mmu_accuracy" in evaluated["teacher"]


def test_each_stage_moves_only_its_parameters_and_hybrid_layers_stay_the_teachers(reference):
    teacher, s1, s2 = (_weights(reference / d) for d in ("teacher", "after_s1", "after_s2"))
    s3 = _weights(reference / "model")

    def kind(key: str) -> str | None:
        """The mixer parameter a key names (layers 0 and 2), else None."""
        if ".self_attn." not in key or key.startswith("backbone.layers.1."):
            return None
        return key.split(".self_attn.")[1].split(".")[0]

    moved = {"s1": {"conv1d", "in_proj", "g_proj", "g_norm", "dt_bias", "A_log_bias"},
             "s2": {"conv1d", "in_proj", "g_proj", "g_norm", "dt_bias", "A_log_bias", "q_proj", "k_proj", "v_proj"},
             "s3": {"conv1d", "in_proj", "g_proj", "g_norm", "q_proj", "k_proj", "v_proj"}}
    for name, before, after in (("s2", s1, s2), ("s3", s2, s3)):
        assert set(before) == set(after)
        for k in after:
            if kind(k) in moved[name]:
                assert not torch.equal(before[k], after[k]), f"{name}: {k} did not train"
            else:
                assert torch.equal(before[k], after[k]), f"{name}: {k} moved"
    for k, v in teacher.items():  # everything the teacher has: unchanged through stage 1, and outside the mixers always
        if kind(k) is None or kind(k) == "o_proj":
            assert torch.equal(s3[k], v), k
        assert torch.equal(s1[k], v), k
    for layer in (0, 2):  # stage 1 moved what seeding set to known values
        p = f"backbone.layers.{layer}.self_attn."
        assert s1[p + "in_proj.weight"].count_nonzero() > 0 and s1[p + "conv1d.bias"].count_nonzero() > 0
        assert not torch.equal(s1[p + "g_norm.weight"], torch.ones_like(s1[p + "g_norm.weight"]))
        assert not torch.equal(s1[p + "A_log_bias"], torch.ones_like(s1[p + "A_log_bias"]))
    # stage 3 keeps every trained tensor: dt_bias and A_log_bias as stage 2 left them, saved with the model
    assert any(k.endswith("self_attn.dt_bias") for k in s3) and any(k.endswith("A_log_bias") for k in s3)


def _kill_at_checkpoint(cmd: list[str], run: Path, at: int) -> None:
    """Start ``cmd``; once ``at`` checkpoints exist kill -9 it."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    root = run / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (root / "latest").is_file() and len([p for p in root.iterdir()
                                                 if "-step" in p.name and not p.name.startswith(".")]) >= at:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=120) != 0


def test_each_distillation_stage_resumes_after_kill_9_to_the_same_weights(recipe_file, reference, tmp_path):
    """kill -9 inside stage 1, then (resumed) inside stage 2, then inside stage 3; the last resume finishes with the
    weights and losses of the run never interrupted."""
    run = tmp_path / "cut"
    killed = []
    for i, stage in enumerate(("s1", "s2", "s3")):
        lo, hi = STAGE_CHECKPOINTS[stage]
        _kill_at_checkpoint(_command(recipe_file, run, resume=i > 0), run, random.randint(lo, hi - 1))
        killed.append((run / "checkpoints" / "latest").read_text().strip())
    r = subprocess.run(_command(recipe_file, run, resume=True), capture_output=True, text=True, timeout=600, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("model", "after_s1", "after_s2", "teacher"):
        a, b = _weights(reference / name), _weights(run / name)
        assert set(a) == set(b)
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}: {k} differs after kills at {killed}"
    for stage in ("s1", "s2", "s3"):
        done = {r["step"]: r["loss_" + ("kl" if stage == "s3" else "mse")] for r in _records(run, stage)}
        want = {r["step"]: r["loss_" + ("kl" if stage == "s3" else "mse")] for r in _records(reference, stage)}
        assert done == want, (stage, killed)


def test_a_stage_continuing_a_student_needs_one(tmp_path):
    from omnicore.runner import run_recipe
    from rich.console import Console

    recipe = {"seed": 0, "model": teacher_spec(2), "stages": [_stage("s2", "distill_layerwise", 1, 0, 1e-3)]}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(OmnicoreError, match="no teacher"):
        run_recipe(str(path), [], run_dir=tmp_path / "run", console=Console(file=open(os.devnull, "w")))


def test_distill_teacher_from_a_model_directory(teacher, tmp_path):
    from omnicore.runner import run_recipe
    from rich.console import Console

    teacher.save(tmp_path / "teacher_dir")
    recipe = {"seed": 0, "model": teacher_spec(), "stages": [
        _stage("s1", "distill_layerwise", 2, 0, 1e-3, checkpoint_every=0,
               distill={"teacher": str(tmp_path / "teacher_dir"), "student": {}}),
        _stage("s3", "distill_e2e", 1, 0, 1e-3, checkpoint_every=0)]}  # keeps the student's teacher
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run = run_recipe(str(path), [], run_dir=tmp_path / "run", console=Console(file=open(os.devnull, "w")))
    student = omnicore.load(run / "model")
    assert student.backbone.hybrid == [] and not (run / "teacher").exists()
    assert (run / "teacher-path").read_text().strip() == str((tmp_path / "teacher_dir").resolve())
    for k, v in teacher.state_dict().items():
        if ".self_attn." not in k:
            assert torch.equal(student.state_dict()[k], v), k
    bad = {**recipe, "stages": [{**recipe["stages"][0], "distill": {"teacher": str(tmp_path / "nowhere"),
                                                                     "student": {}}}]}
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(OmnicoreError, match="distill.teacher: .*nowhere: not a model directory"):
        run_recipe(str(path), [], run_dir=tmp_path / "run2", console=Console(file=open(os.devnull, "w")))


# --- the shipped recipes ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,hybrid", [("mmmamba/linear", []), ("mmmamba/hybrid", [0, 4, 8, 12, 16, 20]),
                                         ("distill_quickstart", None)])
def test_distillation_recipes_validate(name, hybrid):
    from omnicore.recipe import load_recipe
    from omnicore.recipe.validate import validate_recipe

    loaded = load_recipe(name, [])
    assert validate_recipe(loaded) == []
    kinds = [s.kind for s in loaded.recipe.stages if s.kind.startswith("distill_")]
    if hybrid is not None:  # mmMamba's three stages, new student in the first, WSD throughout
        assert kinds == ["distill_layerwise", "distill_layerwise", "distill_e2e"]
        stages = loaded.recipe.stages
        assert stages[0].distill.student.hybrid == hybrid and stages[1].distill.student is None
        assert {"q_proj", "k_proj", "v_proj"} <= set(stages[1].distill.trained(stages[1].kind))
        assert all(s.schedule.kind == "wsd" and s.steps == 20000 for s in stages)
    else:  # hybrid then linear, the linear student last (the run's final model)
        assert kinds == ["distill_layerwise", "distill_layerwise", "distill_e2e"] * 2
        assert loaded.recipe.stages[-3].distill.student.hybrid == []
        assert set(loaded.recipe.evaluation.models) == {"teacher", "hybrid"}
