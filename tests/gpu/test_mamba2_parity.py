"""GPU: the PyTorch Mamba-2 path against mamba_ssm's Triton kernels (forward, gradients, decode, CUDA graphs).

Run on a machine with CUDA and mamba_ssm: ``pytest -m gpu tests/gpu -q -s``. Each comparison prints its
relative error (max |a - b| / max |b|); set PARITY_LOG=file to also append them there.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from omnicore.plugins.backbones import build_mamba2
from omnicore.plugins.backbones.mamba2 import kernels

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not kernels.mamba_ssm_available(), reason="needs CUDA and mamba_ssm's kernels")]

TOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2}  # fp32: Triton dots in IEEE mode (tests/gpu/conftest.py)
SHAPES = {  # name -> build params (the 1.3b mixer at full width, fewer layers)
    # the 1.3b mixer's headdim/d_state/chunk (Triton autotunes once per such shape), 2 groups, narrow
    "small": dict(d_model=256, n_layer=2, ngroups=2),
    "1.3b": dict(size="1.3b", n_layer=2),
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-12))


def report(what: str, err: float, dtype: torch.dtype) -> None:
    line = f"{what:<48} {str(dtype).replace('torch.', ''):<9} rel_err={err:.2e} tol={TOL[dtype]:.0e}"
    print("\n" + line, end="")
    if os.environ.get("PARITY_LOG"):
        with open(os.environ["PARITY_LOG"], "a") as f:
            f.write(line + "\n")
    assert err < TOL[dtype], line


def set_kernel(model, kernel: str) -> None:
    for block in model.layers:
        if hasattr(block.mixer, "kernel"):
            block.mixer.kernel = kernel


def model_for(shape: str, dtype, **extra):
    torch.manual_seed(0)
    params = {"compile_decode": False, **SHAPES[shape], **extra}  # these tests compare kernels, not the compiler
    return build_mamba2(**params, kernel="torch", device="cuda", dtype=str(dtype).split(".")[-1])


def run_both(model, x, g=None):
    """Outputs (and gradients of input + parameters when g is given) with each kernel."""
    results = {}
    for kernel in ("torch", "mamba_ssm"):
        set_kernel(model, kernel)
        if g is None:
            with torch.no_grad():
                results[kernel] = (model(x), None)
            continue
        xi = x.clone().requires_grad_(True)
        out = model(xi)
        results[kernel] = (out.detach(), torch.autograd.grad(out, [xi] + list(model.parameters()), g))
    return results


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_forward(shape, dtype):
    model = model_for(shape, dtype)
    L = 300 if shape == "small" else 512 + 37  # not a multiple of the chunk size
    x = torch.randn(2, L, model.d_model, device="cuda", dtype=dtype)
    res = run_both(model, x)
    report(f"forward {shape} L={L}", rel(res["mamba_ssm"][0], res["torch"][0]), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_gradients(shape, dtype):
    model = model_for(shape, dtype)
    for p in model.parameters():
        p.requires_grad_(True)
    L = 300 if shape == "small" else 512 + 37
    x = torch.randn(2, L, model.d_model, device="cuda", dtype=dtype)
    res = run_both(model, x, torch.randn_like(x))
    (o_t, g_t), (o_k, g_k) = res["torch"], res["mamba_ssm"]
    report(f"forward {shape} L={L} (train)", rel(o_k, o_t), dtype)
    names = ["input"] + [n for n, _ in model.named_parameters()]
    for name, a, b in zip(names, g_k, g_t):
        if name == "input" or "layers.0.mixer" in name:
            report(f"grad {shape} {name}", rel(a, b), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", list(SHAPES))
@torch.inference_mode()
def test_prefill_and_decode(shape, dtype):
    model = model_for(shape, dtype).eval()
    B, P, N = 3, 70, 12
    x = torch.randn(B, P + N, model.d_model, device="cuda", dtype=dtype)
    outs = {}
    for kernel in ("torch", "mamba_ssm"):
        set_kernel(model, kernel)
        state = model.allocate_inference_state(B, P + N)
        # later pieces continue the state; two are shorter than d_conv (the conv state then keeps older inputs)
        cuts = [0, P // 2, P // 2 + 2, P // 2 + 5, P]
        steps = [model(x[:, a:b], state=state) for a, b in zip(cuts, cuts[1:])]
        steps += [model(x[:, t:t + 1], state=state) for t in range(P, P + N)]
        outs[kernel] = (torch.cat(steps, 1), state.layers[0].ssm_state.clone())
    full = model(x)  # mamba_ssm kernel, one forward
    report(f"prefill+decode {shape} (mamba_ssm vs torch)", rel(outs["mamba_ssm"][0], outs["torch"][0]), dtype)
    report(f"final ssm state {shape}", rel(outs["mamba_ssm"][1], outs["torch"][1]), dtype)
    report(f"decode vs forward {shape} (mamba_ssm)", rel(outs["mamba_ssm"][0], full), dtype)


@torch.inference_mode()
def test_left_padding_with_kernels():
    model = model_for("small", torch.float32, **dict(attn_layer_idx=[1], n_layer=3,
                                                     attn_cfg=dict(num_heads=4, rotary_emb_dim=16))).eval()
    set_kernel(model, "mamba_ssm")
    lengths, L, new = [9, 40], 40, 6
    seqs = [torch.randn(1, n + new, 256, device="cuda") for n in lengths]
    x = torch.zeros(2, L, 256, device="cuda")
    mask = torch.zeros(2, L, dtype=torch.bool, device="cuda")
    for i, (s, n) in enumerate(zip(seqs, lengths)):
        x[i, L - n:], mask[i, L - n:] = s[0, :n], True
    state = model.allocate_inference_state(2, L + new)
    outs = [model(x, state=state, mask=mask)[:, -1:]]
    for t in range(new):
        outs.append(model(torch.cat([s[:, n + t:n + t + 1] for s, n in zip(seqs, lengths)]), state=state))
    batched = torch.cat(outs, 1)
    for i, (s, n) in enumerate(zip(seqs, lengths)):
        report(f"left padding row {i} (mamba_ssm, hybrid)", rel(batched[i], model(s)[0, n - 1:]), torch.float32)


@pytest.mark.parametrize("kernel", ["torch", "mamba_ssm"])
@torch.inference_mode()
def test_cuda_graph_decode_matches_eager(kernel):
    model = model_for("small", torch.bfloat16, **dict(attn_layer_idx=[1], n_layer=3, attn_cfg=dict(num_heads=4),
                                                      lora=dict(tasks=["mmu", "t2i"]))).eval()
    with torch.no_grad():
        for p in model.adapter_parameters():
            p.normal_(std=0.02)
    set_kernel(model, kernel)
    B, P, N = 4, 20, 8
    x = torch.randn(B, P + N, 256, device="cuda", dtype=torch.bfloat16)
    state = model.allocate_inference_state(B, P + N + 4)
    model(x[:, :P], task="t2i", state=state)
    snap = state.snapshot()
    eager = torch.cat([model(x[:, t:t + 1], task="t2i", state=state) for t in range(P, P + N)], 1)
    state.restore(snap)
    static_in = x[:, P:P + 1].clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            model(static_in, task="t2i", state=state)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = model(static_in, task="t2i", state=state)
    state.restore(snap)
    outs = []
    for t in range(P, P + N):
        static_in.copy_(x[:, t:t + 1])
        graph.replay()
        outs.append(static_out.clone())
    report(f"cuda graph decode vs eager ({kernel}, hybrid, lora)", rel(torch.cat(outs, 1), eager), torch.bfloat16)
    assert state.seqlen_offset == P + N


@torch.no_grad()
def test_lora_on_kernel_path():
    model = model_for("small", torch.float32, lora=dict(tasks=["mmu", "t2i"])).eval()  # eval: no LoRA dropout
    with torch.no_grad():
        for p in model.adapter_parameters():
            p.normal_(std=0.05)
    x = torch.randn(2, 100, 256, device="cuda")
    outs = {}
    for kernel in ("torch", "mamba_ssm"):
        set_kernel(model, kernel)
        outs[kernel] = [model(x, task=t) for t in (None, "mmu", "t2i")]
    assert rel(outs["mamba_ssm"][1], outs["mamba_ssm"][2]) > 1e-2  # the adapters act on the kernel path
    for task, a, b in zip(("none", "mmu", "t2i"), outs["mamba_ssm"], outs["torch"]):
        report(f"lora task={task} (mamba_ssm vs torch)", rel(a, b), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", ["triton", "mamba_ssm"])
def test_state_update_kernels_match_the_pytorch_step(impl, dtype):
    from omnicore.plugins.backbones.mamba2.ssd import ssd_step

    torch.manual_seed(0)
    old = kernels.STATE_UPDATE_IMPL
    kernels.STATE_UPDATE_IMPL = impl
    try:
        for b, h, p, n, g, d_hdim in [(64, 64, 64, 128, 1, False), (3, 6, 24, 20, 2, True)]:
            kw = dict(device="cuda", dtype=dtype)
            state = torch.randn(b, h, p, n, **kw)
            x, dt = torch.randn(b, h, p, **kw), torch.rand(b, h, device="cuda") * 0.1
            A, B, C = -torch.rand(h, device="cuda") * 4, torch.randn(b, g, n, **kw), torch.randn(b, g, n, **kw)
            D = torch.randn(h, p, **kw) if d_hdim else torch.randn(h, **kw)
            ref_state = state.double()
            ref_y = ssd_step(ref_state, x.double(), dt.double(), A.double(), B.double(), C.double(), D.double())
            raw_state = state.clone()
            y = kernels.state_update(state, x, dt, A, B, C, D)
            report(f"state update {impl} y {(b, h, p, n, g)}", rel(y, ref_y), dtype)
            report(f"state update {impl} state {(b, h, p, n, g)}", rel(state, ref_state), dtype)
            if impl == "triton":  # dt's softplus and A = -exp(A_log) in the kernel, dt a strided slice
                dt_bias = torch.randn(h, device="cuda")
                dt_raw = torch.cat([torch.randn(b, 7, device="cuda", dtype=dtype),
                                    torch.log(torch.expm1(dt)).to(dtype) - dt_bias.to(dtype)], 1)[:, 7:]
                A_log = torch.log(-A).to(dtype)
                ref = raw_state.double()
                ref_y = ssd_step(ref, x.double(), F.softplus(dt_raw.double() + dt_bias.double()),
                                 -torch.exp(A_log.double()), B.double(), C.double(), D.double())
                y = kernels.state_update_raw(raw_state, x, dt_raw, dt_bias, A_log, B, C, D, 0.0, float("inf"))
                report(f"state update raw y {(b, h, p, n, g)}", rel(y, ref_y), dtype)
                report(f"state update raw state {(b, h, p, n, g)}", rel(raw_state, ref), dtype)
    finally:
        kernels.STATE_UPDATE_IMPL = old


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("length", [2, 73, 128])
@torch.inference_mode()
def test_short_scan_prefill_matches_the_chunked_scan(shape, dtype, length, monkeypatch):
    """A short prompt from an empty state through the one-kernel short scan: the same outputs, final state and
    following decode steps as mamba_ssm's chunked scan and the PyTorch path."""
    model = model_for(shape, dtype).eval()
    B, N = 5, 4
    x = torch.randn(B, length + N, model.d_model, device="cuda", dtype=dtype)
    calls = []
    real = kernels.short_scan
    monkeypatch.setattr(kernels, "short_scan", lambda *a, **k: calls.append(1) or real(*a, **k))
    outs = {}
    for name, kernel, short in [("torch", "torch", False), ("chunked", "mamba_ssm", False),
                                ("short", "mamba_ssm", True)]:
        monkeypatch.setattr(kernels, "SHORT_SCAN", short)
        set_kernel(model, kernel)
        state = model.allocate_inference_state(B, length + N)
        y = model(x[:, :length], state=state)
        last = state.layers[-1]
        ssm, conv = last.ssm_state.clone(), last.conv_state.clone()
        steps = torch.cat([model(x[:, t:t + 1], state=state) for t in range(length, length + N)], 1)
        outs[name] = (y, ssm, conv, steps, model(x[:, :length]))  # the last: no state at all
    assert len(calls) == 2 * model.n_layer  # with and without a state, every layer, only when switched on
    for ref in ("chunked", "torch"):
        for i, what in enumerate(["prefill", "final ssm state", "conv state", "decode after", "forward, no state"]):
            report(f"short scan {what} {shape} L={length} (vs {ref})", rel(outs["short"][i], outs[ref][i]), dtype)
