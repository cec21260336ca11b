"""Task LoRA on the Mamba-2 backbone (peft): selection per forward, gradients, save/load, merge, refusals."""

from __future__ import annotations

import pytest
import torch

from omnicore.plugins.backbones import build_mamba2

torch.set_num_threads(2)
F64 = torch.float64


def with_adapters(**kw):
    torch.manual_seed(0)
    m = build_mamba2(size="tiny", kernel="torch", dtype="float64", lora=dict(tasks=["mmu", "t2i"], r=4, **kw))
    torch.manual_seed(1)
    with torch.no_grad():  # peft starts lora_B at zero: give every adapter an effect
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    return m.eval()


def test_adapters_on_every_mamba_in_proj():
    m = with_adapters()
    names = [n for n, _ in m.named_parameters() if ".lora_" in n]
    assert names == [f"layers.{i}.mixer.in_proj.lora_{ab}.{t}.weight"
                     for i in range(2) for ab in "AB" for t in ("mmu", "t2i")]
    assert m.tasks == ["mmu", "t2i"]


def test_task_selects_adapter_and_unknown_task_errors():
    m = with_adapters()
    x = torch.randn(2, 9, 64, dtype=F64)
    base, mmu, t2i = m(x), m(x, task="mmu"), m(x, task="t2i")
    assert not torch.allclose(base, mmu) and not torch.allclose(mmu, t2i)
    torch.testing.assert_close(m(x, task="mmu"), mmu)  # switching back is exact
    torch.testing.assert_close(m(x), base)
    with pytest.raises(ValueError, match="mmu, t2i"):
        m(x, task="lvg")


def test_decode_uses_the_adapter():
    m = with_adapters()
    x = torch.randn(1, 8, 64, dtype=F64)
    full = m(x, task="t2i")
    state = m.allocate_inference_state(1, 8)
    outs = [m(x[:, :5], task="t2i", state=state)] + [m(x[:, t:t + 1], task="t2i", state=state) for t in range(5, 8)]
    torch.testing.assert_close(torch.cat(outs, 1), full)


def test_only_active_adapter_gets_grads():
    m = with_adapters()
    m.train()
    m(torch.randn(2, 6, 64, dtype=F64), task="mmu").sum().backward()
    got = {n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got == {n for n, _ in m.named_parameters() if ".mmu." in n}
    # the base is frozen after add_task_adapters; unfreezing it gives it grads too
    m.zero_grad(set_to_none=True)
    for p in m.base_parameters():
        p.requires_grad_(True)
    m(torch.randn(2, 6, 64, dtype=F64), task="t2i").sum().backward()
    with_grad = {n for n, p in m.named_parameters() if p.grad is not None}
    assert not any(".mmu." in n for n in with_grad) and "layers.0.mixer.A_log" in with_grad
    assert sum(p.numel() for p in m.adapter_parameters("t2i")) == 2 * 4 * (64 + 296)


def test_checkpointing_alternating_tasks_keeps_each_adapter():
    m = with_adapters()
    m.train()
    x = torch.randn(2, 6, 64, dtype=F64)
    params = list(m.adapter_parameters())

    def grads():
        torch.manual_seed(7)  # the same LoRA dropout masks in both runs
        loss = m(x, task="mmu").square().sum() + m(x, task="t2i").sum()
        return torch.autograd.grad(loss, params)

    plain = grads()
    m.gradient_checkpointing = True
    for a, b in zip(plain, grads()):
        torch.testing.assert_close(a, b)


def test_save_load_round_trip(tmp_path):
    m = with_adapters()
    x = torch.randn(1, 7, 64, dtype=F64)
    file = m.save_adapters(tmp_path)
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        assert all(".lora_" in k for k in f.keys()) and len(list(f.keys())) == 8
    torch.manual_seed(0)
    fresh = build_mamba2(size="tiny", kernel="torch", dtype="float64").eval()  # same base weights (seed 0)
    assert fresh.load_adapters(tmp_path) == ["mmu", "t2i"]
    for task in ("mmu", "t2i"):
        torch.testing.assert_close(fresh(x, task=task), m(x, task=task))


def test_merge_gives_same_output():
    m = with_adapters()
    x = torch.randn(1, 7, 64, dtype=F64)
    want = m(x, task="t2i")
    m.merge_adapter("t2i")
    torch.testing.assert_close(m(x, task="t2i"), want)
    with pytest.raises(ValueError, match="merged"):
        m(x, task="mmu")
    m.unmerge_adapter()
    torch.testing.assert_close(m(x, task="t2i"), want)


def test_mamba_state_dict_loads_with_adapters():
    m = with_adapters()
    torch.manual_seed(3)
    plain = build_mamba2(size="tiny", kernel="torch", dtype="float64").eval()
    lm = {"backbone." + k: v for k, v in plain.state_dict().items()} | {"backbone.embedding.weight": torch.zeros(3, 64)}
    assert m.load_mamba_state_dict(lm) == ([], [])
    x = torch.randn(1, 5, 64, dtype=F64)
    torch.testing.assert_close(m(x), plain(x))  # no task: the base alone


@pytest.mark.parametrize("target", ["out_proj", "conv1d", "mixer.out_proj", "x_proj"])
def test_refused_targets(target):
    m = build_mamba2(size="tiny")
    with pytest.raises(ValueError, match="refused"):
        m.add_task_adapters(tasks=["mmu"], target_modules=(target,))


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_fused_lora_product_is_peft_forward_and_backward(training):
    """lora_linear.fused_lora_linear (the CUDA training path's in_proj) computes peft's LoRA forward, gradients too."""
    from omnicore.plugins.backbones.mamba2.lora_linear import fused_lora_linear

    m = with_adapters(dropout=0.0)
    m.train(training)
    layer = m.layers[0].mixer.in_proj
    from omnicore.plugins.backbones.mamba2 import lora

    lora.activate([layer], "t2i")
    x = torch.randn(2, 5, 64, dtype=F64, requires_grad=True)
    outs, grads = [], []
    for fn in (layer, lambda u: fused_lora_linear(layer, u)):
        out = fn(x)
        out.pow(2).sum().backward()
        outs.append(out.detach())
        grads.append([x.grad.clone()] + [p.grad.clone() for p in (layer.lora_A["t2i"].weight, layer.lora_B["t2i"].weight)])
        x.grad = None
        for p in layer.parameters():
            p.grad = None
    torch.testing.assert_close(outs[1], outs[0])
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b)
    lora.activate([layer], None)  # no adapter active: not this path's to compute
    assert fused_lora_linear(layer, x) is None
    layer._active_adapter = ["mmu", "t2i"]  # a case it does not cover falls back, saying why
    with pytest.warns(UserWarning, match="fused LoRA product not used \\(2 adapters active at once\\)"):
        assert fused_lora_linear(layer, x) is None
