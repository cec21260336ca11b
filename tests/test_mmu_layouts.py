"""The MMU input layout as a swappable part of the model: OmniMamba's named templates give the ids they always gave,
the InternVL / HoVLE layout gives the ids InternVL's tokenizer reads from its prompt text, a Hugging Face chat
template becomes a layout (kept inline in a saved model), and plugins register layouts through a hook."""

from __future__ import annotations

import json

import pytest
import torch

import omnicore
from omnicore import hookimpl
from omnicore.errors import OmnicoreError
from omnicore.model.layout import ChatLayout, Layout, MMULayout, mmu_layout
from omnicore.plugin_host import host
from omnicore.training.data import MMUCollator

from test_transformer_backbone import write_tokenizer

TURNS = [{"question": "What color is it?", "answer": " red "}, {"question": " Is it red? ", "answer": "yes"}]
T2I = [260, 258, 265, 265, 265, 265, 265, 265, 277, 274, 259, 256]
# ids the layout gave before it became swappable (the same code, run on this byte tokenizer), per template
BEFORE = {
    "omnicore": ({259, 266},
                 [267, 270, 272, 274, 275, 10, 277, 259, 73, 115, 274, 278, 275, 10, 121, 101, 115, 259],
                 [-100] * 6 + [277, 259] + [-100] * 6 + [121, 101, 115, 259]),
    "omnimamba-chat": ({266},
                       [85, 83, 69, 82, 58, 268, 270, 272, 274, 275, 32, 65, 83, 83, 73, 83, 84, 65, 78, 84, 58, 277,
                        266, 259, 85, 83, 69, 82, 58, 32, 32, 73, 115, 274, 278, 275, 32, 32, 65, 83, 83, 73, 83, 84,
                        65, 78, 84, 58, 121, 101, 115, 266, 259],
                       [-100] * 21 + [277, 266, 259] + [-100] * 24 + [121, 101, 115, 266, 259]),
    "omnimamba-train": ({266},
                        [73, 110, 58, 268, 270, 272, 274, 275, 10, 79, 117, 116, 58, 32, 277, 266, 259, 73, 110, 58,
                         32, 32, 73, 115, 274, 278, 275, 32, 10, 79, 117, 116, 58, 32, 121, 101, 115, 266, 259],
                        [-100] * 14 + [277, 266, 259] + [-100] * 17 + [121, 101, 115, 266, 259]),
    "Q: {question} A:": ({266},
                         [81, 58, 268, 270, 272, 274, 275, 32, 65, 58, 277, 266, 259, 81, 58, 32, 32, 73, 115, 274,
                          278, 275, 32, 32, 65, 58, 121, 101, 115, 266, 259],
                         [-100] * 10 + [277, 266, 259] + [-100] * 13 + [121, 101, 115, 266, 259]),
}


@pytest.fixture(scope="module")
def byte_tok():
    return omnicore.create("text_tokenizer", "byte", words=["What", "color", "is", "it", "?", "red"])


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory):
    path = write_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    return omnicore.create("text_tokenizer", "hf_tokenizer", path=str(path))


@pytest.mark.parametrize("template", list(BEFORE))
def test_omnimamba_layouts_give_the_ids_they_gave_before(byte_tok, template):
    stops, ids, labels = BEFORE[template]
    layout = Layout(byte_tok, 8, 64, mmu_template=template)
    assert layout.mmu_head_ids == [261, 256] and layout.mmu_tail_ids == [257, 258]
    assert layout.mmu_stop_ids == stops
    assert layout.mmu_text(TURNS) == (ids, labels)
    assert layout.t2i_prefix("red it") == T2I
    batch = MMUCollator(layout, None, 32)([{"turns": TURNS}])
    assert batch["text_ids"][0].tolist() == ids and batch["labels"][0].tolist() == labels


def test_internvl_layout_reads_as_internvls_prompt_text(hf_tok):
    layout = Layout(hf_tok, 8, 256, mmu_template="internvl")
    chat = layout.mmu
    assert isinstance(chat, ChatLayout)
    slots = 5
    prompt = chat.prompt_text("What color is it?", slots)
    assert prompt == ("<|im_start|>user\n<img>" + "<IMG_CONTEXT>" * slots
                      + "</img>\nWhat color is it?<|im_end|><|im_start|>assistant\n")
    context = hf_tok.encode("<IMG_CONTEXT>")
    assert len(context) == 1
    # [head, slots, tail, question]: exactly the ids of the whole prompt text, image slots where <IMG_CONTEXT> is
    assert (layout.mmu_head_ids + context * slots + layout.mmu_tail_ids + layout.question_ids("What color is it?")
            == hf_tok.encode(prompt))
    im_end = hf_tok.encode("<|im_end|>")[0]
    assert layout.mmu_stop_ids == {im_end, hf_tok.eos_id}
    ids, labels = layout.mmu_text([{"question": "What color is it?", "answer": " red "},
                                   {"question": "Is it red?", "answer": "yes"}])
    second = "<|im_start|>user\nIs it red?<|im_end|><|im_start|>assistant\n"
    assert ids == hf_tok.encode("\nWhat color is it?<|im_end|><|im_start|>assistant\nred<|im_end|>"
                                + second + "yes<|im_end|>")
    answered = [i for i, lab in zip(ids, labels) if lab != -100]
    assert answered == hf_tok.encode("red<|im_end|>yes<|im_end|>")


def test_a_layout_the_tokenizer_cannot_stop_is_refused_at_build(byte_tok):
    spec = {"text_tokenizer": {"type": "byte"}, "mmu_template": "internvl",
            "backbone": {"type": "transformer", "params": {"d_model": 32, "n_layer": 1, "n_head": 2}},
            "heads": {"text": {"type": "text_vocab"}}}
    with pytest.raises(OmnicoreError, match=r"its stop '<\|im_end\|>' is 10 tokens of the text tokenizer, not one"):
        omnicore.build(spec)
    with pytest.raises(OmnicoreError, match=r"neither a layout name \(omnicore, omnimamba-chat, omnimamba-train, "
                                            r".*internvl.*\).*\{question\} placeholder"):
        mmu_layout("intervnl")


# a ChatML template of the kind Qwen2 directories carry in tokenizer_config.json
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
          "{% endif %}")


def test_a_chat_template_becomes_a_layout_kept_inline_in_the_saved_model(tmp_path, hf_tok):
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML, "eos_token": "<|im_end|>"}))
    layout = mmu_layout(f"chat_template:{hf_dir}")
    assert layout == ChatLayout(head="<|im_start|>user\n<img>", tail="</img>",
                                question="\n{question}<|im_end|>\n<|im_start|>assistant\n", answer_end="<|im_end|>\n",
                                stop="<|im_end|>",
                                next_question="<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")
    tok_path = write_tokenizer(tmp_path / "tok" / "tokenizer.json")
    spec = {"text_tokenizer": {"type": "hf_tokenizer", "params": {"path": str(tok_path)}},
            "mmu_template": f"chat_template:{hf_dir}",
            "backbone": {"type": "transformer", "params": {"d_model": 32, "n_layer": 1, "n_head": 2}},
            "heads": {"text": {"type": "text_lm"}}}
    model = omnicore.build(spec)
    model.save(tmp_path / "model")
    (hf_dir / "tokenizer_config.json").unlink()  # the saved model needs the template file no more
    saved = json.loads((tmp_path / "model" / "config.json").read_text())["model"]["mmu_template"]
    assert saved.startswith("chat:")
    again = omnicore.load(tmp_path / "model")
    assert again.layout.mmu == layout
    assert again.layout.question_ids("hi") == hf_tok.encode("\nhi<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(OmnicoreError, match="chat_template"):
        mmu_layout(f"chat_template:{hf_dir}")
    (hf_dir / "t.jinja").write_text("{{ messages[0]['content'] }}")  # shows no answer
    with pytest.raises(OmnicoreError, match="t.jinja: an assistant turn does not continue the prompt"):
        mmu_layout(f"chat_template:{hf_dir / 't.jinja'}")
    (hf_dir / "t.jinja").write_text("{% for m in messages[:2] %}{{ m['content'] }}|{% endfor %}")  # one exchange
    with pytest.raises(OmnicoreError, match="a second user turn does not continue the first answer"):
        mmu_layout(f"chat_template:{hf_dir / 't.jinja'}")


def test_the_model_embeds_the_layouts_head_and_tail_around_the_image(tmp_path, hf_tok):
    tok_path = write_tokenizer(tmp_path / "tokenizer.json")
    model = omnicore.build({
        "image_size": 32, "mmu_template": "internvl",
        "encoder": {"type": "timm_vit", "params": {"model_name": "vit_tiny_patch16_224", "image_size": 32,
                                                   "model_kwargs": {"patch_size": 16, "embed_dim": 32, "depth": 2,
                                                                    "num_heads": 2}}},
        "projector": {"type": "mlp_gelu"},
        "text_tokenizer": {"type": "hf_tokenizer", "params": {"path": str(tok_path)}},
        "backbone": {"type": "transformer", "params": {"d_model": 32, "n_layer": 1, "n_head": 2}},
        "heads": {"text": {"type": "text_lm"}}}).eval()
    head, tail = model.layout.mmu_head_ids, model.layout.mmu_tail_ids
    assert model.mmu_prefix_len == len(head) + 4 + len(tail) and len(head) > 2
    text = torch.tensor([model.layout.question_ids("hi")])
    with torch.no_grad():
        x = model.mmu_embeddings(torch.zeros(1, 3, 32, 32), torch.ones(1), text, 1)
        assert torch.equal(x[0, : len(head)], model.text_embed(torch.tensor(head)))
        assert torch.equal(x[0, len(head) + 4: model.mmu_prefix_len], model.text_embed(torch.tensor(tail)))
        assert torch.equal(x[0, model.mmu_prefix_len:], model.text_embed(text[0]))


class LayoutPlugin:
    @hookimpl
    def register_mmu_layouts(self, register):
        register("test-qa", lambda: ChatLayout(head="<img>", tail="</img>", question="Q: {question}\nA:",
                                               answer_end="<|im_end|>", stop="<|im_end|>"))
        register("not-a-layout", lambda: "a string")


@pytest.fixture
def layout_plugin(fresh_registry):
    host.register_module(LayoutPlugin(), name="layouts")
    fresh_registry.reset()
    yield
    host.unregister("layouts")


def test_plugins_register_layouts_through_the_hook(layout_plugin, hf_tok):
    assert {"internvl", "test-qa"} <= {c.name for c in omnicore.list_components("mmu_layout")}
    layout = Layout(hf_tok, 8, 64, mmu_template="test-qa")
    assert isinstance(layout.mmu, MMULayout)
    assert layout.question_ids("hi") == hf_tok.encode("Q: hi\nA:")
    from omnicore.recipe.schema import ModelSpec

    spec = ModelSpec.model_validate({"backbone": {"type": "mamba2"}, "mmu_template": "test-qa"})
    assert spec.mmu_template == "test-qa"
    with pytest.raises(OmnicoreError, match="its plugin returned str, not an MMULayout"):
        mmu_layout("not-a-layout")
