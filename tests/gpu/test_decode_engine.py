"""GPU: the decode engine's CUDA graphs and the compiled decode step give what eager decoding gives.

Run on a machine with CUDA: ``pytest -m gpu tests/gpu/test_decode_engine.py -q``.
"""

from __future__ import annotations

import pytest
import torch

import omnicore
from omnicore.generation.engine import clear_decode_cache, generate_codes, generate_text
from omnicore.generation.sampling import Sampling
from omnicore.plugins.backbones import build_mamba2

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = omnicore.build("quickstart").to("cuda").eval()
    with torch.no_grad():  # give the adapters an effect (they start at zero)
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.add_(0.05 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("compiled", [False, True], ids=["eager-step", "compiled-step"])
def test_graph_replay_equals_eager_decoding(model, compiled):
    model.backbone.compile_decode = compiled
    captions = ["a red circle on the left", "a blue square on the right", None]
    s = Sampling(temperature=1.0, top_k=8, seed=4)
    for scale in (1.0, 3.0):
        graphed = [generate_codes(model, captions, scale, s, cuda_graph=True) for _ in range(2)]  # 2nd: replay
        eager = generate_codes(model, captions, scale, s, cuda_graph=False)
        assert torch.equal(graphed[0], graphed[1])
        agree = (graphed[0] == eager).float().mean().item()
        # same kernels: bitwise equal; compiled vs eager kernels: rare flips where sampled logits nearly tie
        assert agree == 1.0 if not compiled else agree > 0.97, agree
    qs = [model.layout.question_ids("What shape is it?"), model.layout.question_ids("hi")]
    for s in (Sampling(greedy=True, max_new_tokens=10), Sampling(temperature=0.8, top_p=0.9, seed=1,
                                                                    max_new_tokens=10, repetition_penalty=1.3)):
        a = generate_text(model, None, None, qs, s, cuda_graph=True)
        b = generate_text(model, None, None, qs, s, cuda_graph=False)
        assert a == b or compiled
    model.backbone.compile_decode = None


@pytest.mark.parametrize("compiled", [False, True], ids=["eager-step", "compiled-step"])
def test_pdl_changes_no_code(model, compiled):
    """Programmatic dependent launch (kernels.PDL, here from batch 1) only lets a kernel start while the one before
    it drains; each waits before it reads anything, so generations are bitwise those without it, graphed or eager.
    A kernel reading before its producer finished would show as changed codes. Batches 2 and 6 rows: the fused
    small-batch step (batch 1-2 without guidance) and the compiled or eager step."""
    from omnicore.plugins.backbones.mamba2 import kernels

    if not kernels.pdl_supported(torch.device("cuda")):
        pytest.skip("this GPU or triton has no programmatic dependent launch")
    model.backbone.compile_decode = compiled
    s = Sampling(temperature=1.0, top_k=8, seed=4)
    jobs = [(["a red circle on the left", "a blue square on the right"], 1.0),
            (["a red circle on the left", "a blue square on the right", None], 3.0)]
    outs = {}
    kept = kernels.PDL, kernels.PDL_MIN_BATCH
    try:
        for pdl in (False, True):
            kernels.PDL, kernels.PDL_MIN_BATCH = pdl, 1
            clear_decode_cache(model)  # graphs captured again under this setting
            outs[pdl] = [generate_codes(model, caps, scale, s, cuda_graph=graph)
                         for caps, scale in jobs for graph in (True, True, False)]
    finally:
        kernels.PDL, kernels.PDL_MIN_BATCH = kept
        clear_decode_cache(model)
        model.backbone.compile_decode = None
    for without, with_pdl in zip(outs[False], outs[True]):
        assert torch.equal(without, with_pdl)


def test_composed_guidance_graph_equals_eager(model):
    """Component streams (composable guidance) under CUDA graphs: the replayed graph gives the eager codes, and the
    components change them (a graph that dropped their rows would give plain guidance)."""
    model.backbone.compile_decode = False
    s = Sampling(temperature=1.0, top_k=8, seed=3)
    captions = ["a blue triangle on the right", "a red circle on the right"]
    comps = [["a blue shape", "a triangle"], ["a red shape", None]]
    graphed = [generate_codes(model, captions, 3.0, s, cuda_graph=True, components=comps, component_scale=2.0)
               for _ in range(2)]  # the second call replays the kept graphs
    eager = generate_codes(model, captions, 3.0, s, cuda_graph=False, components=comps, component_scale=2.0)
    assert torch.equal(graphed[0], graphed[1]) and torch.equal(graphed[1], eager)
    assert not torch.equal(eager, generate_codes(model, captions, 3.0, s, cuda_graph=True))
    model.backbone.compile_decode = None


def test_kept_prefill_graph_reads_each_calls_captions(model):
    """The T2I prefill is a captured graph over a prompt buffer: a later call with other captions (same shapes, so
    the kept graphs are replayed) must generate from its own captions, exactly as eager decoding does."""
    s = Sampling(temperature=1.0, top_k=8, seed=2)
    first = ["a red circle on the left", "a blue square on the right"]
    second = ["a yellow triangle on the right", None]
    generate_codes(model, first, 3.0, s, cuda_graph=True)  # captures both graphs
    replayed = generate_codes(model, second, 3.0, s, cuda_graph=True)
    eager = generate_codes(model, second, 3.0, s, cuda_graph=False)
    assert torch.equal(replayed, eager)
    assert not torch.equal(replayed, generate_codes(model, first, 3.0, s, cuda_graph=False))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
@torch.inference_mode()
def test_compiled_step_matches_eager_step(dtype, tol):
    torch.manual_seed(0)
    m = build_mamba2(d_model=512, n_layer=4, lora={"tasks": ["mmu", "t2i"]}, device="cuda",
                     dtype=str(dtype).split(".")[-1]).eval()
    with torch.no_grad():
        for p in m.adapter_parameters():
            p.normal_(std=0.02)
    m.fused_decode = False  # batch 3 would take the fused small-batch step (test_decode_fast_paths.py)
    B, P, N = 3, 17, 6
    x = torch.randn(B, P + N, 512, device="cuda", dtype=dtype)
    outs = {}
    for compiled in (False, True):
        m.compile_decode = compiled
        state = m.allocate_inference_state(B, P + N)
        m(x[:, :P], task="t2i", state=state)
        steps = [m(x[:, t:t + 1], task="t2i", state=state) for t in range(P, P + N)]
        outs[compiled] = (torch.cat(steps, 1).float(), state.layers[-1].ssm_state.float())
    for i, what in enumerate(("outputs", "final ssm state")):
        ref = outs[False][i]
        err = float((outs[True][i] - ref).abs().max() / ref.abs().max())
        print(f"\ncompiled vs eager decode step {what} ({dtype}): rel_err={err:.2e}")
        assert err < tol
