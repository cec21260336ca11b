"""Generation on the quick-start model (untrained weights are enough for these properties)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from PIL import Image

import omnicore
from omnicore.generation.engine import generate_codes, generate_text
from omnicore.generation.sampling import Sampling


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = omnicore.build("quickstart").eval()
    with torch.no_grad():  # give the adapters some effect (they start at zero)
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.add_(0.05 * torch.randn_like(p))
    return m


@pytest.fixture(scope="module")
def images():
    ds = omnicore.create("dataset", "synthetic_shapes", task="mmu", size=3, image_size=32)
    return [ds[i]["image"] for i in range(3)]


def test_greedy_is_deterministic(model, images):
    q = ["What color is the shape?"] * 2
    assert model.answer(images[:2], q, max_new_tokens=6) == model.answer(images[:2], q, max_new_tokens=6)


def test_batched_equals_one_by_one_for_mixed_lengths(model, images):
    questions = ["What shape is it?", "Is the shape on the left or the right? Answer briefly please.", "Color?"]
    imgs = [images[0], None, images[2]]  # a text-only question in the batch too
    one_by_one = [model.answer([im], [q], max_new_tokens=8)[0] for im, q in zip(imgs, questions)]
    assert model.answer(imgs, questions, max_new_tokens=8) == one_by_one


def test_batched_token_ids_equal_one_by_one(model):
    qs = [model.layout.question_ids("hi"), model.layout.question_ids("a much longer question than that")]
    s = Sampling(greedy=True, max_new_tokens=6, ignore_eos=True)
    batched = generate_text(model, None, None, qs, s)
    single = [generate_text(model, None, None, [q], s)[0] for q in qs]
    assert batched == single


def test_image_generation_samples_exactly_the_grid(model):
    codes = generate_codes(model, ["a red circle on the left", "a blue square on the right"], 1.0,
                           Sampling(temperature=1.0, top_k=8, seed=0))
    assert codes.shape == (2, model.num_image_codes)
    assert int(codes.max()) < model.image_tokenizer.codebook_size and int(codes.min()) >= 0
    images = model.generate_images(["a red circle on the left"], n_per_prompt=2, seed=1, top_k=8)
    assert len(images) == 2 and images[0].size == (32, 32)


def test_a_seeded_call_draws_new_noise_for_each_batch(model):
    """One prompt's samples spread over several decode batches are different samples, and the call as a whole is
    reproducible from its seed (a generator restarted at each batch repeated batch 1's samples in batch 2)."""
    kwargs = dict(n_per_prompt=4, batch_size=2, seed=3, temperature=1.0)
    images = model.generate_images(["a red circle on the left"], **kwargs)
    pixels = [im.tobytes() for im in images]
    assert pixels[0] != pixels[2] and pixels[1] != pixels[3]
    assert [im.tobytes() for im in model.generate_images(["a red circle on the left"], **kwargs)] == pixels
    answers = model.answer([None] * 4, ["hi"] * 4, batch_size=2, seed=3, temperature=1.0, max_new_tokens=8)
    assert answers[:2] != answers[2:]
    assert model.answer([None] * 4, ["hi"] * 4, batch_size=2, seed=3, temperature=1.0, max_new_tokens=8) == answers


def test_guidance_scale_zero_is_unconditional(model):
    s = Sampling(temperature=1.0, top_k=16, seed=3)
    guided = generate_codes(model, ["a green triangle on the left"], 0.0, s)
    uncond = generate_codes(model, [None], 1.0, s)
    assert torch.equal(guided, uncond)
    # the caption does change the next-code distribution, so the equality above is not trivially true
    with torch.no_grad():
        first = []
        for caption in ("a green triangle on the left", None):
            prefix = torch.tensor([model.layout.t2i_prefix(caption)])
            x = model.add_positions(model.t2i_prefix_embeddings(prefix), "t2i_positions")
            first.append(model.heads["image"].logits(model.backbone(x, task="t2i")[:, -1]))
    assert not torch.allclose(first[0], first[1])


def test_greedy_codes_are_the_training_forwards_argmax(model):
    """Decoding feeds each code with the pooled caption added, as training does (heads.caption_pool): greedy codes
    are exactly the argmax of the teacher-forced logits over themselves."""
    assert "caption_pool" in model.heads
    caption = "a red circle on the right"
    codes = generate_codes(model, [caption], 1.0, Sampling(greedy=True))
    prefix = torch.tensor([model.layout.t2i_prefix(caption)])
    with torch.no_grad():
        assert torch.equal(model.t2i_logits(prefix, codes).argmax(-1), codes)
        # the unconditional (dropped caption) prefix pools to no condition at all, so guidance's u is unchanged
        assert torch.count_nonzero(model.t2i_condition(torch.tensor([model.layout.t2i_prefix(None)]))) == 0


def test_top_k_one_is_greedy(model):
    a = generate_codes(model, ["a yellow circle on the right"], 2.0, Sampling(temperature=1.0, top_k=1, seed=5))
    b = generate_codes(model, ["a yellow circle on the right"], 2.0, Sampling(greedy=True))
    assert torch.equal(a, b)


def test_cli_generate_and_ask(model, images, tmp_path):
    model.save(tmp_path / "m")
    images[0].save(tmp_path / "shape.png")
    r = subprocess.run([sys.executable, "-m", "omnicore.cli", "generate", "--model", str(tmp_path / "m"),
                        "a red circle on the left", "a blue square on the right", "--n", "2", "--seed", "0",
                        "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    pngs = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert pngs == ["0000-0.png", "0000-1.png", "0001-0.png", "0001-1.png", "grid.png"]
    assert Image.open(tmp_path / "out" / "grid.png").size == (64, 64)
    # a negative prompt: the same images as the Python API's; at guidance 1 it would do nothing, so it is refused
    neg = ["a red circle on the left", "--guidance-scale", "3", "--negative-prompt", "a circle on the left", "--seed",
           "0", "--top-k", "8"]
    r = subprocess.run([sys.executable, "-m", "omnicore.cli", "generate", "--model", str(tmp_path / "m"), *neg,
                        "--out", str(tmp_path / "neg")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    want = model.generate_images(["a red circle on the left"], guidance_scale=3.0,
                                 negative_prompts="a circle on the left", seed=0, top_k=8)[0]
    assert Image.open(tmp_path / "neg" / "0000-0.png").tobytes() == want.tobytes()
    r = subprocess.run([sys.executable, "-m", "omnicore.cli", "generate", "--model", str(tmp_path / "m"),
                        "a red circle", "--negative-prompt", "a circle", "--out", str(tmp_path / "no")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "--negative-prompt: has no effect at --guidance-scale 1" in r.stderr
    assert not (tmp_path / "no").exists()
    r = subprocess.run([sys.executable, "-m", "omnicore.cli", "ask", "--model", str(tmp_path / "m"),
                        str(tmp_path / "shape.png"), "What color is the shape?", "--max-new-tokens", "5"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    expected = model.answer([images[0]], ["What color is the shape?"], max_new_tokens=5)[0]
    assert r.stdout.strip() == expected
    r = subprocess.run([sys.executable, "-m", "omnicore.cli", "ask", "--model", str(tmp_path / "m"),
                        str(tmp_path / "missing.png"), "What?"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "missing.png: image file not found" in r.stderr


def test_decode_sessions_are_kept_per_shape_and_rule(model):
    # on CUDA a session holds a captured graph; the bookkeeping is device independent, so check it here
    from omnicore.generation import engine

    engine.clear_decode_cache(model)
    s = Sampling(temperature=1.0, top_k=8)
    a = engine._session(model, "t2i", 2, 2, 128, 256, s, graph=True, n_out=16)
    assert engine._session(model, "t2i", 2, 2, 128, 256, Sampling(temperature=1.0, top_k=8, seed=9), graph=True,
                           n_out=16) is a  # the seed is not part of the graph
    b = engine._session(model, "t2i", 2, 2, 128, 256, Sampling(temperature=1.0, top_k=4), graph=True, n_out=16)
    assert b is not a  # top-k is baked into the captured step
    engine._session(model, "mmu", 4, 4, 300, 256, s, graph=True)
    assert len(model._decode_sessions) == engine._MAX_SESSIONS
    assert engine._session(model, "t2i", 2, 2, 128, 256, s, graph=True, n_out=16) is not a  # evicted: oldest
    assert engine._session(model, "t2i", 2, 2, 128, 256, s, graph=False, n_out=16) is not None
    engine.clear_decode_cache(model)
    assert not hasattr(model, "_decode_sessions")


# --- composable guidance (Liu et al. 2022 on logits): u + s (c - u) + s_c sum_k (c_k - u) ---------------------------
CAPTIONS = ["a blue triangle on the right", "a red circle on the left"]
SINGLES = [["a blue shape", "a triangle", "a shape on the right"], ["a red shape", "a circle", "a shape on the left"]]


def test_component_scale_zero_is_plain_guidance(model):
    s = Sampling(temperature=1.0, top_k=16, seed=3)
    plain = generate_codes(model, CAPTIONS, 3.0, s)
    assert torch.equal(generate_codes(model, CAPTIONS, 3.0, s, components=SINGLES, component_scale=0.0), plain)
    # the components do change the codes once they are weighted, so the equality above is not trivially true
    assert not torch.equal(generate_codes(model, CAPTIONS, 3.0, s, components=SINGLES, component_scale=1.0), plain)


def test_the_prompt_as_its_own_component_adds_its_scale_to_the_guidance(model):
    s = Sampling(temperature=1.0, top_k=16, seed=4)
    plain = generate_codes(model, CAPTIONS, 3.5, s)
    itself = [[c] for c in CAPTIONS]
    assert torch.equal(generate_codes(model, CAPTIONS, 2.0, s, components=itself, component_scale=1.5), plain)
    # None pads a list: the unconditional prompt adds nothing
    padded = [[c, None] for c in CAPTIONS]
    assert torch.equal(generate_codes(model, CAPTIONS, 2.0, s, components=padded, component_scale=1.5), plain)
    # guidance_scale 0 drops the full prompt: what is left is guidance towards the component
    assert torch.equal(generate_codes(model, ["a green square on the left"] * 2, 0.0, s, components=itself,
                                      component_scale=3.5), plain)
    # and through the model's method, several images per prompt (components repeated along with the prompts)
    kw = dict(n_per_prompt=2, top_k=16, seed=4, batch_size=3)
    assert [im.tobytes() for im in model.generate_images(CAPTIONS, guidance_scale=2.0, components=itself,
                                                         component_scale=1.5, **kw)] == \
        [im.tobytes() for im in model.generate_images(CAPTIONS, guidance_scale=3.5, **kw)]


def test_components_must_be_one_list_per_prompt_of_the_same_length(model):
    from omnicore.errors import OmnicoreError

    s = Sampling(seed=0)
    with pytest.raises(OmnicoreError, match="same number of component prompts, got 1, 2"):
        generate_codes(model, CAPTIONS, 3.0, s, components=[["a blue shape"], ["a red shape", "a circle"]])
    with pytest.raises(OmnicoreError, match=r"one list of component prompts per prompt \(2\), got 1 entries"):
        model.generate_images(CAPTIONS, guidance_scale=3.0, components=[["a blue shape"]])
    with pytest.raises(OmnicoreError, match=r"components\[0\]: must be a list of strings, got 'a blue shape'"):
        model.generate_images(CAPTIONS[:1], guidance_scale=3.0, components=["a blue shape"])


# --- negative prompts: n + s (c - n), the negative prompt's logits in the unconditional stream's place ------------
NEGATIVES = ["a triangle on the right", "a circle on the left"]  # the captions without their colour


def test_negative_prompts_take_the_unconditional_streams_place(model):
    s = Sampling(temperature=1.0, top_k=16, seed=3)
    plain = generate_codes(model, CAPTIONS, 3.0, s)
    assert torch.equal(generate_codes(model, CAPTIONS, 3.0, s, negative_prompts=[None, None]), plain)
    # the caption as its own negative prompt cancels the guidance: n + s (c - n) = c
    assert torch.equal(generate_codes(model, CAPTIONS, 3.0, s, negative_prompts=CAPTIONS),
                       generate_codes(model, CAPTIONS, 1.0, s))
    negative = generate_codes(model, CAPTIONS, 4.0, s, negative_prompts=NEGATIVES)
    assert not torch.equal(negative, generate_codes(model, CAPTIONS, 4.0, s))
    # the same mix as composable guidance with the negative prompt at component scale -(s - 1)
    composed = generate_codes(model, CAPTIONS, 4.0, s, components=[[n] for n in NEGATIVES], component_scale=-3.0)
    assert (negative == composed).float().mean() > 0.95
    # one string applies to every prompt; n_per_prompt repeats the negative prompts with their prompts
    kw = dict(guidance_scale=4.0, top_k=16, seed=2)
    one = model.generate_images(CAPTIONS, negative_prompts="a shape", **kw)
    assert [im.tobytes() for im in one] == \
        [im.tobytes() for im in model.generate_images(CAPTIONS, negative_prompts=["a shape"] * 2, **kw)]
    twice = model.generate_images(CAPTIONS, n_per_prompt=2, negative_prompts=NEGATIVES, batch_size=3, **kw)
    assert len(twice) == 4


def test_negative_prompts_must_be_one_per_prompt(model):
    from omnicore.errors import OmnicoreError

    with pytest.raises(OmnicoreError, match=r"one negative prompt \(or None\) per prompt \(2\), got 1 entries"):
        generate_codes(model, CAPTIONS, 3.0, Sampling(seed=0), negative_prompts=["a shape"])
    with pytest.raises(OmnicoreError, match=r"negative_prompts\[1\]: must be a string or None, got 3"):
        model.generate_images(CAPTIONS, guidance_scale=3.0, negative_prompts=["a shape", 3])


def test_kept_sessions_are_keyed_by_the_components(model, monkeypatch):
    # on CUDA a kept session replays its captured step, which bakes in K and the scales; on CPU the kept session's
    # step (a closure over them) is reused the same way, so a key missing them would give the first call's codes
    from omnicore.generation import engine

    s = Sampling(temperature=1.0, top_k=16, seed=5)
    fresh = {sc: generate_codes(model, CAPTIONS, 3.0, s, components=SINGLES, component_scale=sc) for sc in (1.0, 3.0)}
    two = [c[:2] for c in SINGLES]
    fresh_two = generate_codes(model, CAPTIONS, 3.0, s, components=two, component_scale=1.0)
    engine.clear_decode_cache(model)
    monkeypatch.setattr(engine, "graphs_enabled", lambda setting, device: True)  # keep sessions (eager steps)
    try:
        for _ in range(2):
            for sc in (1.0, 3.0):
                assert torch.equal(generate_codes(model, CAPTIONS, 3.0, s, components=SINGLES, component_scale=sc),
                                   fresh[sc])
        assert torch.equal(generate_codes(model, CAPTIONS, 3.0, s, components=two, component_scale=1.0), fresh_two)
    finally:
        engine.clear_decode_cache(model)


def test_evaluation_reports_composed_and_plain_t2i(model, tmp_path):
    import io
    import json

    from rich.console import Console

    from omnicore.evaluation import run_evaluation
    from omnicore.recipe.schema import EvaluationSpec

    t2i = {"type": "synthetic_shapes", "params": {"task": "t2i", "split": "heldout", "size": 3, "image_size": 32}}
    sampling = {"greedy": False, "temperature": 0.5, "top_k": 4, "seed": 0}
    plain_spec = EvaluationSpec.model_validate({"t2i": t2i, "guidance_scale": 3.0, "sampling": sampling})
    plain = run_evaluation(model, plain_spec, tmp_path / "plain", Console(file=io.StringIO()))
    out = io.StringIO()
    spec = EvaluationSpec.model_validate({"t2i": t2i, "guidance_scale": 3.0, "sampling": sampling,
                                          "component_scale": 2.0})
    composed = run_evaluation(model, spec, tmp_path / "composed", Console(file=out, width=200))
    on_disk = json.loads((tmp_path / "composed" / "eval.json").read_text())
    for k in ("color_acc", "position_acc", "both_acc", "detected"):
        assert on_disk[f"t2i_plain_{k}"] == plain[f"t2i_{k}"]  # the plain figures are those of plain guidance
        assert f"t2i_{k}" in on_disk and f"t2i_plain_{k}" in out.getvalue()
    assert on_disk["t2i_component_scale"] == 2.0 and "t2i_plain_color_acc" not in plain
    assert (tmp_path / "composed" / "eval" / "t2i_plain_samples.png").is_file()
    # the composed images are other images (same seed), not a copy of the plain ones
    from PIL import Image

    a, b = (Image.open(tmp_path / "composed" / "eval" / f).tobytes() for f in ("t2i_samples.png", "t2i_plain_samples.png"))
    assert a != b


def test_composed_evaluation_needs_components_from_the_dataset(model, tmp_path):
    from omnicore.errors import OmnicoreError
    from omnicore.evaluation import evaluate_t2i

    ds = omnicore.create("dataset", "synthetic_shapes", task="t2i", split="heldout", size=2, image_size=32)
    m = ds[0]["meta"]
    assert ds[0]["components"] == [f"a {m['color']} shape"]
    singles = omnicore.create("dataset", "synthetic_shapes", task="t2i", split="heldout", size=2, image_size=32,
                              components="singles")
    assert singles[0]["components"] == [f"a {m['color']} shape", f"a {m['shape']}", f"a shape on the {m['position']}"]
    pairs = omnicore.create("dataset", "synthetic_shapes", task="t2i", split="heldout", size=2, image_size=32,
                            components="pairs")
    assert pairs[0]["components"] == [f"a {m['color']} {m['shape']}", f"a {m['color']} shape on the {m['position']}",
                                      f"a {m['shape']} on the {m['position']}"]

    class NoComponents:  # a T2I dataset that can score images but has no component prompts
        def __len__(self):
            return len(ds)

        def __getitem__(self, i):
            return {k: v for k, v in ds[i].items() if k != "components"}

        def score_images(self, images, samples):
            return ds.score_images(images, samples)

    sampling = {"temperature": 0.5, "top_k": 4, "seed": 0}
    with pytest.raises(OmnicoreError, match="evaluation.component_scale: dataset NoComponents gives no 'components'"):
        evaluate_t2i(model, NoComponents(), 3.0, sampling, tmp_path, component_scale=1.0)
    evaluate_t2i(model, NoComponents(), 3.0, sampling, tmp_path)  # without composition they are not needed


def test_evaluation_reports_negative_prompt_and_plain_t2i(model, tmp_path):
    import io
    import json

    from pydantic import ValidationError
    from rich.console import Console

    from omnicore.evaluation import run_evaluation
    from omnicore.recipe.schema import EvaluationSpec

    t2i = {"type": "synthetic_shapes", "params": {"task": "t2i", "split": "heldout", "size": 3, "image_size": 32}}
    ds = omnicore.create("dataset", "synthetic_shapes", task="t2i", split="heldout", size=3, image_size=32)
    sample = ds[0]
    assert sample["negative"] == f"a {sample['meta']['shape']} on the {sample['meta']['position']}"
    sampling = {"greedy": False, "temperature": 0.5, "top_k": 4, "seed": 0}
    spec = EvaluationSpec.model_validate({"t2i": t2i, "guidance_scale": 4.0, "sampling": sampling,
                                          "negative_prompts": True})
    results = run_evaluation(model, spec, tmp_path, Console(file=io.StringIO()))
    on_disk = json.loads((tmp_path / "eval.json").read_text())
    assert on_disk == {**on_disk, **results} and "t2i_plain_color_acc" in on_disk and "t2i_color_acc" in on_disk
    a, b = (Image.open(tmp_path / "eval" / f).tobytes() for f in ("t2i_samples.png", "t2i_plain_samples.png"))
    assert a != b
    with pytest.raises(ValidationError, match="negative_prompts has no effect at guidance_scale 1"):
        EvaluationSpec.model_validate({"t2i": t2i, "negative_prompts": True})
    with pytest.raises(ValidationError, match="negative_prompts applies to T2I"):
        EvaluationSpec.model_validate({"guidance_scale": 4.0, "negative_prompts": True})
