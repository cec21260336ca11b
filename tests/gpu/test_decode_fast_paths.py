"""GPU: the decode step's fast paths give what the plain step gives: merged per-task LoRA weights (one in_proj
product instead of peft's three, in the step and the prefill), the one-pass conv-state update kernel, the prefill's
Triton causal conv and short scan and (compiled)
the gated norm folded into the state update, eager and compiled; the fused small-batch step (three Triton kernels a
layer, fused_step.py); a kept CUDA graph sees weights changed after its capture.

Run on a machine with CUDA: ``pytest -m gpu tests/gpu/test_decode_fast_paths.py -q -s``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import omnicore
from omnicore.generation.engine import generate_codes
from omnicore.generation.sampling import Sampling
from omnicore.plugins.backbones import build_mamba2
from omnicore.plugins.backbones.mamba2 import kernels

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def rel(a, b) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@torch.inference_mode()
def test_conv_update_kernel_matches_pytorch(dtype):
    from omnicore.plugins.backbones.mamba2 import triton_step

    torch.manual_seed(0)
    for b, dim in [(64, 4352), (3, 300)]:
        state = torch.randn(b, dim, 4, device="cuda", dtype=dtype)
        x = torch.randn(b, dim + 100, device="cuda", dtype=dtype)[:, 50:50 + dim]
        w, bias = torch.randn(dim, 4, device="cuda", dtype=dtype), torch.randn(dim, device="cuda", dtype=dtype)
        new = torch.cat([state[..., 1:], x[..., None]], -1)
        ref = F.silu((new.double() * w.double()).sum(-1) + bias.double())
        out = kernels.conv_update(state, x, w, bias)
        assert torch.equal(state, new)
        err = rel(out, ref)
        print(f"\nconv update kernel {dtype} b={b} dim={dim}: rel_err={err:.2e}")
        assert err < (1e-5 if dtype == torch.float32 else 1e-2)
        assert triton_step.conv_update(state, x, w, None, silu=False).shape == (b, dim)


# fp32 1e-3: the plain prefill's chunked scan (mamba_ssm) multiplies in TF32; its final state is ~1e-3 off the exact
# one where the short scan's is ~1e-6 (tests/gpu/test_mamba2_parity.py's short-scan rows)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-3), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_merged_lora_and_conv_kernel_match_the_plain_step(compiled, dtype, tol):
    torch.manual_seed(0)  # built outside inference mode: inference-tensor weights are never merged
    m = build_mamba2(d_model=512, n_layer=4, lora={"tasks": ["mmu", "t2i"]}, device="cuda",
                     dtype=str(dtype).split(".")[-1]).eval()
    with torch.no_grad():
        for p in m.adapter_parameters():
            p.normal_(std=0.02)
    m.compile_decode = compiled
    with torch.inference_mode():
        _compare_plain_and_fast(m, compiled, dtype, tol)


def _compare_plain_and_fast(m, compiled, dtype, tol):
    from omnicore.plugins.backbones.mamba2 import lora

    B, P, N = 8, 17, 6
    x = torch.randn(B, P + N, 512, device="cuda", dtype=dtype)
    outs = {}
    old = kernels.CONV_UPDATE_IMPL, kernels.PREFILL_CONV_IMPL, kernels.FOLD_GATED_NORM_BELOW, kernels.SHORT_SCAN
    try:
        for fast in (False, True):
            kernels.CONV_UPDATE_IMPL = kernels.PREFILL_CONV_IMPL = "triton" if fast else "torch"
            kernels.SHORT_SCAN = fast
            kernels.FOLD_GATED_NORM_BELOW = 1 << 30 if fast else 0  # compiled: the norm's scale in the next block
            m.merge_lora_decode = fast
            state = m.allocate_inference_state(B, P + N)
            prefill = m(x[:, :P], task="t2i", state=state)  # fast: merged weight and short scan (CUDA prefill)
            steps = [m(x[:, t:t + 1], task="t2i", state=state) for t in range(P, P + N)]
            outs[fast] = (torch.cat(steps, 1).float(), state.layers[-1].ssm_state.float(),
                          state.layers[-1].conv_state.float(), prefill.float())
    finally:
        kernels.CONV_UPDATE_IMPL, kernels.PREFILL_CONV_IMPL, kernels.FOLD_GATED_NORM_BELOW, kernels.SHORT_SCAN = old
        m.merge_lora_decode = True
    assert all("t2i" in b.mixer.in_proj.__dict__.get(lora._DECODE_CACHE, {}) for b in m.layers)  # merged ran
    for i, what in enumerate(("outputs", "final ssm state", "final conv state", "prefill")):
        err = rel(outs[True][i], outs[False][i])
        print(f"\nmerged lora + conv kernel vs plain step, {'compiled' if compiled else 'eager'} {what} ({dtype}): "
              f"rel_err={err:.2e}")
        assert err < tol


@pytest.mark.parametrize("d_model", [512, 2048])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_fused_small_batch_step_matches_the_plain_step(d_model, dtype, tol):
    """Batches 1 to 4 (the GEMV) and 5 to 128 (the tensor-core products; in_proj's 2320 columns at width 512 end
    inside a tile; 2048 is the 1.3B layer): outputs and both caches of every layer after a prefill and six fused
    steps, against the eager plain step; also a CUDA graph of the fused step replays what it computed eagerly."""
    from omnicore.generation.graphs import GraphedStep
    from omnicore.plugins.backbones.mamba2 import fused_step

    torch.manual_seed(0)
    m = build_mamba2(d_model=d_model, n_layer=3, lora={"tasks": ["mmu", "t2i"]}, device="cuda",
                     dtype=str(dtype).split(".")[-1]).eval()
    with torch.no_grad():
        for p in m.adapter_parameters():
            p.normal_(std=0.02)
    m.compile_decode = False
    P, N = 9, 6
    ranges = fused_step.MAX_BATCH, fused_step.MIN_GEMM_BATCH
    fused_step.MAX_BATCH, fused_step.MIN_GEMM_BATCH = 4, 5  # every row count the kernels take
    with torch.inference_mode():
        for B in (1, 2, 3, 4, 5, 16, 64, 128):
            x = torch.randn(B, P + N, d_model, device="cuda", dtype=dtype)
            assert fused_step.plan(m, x[:, :1], "t2i") is not None
            outs = {}
            for fused in (False, True):
                m.fused_decode = fused
                state = m.allocate_inference_state(B, P + N)
                m(x[:, :P], task="t2i", state=state)
                steps = [m(x[:, t:t + 1], task="t2i", state=state) for t in range(P, P + N)]
                outs[fused] = (torch.cat(steps, 1), state)
            ref, ref_state = outs[False]
            got, got_state = outs[True]
            errs = [rel(got, ref)]
            for a, c in zip(got_state.layers, ref_state.layers):
                errs += [rel(a.ssm_state, c.ssm_state), rel(a.conv_state, c.conv_state)]
            print(f"\nfused vs plain step, width {d_model} batch {B} {dtype}: outputs {errs[0]:.2e}, "
                  f"caches <= {max(errs[1:]):.2e}")
            assert max(errs) < tol, errs
            # graphed: the replay gives the eager fused step's output from the same state
            start = got_state.snapshot()
            h = x[:, -1:]
            eager = m(h, task="t2i", state=got_state)
            got_state.restore(start)
            kept = {}

            def run():
                kept["out"] = m(h, task="t2i", state=got_state)  # during capture: the graph's output buffer

            runner = GraphedStep(run, got_state.tensors(), True, torch.device("cuda"))
            got_state.restore(start)
            runner()  # warm-up, capture (the state restored after it), replay
            assert torch.equal(kept["out"], eager)
    m.fused_decode = True
    fused_step.MAX_BATCH, fused_step.MIN_GEMM_BATCH = ranges


def test_kept_graph_sees_changed_adapter_weights():
    torch.manual_seed(0)  # built outside inference mode: inference-tensor weights are never merged
    model = omnicore.build("quickstart").to("cuda").eval()
    captions = ["a red circle on the left", "a blue square on the right"]
    s = Sampling(temperature=1.0, top_k=8, seed=4)
    first = generate_codes(model, captions, 1.0, s, cuda_graph=True)  # captures and keeps the step's graph
    (ses,) = model._decode_sessions.values()
    runner = ses.runner

    def change_adapter():
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name and ".t2i." in name:
                    p.add_(0.2 * torch.randn_like(p))

    change_adapter()
    replayed = generate_codes(model, captions, 1.0, s, cuda_graph=True)  # the kept graph, merged weights refreshed
    eager = generate_codes(model, captions, 1.0, s, cuda_graph=False)
    assert not torch.equal(first, eager)
    assert torch.equal(replayed, eager) and ses.runner is runner  # replayed, not captured again
    shapes = [w.shape for w in lora_weights(model)]
    assert shapes
    model.backbone.clear_decode_weights()  # the buffers the kept graph reads are freed: it must be captured again
    junk = [torch.full(shape, float("nan"), device="cuda") for shape in shapes]  # likely in the freed blocks
    change_adapter()
    replayed = generate_codes(model, captions, 1.0, s, cuda_graph=True)
    assert ses.runner is not runner
    assert torch.equal(replayed, generate_codes(model, captions, 1.0, s, cuda_graph=False))
    del junk


def lora_weights(model):
    from omnicore.plugins.backbones.mamba2 import lora

    kept = [getattr(b.mixer, "in_proj", b).__dict__.get(lora._DECODE_CACHE, {}).get("t2i")
            for b in model.backbone.layers]
    return [hit[1] for hit in kept if hit is not None]
