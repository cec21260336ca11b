"""Recipe files: schema errors with file:line, extends, overrides, and registry-aware validation."""

from __future__ import annotations

import textwrap

import pytest

from omnicore import hookimpl
from omnicore.errors import RecipeError
from omnicore.plugin_host import host
from omnicore.recipe import load_recipe
from omnicore.recipe.validate import validate_recipe

BASE = """\
# a test recipe
seed: 3
model:
  text_tokenizer: {type: t_tok}
  backbone:
    type: t_backbone
    params: {width: 8, lora: {tasks: [mmu, t2i]}}
  heads:
    text: {type: t_head}
stages:
  - name: first
    tasks:
      mmu: {batch_size: 4, data: {type: t_data, params: {n: 5}}}
    train: {roles: [backbone], adapters: [mmu]}
    optimizer: {lr: 1.0e-3}
    steps: 10
  - name: second
    tasks:
      mmu: {batch_size: 2, data: {type: t_data}}
    optimizer: {lr: 1.0e-4}
    steps: 5
"""


class Components:
    @hookimpl
    def register_backbones(self, register):
        def t_backbone(width: int, lora: dict | None = None):
            return width
        register("t_backbone", t_backbone)

    @hookimpl
    def register_text_tokenizers(self, register):
        register("t_tok", lambda: None)

    @hookimpl
    def register_heads(self, register):
        def t_head(vocab_size: int, d_model: int, scale: float = 1.0):
            return None
        register("t_head", t_head)

    @hookimpl
    def register_datasets(self, register):
        def t_data(n: int = 3):
            return list(range(n))
        register("t_data", t_data)


@pytest.fixture
def components(fresh_registry):
    host.register_module(Components(), name="recipe-test-components")
    fresh_registry.reset()
    yield
    host.unregister("recipe-test-components")


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def test_loads_and_types_values(tmp_path):
    r = load_recipe(write(tmp_path, "r.yaml", BASE)).recipe
    assert r.seed == 3 and r.stages[0].optimizer.lr == 1e-3 and r.stages[1].steps == 5
    assert r.stages[0].schedule.kind == "cosine"  # defaults filled in


def test_unknown_key_points_at_file_and_line(tmp_path):
    path = write(tmp_path, "r.yaml", BASE.replace("    steps: 10", "    steps: 10\n    stepz: 3"))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert str(info.value) == f"{path}:17: stages.0.stepz: unknown key"


def test_wrong_type_points_at_value(tmp_path):
    path = write(tmp_path, "r.yaml", BASE.replace("lr: 1.0e-4", "lr: fast"))
    with pytest.raises(RecipeError, match=rf"{path}:20: stages.1.optimizer.lr: .*valid number.*'fast'"):
        load_recipe(path)


def test_extends_merges_and_child_wins(tmp_path):
    write(tmp_path, "base.yaml", BASE)
    child = write(tmp_path, "child.yaml", """\
        extends: base.yaml
        seed: 9
        model:
          backbone: {params: {width: 16}}
        """)
    r = load_recipe(child).recipe
    assert r.seed == 9 and r.model.backbone.params["width"] == 16
    assert r.model.backbone.type == "t_backbone" and len(r.stages) == 2


def test_extends_cycle_is_an_error(tmp_path):
    write(tmp_path, "a.yaml", "extends: b.yaml\nseed: 1\n")
    write(tmp_path, "b.yaml", "extends: a.yaml\nseed: 2\n")
    with pytest.raises(RecipeError, match="'extends' cycle"):
        load_recipe(tmp_path / "a.yaml")


def test_overrides_set_delete_and_address_stages_by_name(tmp_path):
    path = write(tmp_path, "r.yaml", BASE)
    loaded = load_recipe(path, ["stages.second.steps=7", "seed=11", "~stages.first.train.adapters",
                                "stages.0.optimizer.betas=[0.8, 0.9]"])
    r = loaded.recipe
    assert r.stages[1].steps == 7 and r.seed == 11 and r.stages[0].train.adapters == []
    assert r.stages[0].optimizer.betas == (0.8, 0.9)


def test_ema_is_a_stage_option_with_a_decay_below_one(tmp_path):
    path = write(tmp_path, "r.yaml", BASE)
    r = load_recipe(path, ["stages.second.ema=0.99"]).recipe
    assert r.stages[1].ema == 0.99 and r.stages[0].ema is None  # off unless asked for
    for bad in ("1.0", "0", "-0.5"):
        with pytest.raises(RecipeError, match=r"stages\.1\.ema: Input should be (less|greater) than"):
            load_recipe(path, [f"stages.second.ema={bad}"])


def test_evaluation_component_scale_is_off_unless_set_and_must_be_positive(tmp_path):
    path = write(tmp_path, "r.yaml", BASE + "evaluation:\n  t2i: {type: t_data}\n  guidance_scale: 3.0\n")
    assert load_recipe(path).recipe.evaluation.component_scale is None
    assert load_recipe(path, ["evaluation.component_scale=2"]).recipe.evaluation.component_scale == 2.0
    for bad, why in (("0", "greater than 0"), ("-1", "greater than 0"), ("inf", "finite number"),
                     ("much", "valid number")):
        with pytest.raises(RecipeError, match=f"evaluation.component_scale: Input should be a? ?{why}"):
            load_recipe(path, [f"evaluation.component_scale={bad}"])
    with pytest.raises(RecipeError, match="component_scale applies to T2I: give a 't2i' dataset"):
        load_recipe(path, ["evaluation.component_scale=2", "~evaluation.t2i"])


@pytest.mark.parametrize("override, message", [
    ("stages.second.steps=many", "override 'stages.second.steps=many': stages.1.steps: Input should be a valid integer"),
    ("stages.third.steps=1", "no list item named 'third'; names: first, second"),
    ("~stages.first.nothing", "stages.first.nothing is not set"),
    ("seed", "expected key.path=value"),
])
def test_bad_overrides(tmp_path, override, message):
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load_recipe(write(tmp_path, "r.yaml", BASE), [override])


def test_validate_accepts_good_recipe(tmp_path, components):
    assert validate_recipe(load_recipe(write(tmp_path, "r.yaml", BASE))) == []


def test_validate_reports_names_params_and_references(tmp_path, components):
    text = (BASE.replace("type: t_head", "type: t_haed")
                .replace("params: {n: 5}", "params: {m: 5}")
                .replace("adapters: [mmu]", "adapters: [vqa]"))
    path = write(tmp_path, "r.yaml", text)
    problems = validate_recipe(load_recipe(path))
    assert problems[0].startswith(f"{path}:9: model.heads.text.type: no head named 't_haed'; closest: t_head")
    assert problems[1:] == [
        f"{path}:13: stages.0.tasks.mmu.data.params: dataset 't_data': unknown parameter 'm'; accepted: n",
        f"{path}:14: stages.0.train.adapters.0: no LoRA adapter 'vqa' (model.backbone.params.lora.tasks: mmu, t2i)",
    ]


def test_injected_params_may_be_omitted_but_are_still_checked(tmp_path, components):
    path = write(tmp_path, "r.yaml", BASE.replace("text: {type: t_head}", "text: {type: t_head, params: {scale: big}}"))
    (problem,) = validate_recipe(load_recipe(path))
    assert "heads.text.params: head 't_head': parameter 'scale'" in problem
