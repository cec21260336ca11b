"""Recipe options a user relies on: removed ones are unknown keys; ``omni pretokenize``, the ``inference:`` block and
a stage's ``init_from`` do what they advertise, on a tiny quick-start model."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console

import omnicore
from omnicore.cli.main import main
from omnicore.errors import OmnicoreError, RecipeError
from omnicore.generation.recipe_inference import run_inference
from omnicore.recipe import load_recipe
from omnicore.recipe.schema import InferenceSpec
from omnicore.recipe.validate import validate_recipe
from omnicore.runner import run_recipe
from omnicore.training.checkpoint import load_state_dict_file


def quiet() -> Console:
    return Console(file=open(os.devnull, "w"))


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def q(path) -> str:
    """A path as a YAML scalar (JSON strings are YAML)."""
    return json.dumps(str(path))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A saved tiny model whose weights differ from the ones a run builds itself (recipe seed 0)."""
    torch.manual_seed(1234)
    path = tmp_path_factory.mktemp("model") / "m"
    omnicore.build("quickstart").save(path)
    return path


@pytest.fixture(scope="module")
def model(model_dir):
    return omnicore.load(model_dir)


def fresh_weights() -> dict:
    torch.manual_seed(0)  # what run_recipe builds before any init_from (seed_everything(recipe.seed))
    return omnicore.build("quickstart").state_dict()


def model_weights(path: Path) -> dict:
    return omnicore.load(path).state_dict()


# --- removed options ---------------------------------------------------------------------------------------------

def test_removed_options_are_unknown_keys(tmp_path):
    # neither was read by any code: a recipe setting them must fail where it sets them, not be silently ignored
    path = write(tmp_path / "r.yaml", """\
        extends: quickstart
        model:
          encoder:
            trainable: false
        """)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert str(info.value) == f"{path}:4: model.encoder.trainable: unknown key"
    path = write(tmp_path / "s.yaml", """\
        extends: quickstart
        stages:
          - name: only
            tasks:
              mmu: {batch_size: 2, data: {type: synthetic_shapes, params: {task: mmu, size: 4, image_size: 32}}}
            train: {roles: [heads.text]}
            optimizer: {lr: 1.0e-3}
            steps: 2
            eval_every: 1
        """)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert str(info.value) == f"{path}:9: stages.0.eval_every: unknown key"
    # ignore_eos changed no output of a recipe (answers are cut at the first stop token either way): removed too
    with pytest.raises(RecipeError, match=r"=true': inference.sampling.ignore_eos: unknown key"):
        load_recipe("inference_mmu", ["inference.sampling.ignore_eos=true"])


def test_models_saved_with_the_old_trainable_null_still_load(model_dir, tmp_path):
    # config.json of models saved before the removal holds "trainable": null in every component
    old = tmp_path / "old"
    old.mkdir()
    for f in model_dir.iterdir():
        (old / f.name).write_bytes(f.read_bytes())
    config = json.loads((old / "config.json").read_text())
    for spec in [v for v in config["model"].values() if isinstance(v, dict) and "type" in v] \
            + list(config["model"]["heads"].values()):
        spec["trainable"] = None
    (old / "config.json").write_text(json.dumps(config))
    assert omnicore.load(old).state_dict().keys() == omnicore.load(model_dir).state_dict().keys()


# --- omni pretokenize ----------------------------------------------------------------------------------------------

def test_pretokenize_writes_the_models_codes_and_a_t2i_stage_trains_on_them(model_dir, model, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    shapes = omnicore.create("dataset", "synthetic_shapes", task="t2i", size=3, image_size=32, seed=5)
    for i in range(3):
        shapes[i]["image"].save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(shapes[i]["caption"] + "\n")
    out = tmp_path / "data.jsonl"
    # batch 2 over 3 images: a full batch and a remainder
    assert main(["pretokenize", str(folder), "--out", str(out), "--model", str(model_dir), "--batch-size", "2"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["caption"] for r in records] == [shapes[i]["caption"] for i in range(3)]
    # the model's own tokenizer on each PNG, at its native size (no resize), in the tokenizer's [-1, 1] range
    pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(folder / f"{i:02d}.png").convert("RGB"),
                                                      dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
                          for i in range(3)])
    expected = model.images_to_codes(pixels).tolist()
    assert [r["codes"] for r in records] == expected and len(expected[0]) == model.num_image_codes
    assert len({tuple(c) for c in expected}) == 3  # three different images: the comparison can tell them apart

    recipe = write(tmp_path / "t2i.yaml", f"""\
        extends: quickstart
        stages:
          - name: t2i
            init_from: {q(model_dir)}
            tasks:
              t2i: {{batch_size: 3, data: {{type: t2i_jsonl, params: {{path: {q(out)}}}}}}}
            train: {{roles: [heads.image]}}
            optimizer: {{lr: 1.0e-3}}
            steps: 2
            log_every: 1
        """)
    run = run_recipe(str(recipe), ["~evaluation"], run_dir=tmp_path / "run", console=quiet())
    steps = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "step" in r]
    assert [r["step"] for r in steps] == [1, 2]
    # the first step's loss (before any update, the batch being the whole file) is the model's T2I loss on those codes
    from omnicore.training.data import T2ICollator

    batch = T2ICollator(model.layout, model.image_size, model.num_image_codes)(
        [{"caption": r["caption"], "codes": r["codes"]} for r in records])
    with torch.no_grad():
        assert steps[0]["loss_t2i"] == pytest.approx(float(model.loss("t2i", batch)), rel=1e-4)


# --- inference: block --------------------------------------------------------------------------------------------

def t2i_recipe(path: Path, model_dir: Path, sampling: str = "{seed: 0, top_k: 50}") -> Path:
    return write(path, f"""\
        inference:
          task: t2i
          model: {q(model_dir)}
          inputs: {{prompts: [a red circle on the left, a blue square on the right]}}
          n_per_prompt: 3
          batch_size: 2
          sampling: {sampling}
          outputs: {{dir: images}}
        """)


def pixels_of(out: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(out.glob("0*.png"))}


def test_t2i_inference_writes_each_prompts_samples_and_follows_the_seed(model_dir, tmp_path):
    recipe = t2i_recipe(tmp_path / "t2i.yaml", model_dir)
    a = run_recipe(str(recipe), [], run_dir=tmp_path / "a", console=quiet()) / "images"
    b = run_recipe(str(recipe), [], run_dir=tmp_path / "b", console=quiet()) / "images"
    c = run_recipe(str(recipe), ["inference.sampling.seed=1"], run_dir=tmp_path / "c", console=quiet()) / "images"
    names = [f"{p:04d}-{k}.png" for p in range(2) for k in range(3)]
    assert sorted(x.name for x in a.iterdir()) == sorted(names + ["grid.png", "index.jsonl"])
    index = [json.loads(line) for line in (a / "index.jsonl").read_text().splitlines()]
    prompts = ["a red circle on the left", "a blue square on the right"]
    assert index == [{"file": f"{p:04d}-{k}.png", "prompt": prompts[p]} for p in range(2) for k in range(3)]
    pa, pb, pc = pixels_of(a), pixels_of(b), pixels_of(c)
    assert all(np.array_equal(pa[n], pb[n]) for n in names)  # same seed: the same images
    assert not any(np.array_equal(pa[n], pc[n]) for n in names)  # another seed: other images
    # a prompt's samples are distinct, also across decode batches (batch 2 < 3 samples)
    for p in range(2):
        samples = [pa[f"{p:04d}-{k}.png"] for k in range(3)]
        assert not any(np.array_equal(samples[i], samples[j]) for i in range(3) for j in range(i + 1, 3))


def test_mmu_inference_answers_each_question_n_times(model_dir, tmp_path):
    image = tmp_path / "shape.png"
    omnicore.create("dataset", "synthetic_shapes", task="mmu", size=1, image_size=32)[0]["image"].save(image)
    write(tmp_path / "questions.jsonl", '{"image": "shape.png", "question": "What shape is it?", "id": 7}\n')
    recipe = write(tmp_path / "mmu.yaml", f"""\
        inference:
          task: mmu
          model: {q(model_dir)}
          inputs:
            jsonl: questions.jsonl
            questions:
              - question: What color is it?
          n_per_prompt: 2
          batch_size: 3
          sampling: {{seed: 0, max_new_tokens: 6}}
        """)
    runs = [run_recipe(str(recipe), ov, run_dir=tmp_path / name, console=quiet()) / "outputs" / "answers.jsonl"
            for name, ov in (("a", []), ("b", []), ("c", ["inference.sampling.seed=1"]))]
    a, b, c = ([json.loads(line) for line in r.read_text().splitlines()] for r in runs)
    # inline questions first, then the JSONL's lines (extra fields kept, the image resolved beside the JSONL)
    assert [(r["question"], r["sample"]) for r in a] == [("What color is it?", 0), ("What color is it?", 1),
                                                         ("What shape is it?", 0), ("What shape is it?", 1)]
    assert a[2]["id"] == 7 and a[2]["image"] == str(image)
    assert a == b and a != c
    assert a[0]["answer"] != a[1]["answer"]  # sampled: two different answers to one question


# Each sampling option must reach the sampler: set to a value that leaves only the most likely token, a seeded
# sampled run gives the greedy run's images; repetition_penalty and guidance_scale change the greedy images.
@pytest.fixture(scope="module")
def t2i_outputs(model, tmp_path_factory):
    base = tmp_path_factory.mktemp("t2i")
    done: dict = {}  # the greedy and plain sampled images serve every case

    def run(**sampling) -> list[np.ndarray]:
        key = tuple(sorted(sampling.items()))
        if key not in done:
            spec = InferenceSpec.model_validate({"task": "t2i", "inputs": {"prompts": ["a red circle on the left"]},
                                                 "n_per_prompt": 2, "sampling": sampling})
            done[key] = list(pixels_of(run_inference(model, spec, base / str(len(done)), base, quiet())).values())
        return done[key]

    return run


@pytest.mark.parametrize("option", [{"greedy": True}, {"temperature": 0.0}, {"top_k": 1}, {"top_p": 1e-6},
                                    {"min_p": 1.0}])
def test_sampling_options_that_keep_only_the_best_token_give_the_greedy_images(t2i_outputs, option):
    greedy = t2i_outputs(greedy=True)
    assert not all(np.array_equal(x, y) for x, y in zip(t2i_outputs(seed=0), greedy))  # sampling differs
    assert all(np.array_equal(x, y) for x, y in zip(t2i_outputs(seed=0, **option), greedy))


@pytest.mark.parametrize("option", [{"repetition_penalty": 100.0}, {"guidance_scale": 3.0}])
def test_sampling_options_that_change_the_greedy_images(t2i_outputs, option):
    greedy = t2i_outputs(greedy=True)
    assert not all(np.array_equal(x, y) for x, y in zip(t2i_outputs(greedy=True, **option), greedy))


def test_mmu_max_new_tokens_limits_the_answers(model, tmp_path):
    def answers(n: int) -> list[str]:
        spec = InferenceSpec.model_validate({"task": "mmu", "sampling": {"greedy": True, "max_new_tokens": n},
                                             "inputs": {"questions": [{"question": "What color is it?"},
                                                                      {"question": "What shape is it?"}]}})
        out = run_inference(model, spec, tmp_path / str(n), tmp_path, quiet())
        return [json.loads(line)["answer"] for line in (out / "answers.jsonl").read_text().splitlines()]

    short, longer = answers(2), answers(6)
    # greedy: the short answers are the longer ones cut off (the untrained model does not stop by itself)
    assert all(len(s) < len(l) and l.startswith(s) for s, l in zip(short, longer))


def test_options_a_task_does_not_read_are_errors(model_dir, tmp_path):
    t2i = t2i_recipe(tmp_path / "t2i.yaml", model_dir, sampling="{max_new_tokens: 8}")
    assert validate_recipe(load_recipe(t2i)) == [
        f"{t2i}:7: inference.sampling.max_new_tokens: not read by task t2i (it applies to mmu)"]
    problems = validate_recipe(load_recipe("inference_mmu", ["inference.sampling.guidance_scale=3",
                                                             "inference.inputs.prompts=[a]"]))
    assert [p.split(": ", 2)[1] for p in problems] == ["inference.inputs.prompts", "inference.sampling.guidance_scale"]
    assert "task mmu reads 'questions' and 'jsonl'" in problems[0]
    evaluation = write(tmp_path / "eval.yaml", """\
        extends: quickstart
        evaluation:
          sampling: {guidance_scale: 3.0}
        """)
    assert validate_recipe(load_recipe(evaluation)) == [
        f"{evaluation}:3: evaluation.sampling.guidance_scale: not read: evaluation guides T2I with "
        f"evaluation.guidance_scale"]


# --- init_from ---------------------------------------------------------------------------------------------------

def stage_recipe(path: Path, init_from: Path, task: str, role: str) -> Path:
    return write(path, f"""\
        extends: quickstart
        stages:
          - name: {task}
            init_from: {q(init_from)}
            tasks:
              {task}:
                batch_size: 2
                data: {{type: synthetic_shapes, params: {{task: {task}, size: 4, image_size: 32}}}}
            train: {{roles: [{role}]}}
            optimizer: {{lr: 1.0e-3}}
            steps: 1
        """)


def test_init_from_a_model_and_from_a_checkpoint_starts_from_their_weights(model_dir, tmp_path):
    init, fresh = model_weights(model_dir), fresh_weights()
    recipe = stage_recipe(tmp_path / "first.yaml", model_dir, "t2i", "heads.image")
    first = run_recipe(str(recipe), ["~evaluation"], run_dir=tmp_path / "first", console=quiet())
    saved = model_weights(first / "model")
    untrained = [k for k in saved if not k.startswith("heads.image.")]
    assert all(torch.equal(saved[k], init[k]) for k in untrained)
    assert sum(not torch.equal(init[k], fresh[k]) for k in untrained) > len(untrained) // 2  # not the fresh weights
    assert not all(torch.equal(saved[k], init[k]) for k in saved if k.startswith("heads.image."))  # it trained

    # a checkpoint directory of that run: its weights (heads.image trained there), not the model directory's
    checkpoint = first / "checkpoints" / "00-t2i-step0000001"
    trained = load_state_dict_file(checkpoint / "model.safetensors")
    recipe = stage_recipe(tmp_path / "second.yaml", checkpoint, "mmu", "heads.text")
    second = model_weights(run_recipe(str(recipe), ["~evaluation"], run_dir=tmp_path / "second",
                                      console=quiet()) / "model")
    assert all(torch.equal(second[k], trained[k]) for k in second if not k.startswith("heads.text."))
    assert not all(torch.equal(second[k], init[k]) for k in second if k.startswith("heads.image."))


def test_bad_init_from_is_a_one_line_error(model_dir, tmp_path, capsys):
    recipe = stage_recipe(tmp_path / "r.yaml", tmp_path / "missing", "mmu", "heads.text")
    with pytest.raises(OmnicoreError) as info:
        run_recipe(str(recipe), ["~evaluation"], run_dir=tmp_path / "run", console=quiet())
    assert str(info.value).startswith(f"{recipe}:")
    assert str(info.value).endswith(f": stages.mmu.init_from: {tmp_path / 'missing'}: no checkpoint, model directory "
                                    f"or weights file there")
    assert not (tmp_path / "run").exists()  # refused before anything ran
    # a weights file whose tensor has another shape than the model's: named, not a size-mismatch traceback
    from safetensors.torch import save_file

    name, tensor = next(iter(load_state_dict_file(model_dir / "model.safetensors").items()))
    save_file({name: torch.zeros(tensor.numel() + 1)}, str(tmp_path / "wrong.safetensors"))
    recipe = stage_recipe(tmp_path / "w.yaml", tmp_path / "wrong.safetensors", "mmu", "heads.text")
    with pytest.raises(OmnicoreError, match=f"1 tensors of another shape than the model's, e.g. {name}"):
        run_recipe(str(recipe), ["~evaluation"], run_dir=tmp_path / "run3", console=quiet())
    # a directory that holds no model: the same, through the command line (exit status 2, one line)
    (tmp_path / "empty").mkdir()
    rc = main(["recipe", "run", str(recipe), "~evaluation", f"stages.mmu.init_from={tmp_path / 'empty'}",
               "--run-dir", str(tmp_path / "run2")])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip().count("\n") == 0, err
    assert f"stages.mmu.init_from: {tmp_path / 'empty'}: no checkpoint" in err
