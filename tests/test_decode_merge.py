"""Decoding fast paths on the CPU: merged per-task LoRA weights for one-token steps (lora.decode_weight) and the
one-pass conv-state update kernel (run through Triton's interpreter in a subprocess, when triton is installed)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from omnicore.plugins.backbones import build_mamba2
from omnicore.plugins.backbones.mamba2 import lora

torch.set_num_threads(2)


def tiny(dtype="float32", dropout=0.0, **kw):
    torch.manual_seed(0)
    m = build_mamba2(size="tiny", kernel="torch", dtype=dtype, lora=dict(tasks=["mmu", "t2i"], r=4, dropout=dropout),
                     **kw)
    torch.manual_seed(1)
    with torch.no_grad():  # peft starts lora_B at zero: give every adapter an effect
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    return m.eval()


def decode(m, x, task, P, merge: bool):
    """Prefill x[:, :P], then one-token steps; outputs of the steps and the final states."""
    m.merge_lora_decode = merge
    state = m.allocate_inference_state(x.shape[0], x.shape[1])
    with torch.no_grad():
        m(x[:, :P], task=task, state=state)
        steps = torch.cat([m(x[:, t:t + 1], task=task, state=state) for t in range(P, x.shape[1])], 1)
    return steps, [t.clone() for t in state.tensors()]


def in_projs(m):
    return [b.mixer.in_proj for b in m.layers]


@pytest.mark.parametrize("task", ["t2i", "mmu", None])
def test_merged_step_equals_peft_step(task):
    m = tiny()
    x = torch.randn(3, 12, 64)
    want, want_state = decode(m, x, task, 7, merge=False)
    assert not any(lora._DECODE_CACHE in p.__dict__ for p in in_projs(m))  # the unmerged run kept nothing
    got, got_state = decode(m, x, task, 7, merge=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_state, want_state):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    kept = [p.__dict__.get(lora._DECODE_CACHE, {}) for p in in_projs(m)]
    assert all(list(k) == ([task] if task else []) for k in kept)  # no task: in_proj alone, nothing to merge


def test_merged_weight_is_w_plus_scaled_ba_and_kept():
    m = tiny(dtype="float64")
    layer = m.layers[0].mixer.in_proj
    w = lora.decode_weight(layer, "t2i")
    ref = layer.base_layer.weight + layer.scaling["t2i"] * layer.lora_B["t2i"].weight @ layer.lora_A["t2i"].weight
    torch.testing.assert_close(w, ref)
    assert lora.decode_weight(layer, "t2i") is w  # cached: no recomputation
    assert lora.decode_weight(layer, "mmu") is not w and lora.decode_weight(layer, "mmu").data_ptr() != w.data_ptr()
    assert lora.decode_weight(layer, "lvg") is None and lora.decode_weight(layer, None) is None
    assert lora.decode_weight(m.layers[0].mixer.out_proj, "t2i") is None  # a plain Linear: nothing to merge


@pytest.mark.parametrize("what", ["lora_B", "lora_A", "base", "scaling", "state_dict"])
def test_changed_weights_are_seen_and_refreshed_in_place(what):
    m = tiny()
    x = torch.randn(2, 9, 64)
    decode(m, x, "t2i", 5, merge=True)
    layer = m.layers[1].mixer.in_proj
    before = lora.decode_weight(layer, "t2i")
    ptr, old = before.data_ptr(), before.clone()
    with torch.no_grad():
        if what == "lora_B":
            layer.lora_B["t2i"].weight.add_(0.3)
        elif what == "lora_A":
            layer.lora_A["t2i"].weight.mul_(2)
        elif what == "base":
            layer.base_layer.weight.add_(0.01)
        elif what == "scaling":
            layer.scaling["t2i"] *= 0.5
        else:  # a training checkpoint loaded into the model
            sd = {k: v + 0.01 if "lora_" in k else v for k, v in m.state_dict().items()}
            m.load_state_dict(sd)
    m.prepare_decode("t2i")  # what the decode engine does before replaying a captured step
    after = layer.__dict__[lora._DECODE_CACHE]["t2i"][1]
    assert after.data_ptr() == ptr and not torch.equal(after, old)  # same storage, new values
    got, _ = decode(m, x, "t2i", 5, merge=True)
    want, _ = decode(m, x, "t2i", 5, merge=False)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_prepare_decode_names_the_buffers_a_captured_step_reads():
    m = tiny(n_layer=3, attn_layer_idx=[1], attn_cfg=dict(num_heads=4))
    sig = m.prepare_decode("t2i")  # creates them before any step (the engine captures after this)
    assert len(sig) == 2 and all(s is not None for s in sig)
    with torch.no_grad():
        m.layers[0].mixer.in_proj.lora_B["t2i"].weight.add_(1.0)
    assert m.prepare_decode("t2i") == sig  # refreshed in place: a captured graph stays valid
    assert m.prepare_decode(None) == (None, None)  # no task: in_proj itself
    m.merge_lora_decode = False
    assert m.prepare_decode("t2i") == ()


def test_inference_tensor_weights_are_not_merged():
    with torch.inference_mode():  # parameters made here have no version counter: changes could not be seen
        m = tiny()
        x = torch.randn(2, 9, 64)
        lora._warned_inference = False
        with pytest.warns(UserWarning, match="inference tensors"):
            got, _ = decode(m, x, "t2i", 5, merge=True)
        want, _ = decode(m, x, "t2i", 5, merge=False)
    assert not any(lora._DECODE_CACHE in p.__dict__ and p.__dict__[lora._DECODE_CACHE] for p in in_projs(m))
    torch.testing.assert_close(got, want)


def test_training_and_prefill_keep_peft_semantics():
    m = tiny(dropout=0.5)
    layer = m.layers[0].mixer.in_proj
    assert lora.decode_weight(layer, "t2i") is not None  # eval: dropout is off, merging is exact
    m.train()
    assert lora.decode_weight(layer, "t2i") is None  # dropout active: peft's three products
    m.eval()
    lora.clear_decode_weights(m)
    x = torch.randn(2, 8, 64)
    state = m.allocate_inference_state(2, 8)
    with torch.no_grad():
        m(x[:, :6], task="t2i", state=state)  # prefill: peft's module call
    assert not any(lora._DECODE_CACHE in p.__dict__ for p in in_projs(m))
    out = m(x[:, 6:7], task="t2i", state=state)  # a step recording gradients: peft's module call, no merged weight
    assert out.grad_fn is not None and not any(lora._DECODE_CACHE in p.__dict__ for p in in_projs(m))


def test_peft_merged_adapter_decodes_without_a_second_copy():
    m = tiny()
    x = torch.randn(2, 10, 64)
    want, _ = decode(m, x, "t2i", 6, merge=True)
    lora.clear_decode_weights(m)
    m.merge_adapter("t2i")
    got, _ = decode(m, x, "t2i", 6, merge=True)
    assert not any(lora._DECODE_CACHE in p.__dict__ for p in in_projs(m))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    m.unmerge_adapter()


def test_hybrid_and_masked_steps_with_merged_weights():
    m = tiny(n_layer=3, attn_layer_idx=[1], attn_cfg=dict(num_heads=4, rotary_emb_dim=16))
    x = torch.randn(2, 9, 64)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, :3] = False
    outs = {}
    for merge in (False, True):
        m.merge_lora_decode = merge
        state = m.allocate_inference_state(2, 9)
        with torch.no_grad():
            steps = [m(x[:, :5], task="mmu", state=state, mask=mask[:, :5])]
            steps += [m(x[:, t:t + 1], task="mmu", state=state, mask=mask[:, t:t + 1]) for t in range(5, 9)]
        outs[merge] = torch.cat(steps, 1)
    torch.testing.assert_close(outs[True], outs[False], rtol=1e-5, atol=1e-5)


_INTERPRETED = textwrap.dedent("""
    import torch, torch.nn.functional as F
    from omnicore.plugins.backbones import build_mamba2
    from omnicore.plugins.backbones.mamba2 import triton_step

    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):  # the kernel against the PyTorch window, odd sizes
        for b, dim in [(3, 300), (1, 17)]:
            state = torch.randn(b, dim, 4, dtype=dtype)
            x = torch.randn(b, 2 * dim + 5, dtype=dtype)[:, 3:3 + dim]  # a strided slice, as in the step
            w, bias = torch.randn(dim, 4, dtype=dtype), torch.randn(dim, dtype=dtype)
            new = torch.cat([state[..., 1:], x[..., None]], -1)
            ref = F.silu((new.double() * w.double()).sum(-1) + bias.double())
            out = triton_step.conv_update(state, x, w, bias)
            assert torch.equal(state, new)
            err = float((out.double() - ref).abs().max() / ref.abs().max())
            assert err < (1e-6 if dtype == torch.float32 else 1e-2), (dtype, err)
            assert out.dtype == dtype and out.is_contiguous()
    # the mixer step with the kernel equals the PyTorch step (fp32), prefill -> decode hand-off included
    m = build_mamba2(size="tiny", kernel="torch", dtype="float32").eval()
    x = torch.randn(2, 10, 64)
    outs = {}
    for conv_kernel in (False, True):
        state = m.allocate_inference_state(2, 10)
        with torch.no_grad():
            m(x[:, :6], state=state)
            steps = []
            for t in range(6, 10):
                h, res = x[:, t:t + 1], None
                for i, block in enumerate(m.layers):
                    h, res = block(h, res, state.layers[i], conv_kernel=conv_kernel)
                steps.append(m.norm_f((h + res).to(m.norm_f.weight.dtype)))
        outs[conv_kernel] = (torch.cat(steps, 1), [c.conv_state.clone() for c in state.layers])
    assert torch.allclose(outs[True][0], outs[False][0], rtol=1e-5, atol=1e-5)
    assert torch.equal(outs[True][1][0], outs[False][1][0])  # the first layer's window: the same inputs, moved
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-5) for a, b in zip(outs[True][1], outs[False][1]))
    print("ok")
""")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (its interpreter runs on CPU)")
def test_conv_update_kernel_in_the_triton_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", _INTERPRETED], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout[-2000:] + r.stderr[-4000:]
