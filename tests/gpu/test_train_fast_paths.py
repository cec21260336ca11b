"""GPU: the training fast paths against the plain PyTorch step. Each Triton kernel the chunked path uses
(block.FUSED_OPS) against the same model without it, forward and gradients; and a whole step captured as a CUDA graph
(omnicore.training.graphed_step) against eager steps: the same weights after several steps, and replays that never
run the Python forward again (a graphed step that silently ran eagerly fails here).

Run on a machine with CUDA and mamba_ssm: ``pytest -m gpu tests/gpu/test_train_fast_paths.py -q -s``.
"""

from __future__ import annotations

import pytest
import torch

from omnicore.plugins.backbones import build_mamba2
from omnicore.plugins.backbones.mamba2 import kernels
from omnicore.plugins.backbones.mamba2.block import FUSED_OPS
from omnicore.training.graphed_step import GraphCaptureError, GraphedTrainStep, capturable_adamw

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not kernels.mamba_ssm_available(), reason="needs CUDA and mamba_ssm's kernels")]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-12))


def backbone(fused, **extra):
    torch.manual_seed(0)
    m = build_mamba2(size="1.3b", n_layer=2, compile_decode=False, fused_ops=list(fused), device="cuda",
                     lora={"tasks": ["t2i"], "r": 8, "alpha": 32, "dropout": 0.0}, **extra)
    with torch.no_grad():  # peft starts lora_B at zero: give the adapter an effect
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.02)
    for p in m.parameters():
        p.requires_grad_(True)
    return m.train()


def forward_and_grads(m, x, g, autocast: bool):
    xi = x.clone().requires_grad_(True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out = m(xi, task="t2i")
    grads = torch.autograd.grad(out.float(), [xi] + list(m.parameters()), g)
    return out.detach(), dict(zip(["input"] + [n for n, _ in m.named_parameters()], grads))


@pytest.mark.parametrize("autocast,tol", [(False, 1e-4), (True, 3e-2)], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("ops", [[o] for o in FUSED_OPS] + [list(FUSED_OPS)], ids=lambda o: "+".join(o))
def test_each_fused_op_matches_the_pytorch_path(ops, autocast, tol):
    x = torch.randn(2, 328, 2048, device="cuda")
    g = torch.randn_like(x)
    plain, fast = backbone([]), backbone(ops)
    o_p, g_p = forward_and_grads(plain, x, g, autocast)
    o_f, g_f = forward_and_grads(fast, x, g, autocast)
    errs = {"output": rel(o_f, o_p)} | {k: rel(g_f[k], g_p[k]) for k in g_p}
    worst = max(errs, key=errs.get)
    print(f"\nfused {'+'.join(ops):36s} {'bf16 autocast' if autocast else 'fp32':13s} worst {worst}: {errs[worst]:.2e}")
    assert errs[worst] < tol, (worst, errs[worst])


def test_fused_ops_are_taken(monkeypatch):
    """Each fused kernel runs where it applies: a model built with them must not fall back to the PyTorch path
    (the PyTorch RMSNorm never runs, the LoRA product, the conv, the gated norm and the scan with dt's softplus are
    each called once a layer)."""
    import dataclasses

    from omnicore.plugins.backbones.mamba2 import mixer as mixer_module
    from omnicore.plugins.backbones.mamba2 import triton_conv_train

    m = backbone(FUSED_OPS)
    seen = {"lora": 0, "conv": 0, "gated_norm": 0, "dt_softplus": 0, "add_norm": 0}
    ops = kernels.fast_ops()

    def counting(name, fn, check=lambda out, kw: True):
        def wrapped(*a, **kw):
            out = fn(*a, **kw)
            seen[name] += int(bool(check(out, kw)))
            return out
        return wrapped

    monkeypatch.setitem(kernels._cache, "ops", dataclasses.replace(
        ops, add_norm=counting("add_norm", ops.add_norm), gated_norm=counting("gated_norm", ops.gated_norm),
        chunk_scan=counting("dt_softplus", ops.chunk_scan, lambda out, kw: kw.get("dt_softplus"))))
    monkeypatch.setattr(mixer_module, "fused_lora_linear",
                        counting("lora", mixer_module.fused_lora_linear, lambda out, kw: out is not None))
    monkeypatch.setattr(triton_conv_train, "causal_conv_silu",
                        counting("conv", triton_conv_train.causal_conv_silu))
    norm_calls = []
    orig = type(m.layers[0].norm).forward
    monkeypatch.setattr(type(m.layers[0].norm), "forward", lambda self, *a: norm_calls.append(1) or orig(self, *a))
    m(torch.randn(1, 64, 2048, device="cuda"), task="t2i")
    assert norm_calls == []
    assert seen == {"lora": 2, "conv": 2, "gated_norm": 2, "dt_softplus": 2, "add_norm": 3}, seen


def _training(graph: bool, steps: int):
    m = backbone(FUSED_OPS)
    params = [p for p in m.parameters() if p.requires_grad]
    opt = capturable_adamw(params, lr=1e-3, weight_decay=0.1)
    torch.manual_seed(1)
    data = [(torch.randn(4, 96, 2048, device="cuda"), torch.randn(4, 96, 2048, device="cuda")) for _ in range(steps)]
    calls = []
    forward = m.forward

    def counted(*a, **k):
        calls.append(1)
        return forward(*a, **k)

    m.forward = counted

    def loss_fn(batch):
        x, y = batch
        return {"mse": (m(x, task="t2i").float() - y).pow(2).mean()}

    losses = []
    if graph:
        step = GraphedTrainStep(loss_fn, lambda l: l["mse"], params, opt, 1.0, autocast_dtype=None)
        for i, batch in enumerate(data):
            for group in opt.param_groups:
                group["lr"] = 1e-3 * (i + 1)  # a schedule: the graph must read the new rate
            losses.append(float(step.step([batch])[0]["mse"]))
        return m, losses, calls, step.captures
    for i, batch in enumerate(data):
        for group in opt.param_groups:
            group["lr"] = 1e-3 * (i + 1)
        loss = loss_fn(batch)["mse"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    return m, losses, calls, 0


def test_graphed_step_trains_as_the_eager_step():
    eager, eager_losses, _, _ = _training(graph=False, steps=4)
    graphed, graph_losses, calls, captures = _training(graph=True, steps=4)
    print(f"\nlosses eager {eager_losses}\nlosses graph {graph_losses}")
    assert captures == 1 and len(calls) == 2  # warm-up and capture ran Python; the 4 steps were replays
    for a, b in zip(graph_losses, eager_losses):
        assert abs(a - b) <= 1e-4 * abs(b)
    worst = max(rel(p, q) for p, q in zip(graphed.parameters(), eager.parameters()))
    print(f"weights after 4 steps, graph vs eager: worst rel err {worst:.2e}")
    assert worst < 1e-4


def test_a_host_sync_in_the_step_is_a_clear_error():
    m = backbone(FUSED_OPS)
    params = [p for p in m.parameters() if p.requires_grad]
    step = GraphedTrainStep(lambda x: {"l": m(x, task="t2i").sum() * float(x.sum())}, lambda l: l["l"], params,
                            capturable_adamw(params, lr=1e-3), None)
    with pytest.raises(GraphCaptureError, match="capturing the training step failed"):
        step.step([torch.randn(1, 64, 2048, device="cuda")])
