"""A whole training step as one CUDA graph: forward and backward of every micro-batch, gradient clipping and the
optimizer, replayed with one launch.

Why: a Mamba-2 step is a few thousand small kernels, and mamba_ssm's chunked scan spends milliseconds of Python per
layer launching its Triton kernels; at the 1.3B shape the host, not the GPU, sets the pace. A captured step costs
the host one replay.

What it needs, checked where it can be: CUDA; batches of one shape per graph (a graph is captured per distinct
batch signature, up to ``max_graphs``, sharing one memory pool: an MMU stage pads its text to a multiple of 64
tokens for this); a model whose forward and backward never wait on
the GPU (no ``.item()``, no data-dependent shapes: capture fails with CUDA's own message otherwise, raised as a
``GraphCaptureError``); an AdamW built ``capturable=True`` (``capturable_adamw``). The learning rate stays a plain
float in the optimizer's param groups, as schedules and checkpoints expect: the graph reads a device copy of it,
refreshed before each replay.

The first call with a new signature runs forward and backward once without updating anything (Triton autotuning,
lazy initialisation), initialises a fresh optimizer state with a zero-learning-rate step on zero gradients (which
changes nothing but the step count, reset afterwards), captures, and replays. Every call replays: the weights move
exactly once per call, as an eager step would move them.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch

from omnicore.errors import OmnicoreError

LossFn = Callable[[Any], Mapping[str, torch.Tensor]]  # one micro-batch -> losses by name
CombineFn = Callable[[Mapping[str, torch.Tensor]], torch.Tensor]  # losses -> the scalar to differentiate


class GraphCaptureError(OmnicoreError):
    """The step could not be captured (a host sync or a shape that depends on the data, most often)."""


def capturable_adamw(params: Sequence[torch.nn.Parameter], lr: float, **kwargs) -> torch.optim.AdamW:
    """AdamW that a graphed step can capture: fused, its state on the parameters' device."""
    return torch.optim.AdamW(params, lr=lr, fused=True, capturable=True, **kwargs)


def _signature(tree: Any) -> Any:
    if isinstance(tree, torch.Tensor):
        return ("T", tuple(tree.shape), tree.dtype)
    if isinstance(tree, Mapping):
        return tuple((k, _signature(v)) for k, v in tree.items())
    if isinstance(tree, (list, tuple)):
        return tuple(_signature(v) for v in tree)
    return ("V", tree)


def _to_static(tree: Any, device: torch.device) -> Any:
    if isinstance(tree, torch.Tensor):
        return tree.to(device, copy=True)
    if isinstance(tree, Mapping):
        return {k: _to_static(v, device) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_to_static(v, device) for v in tree)
    return tree


def _copy_into(static: Any, new: Any) -> None:
    if isinstance(static, torch.Tensor):
        static.copy_(new, non_blocking=True)
    elif isinstance(static, Mapping):
        for k in static:
            _copy_into(static[k], new[k])
    elif isinstance(static, (list, tuple)):
        for s, n in zip(static, new):
            _copy_into(s, n)


class _Graph:
    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: Any, losses: dict[str, torch.Tensor],
                 grad_norm: torch.Tensor | None) -> None:
        self.graph, self.inputs, self.losses, self.grad_norm = graph, inputs, losses, grad_norm


class GraphedTrainStep:
    """``step(micro_batches)`` -> (mean losses by name, gradient norm before clipping or None), as tensors.

    ``loss_fn(batch)`` runs the forward of one micro-batch (under ``autocast`` when given: it is entered inside the
    capture with its cache off, as graphs need); ``combine(losses)`` is what backward differentiates, before the
    division by the number of micro-batches."""

    def __init__(self, loss_fn: LossFn, combine: CombineFn, params: Sequence[torch.nn.Parameter],
                 optimizer: torch.optim.Optimizer, grad_clip: float | None, *,
                 autocast_dtype: torch.dtype | None = None, max_graphs: int = 8) -> None:
        self.loss_fn, self.combine = loss_fn, combine
        self.params = list(params)
        self.optimizer, self.grad_clip = optimizer, grad_clip
        self.autocast_dtype, self.max_graphs = autocast_dtype, max_graphs
        if not self.params or not self.params[0].is_cuda:
            raise GraphCaptureError("a graphed training step needs the trained parameters on a CUDA device")
        self.device = self.params[0].device
        for group in optimizer.param_groups:
            if not group.get("capturable", False):
                raise GraphCaptureError("a graphed training step needs an optimizer built with capturable=True "
                                        "(graphed_step.capturable_adamw)")
        self._lr = [torch.tensor(float(g["lr"]), device=self.device) for g in optimizer.param_groups]
        self._graphs: dict[Any, _Graph] = {}
        self._pool = torch.cuda.graph_pool_handle()
        self.captures = 0  # graphs captured so far (a test reads it: replays must not capture again)

    # ---- the step body, as captured ----------------------------------------------------------------------------
    def _autocast(self):
        return torch.autocast("cuda", dtype=self.autocast_dtype or torch.float32, cache_enabled=False,
                              enabled=self.autocast_dtype is not None)

    def _forward_backward(self, micro: Sequence[Any]) -> dict[str, torch.Tensor]:
        sums: dict[str, torch.Tensor] = {}
        for batch in micro:
            with self._autocast():
                losses = dict(self.loss_fn(batch))
            (self.combine(losses) / len(micro)).backward()
            for k, v in losses.items():
                v = v.detach().float() / len(micro)
                sums[k] = v if k not in sums else sums[k] + v
        return sums

    def _body(self, micro: Sequence[Any]) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        losses = self._forward_backward(micro)
        norm = None
        if self.grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        return losses, norm

    # ---- capture --------------------------------------------------------------------------------------------------
    def _warm_up(self, micro: Sequence[Any]) -> None:
        """Forward and backward once on a side stream (autotuning, lazy init); a fresh optimizer state made by a
        zero-lr step on zero gradients, which leaves weights and moments as they were."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._forward_backward(micro)
            fresh = all(len(self.optimizer.state.get(p, {})) == 0 for p in self.params)
            if fresh:
                saved = [g["lr"] for g in self.optimizer.param_groups]
                for p in self.params:
                    if p.grad is not None:
                        p.grad.zero_()
                for g in self.optimizer.param_groups:
                    g["lr"] = 0.0
                self.optimizer.step()
                for g, lr in zip(self.optimizer.param_groups, saved):
                    g["lr"] = lr
                for p in self.params:
                    state = self.optimizer.state.get(p, {})
                    if "step" in state:
                        state["step"].zero_()
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.optimizer.zero_grad(set_to_none=True)  # capture allocates the gradients it writes

    def _capture(self, micro: Sequence[Any]) -> _Graph:
        if len(self._graphs) >= self.max_graphs:
            raise GraphCaptureError(f"the graphed training step already holds {self.max_graphs} graphs, one per batch "
                                    "shape; pad batches to a few fixed shapes or turn cuda_graph off")
        inputs = _to_static(list(micro), self.device)
        self._warm_up(inputs)
        graph = torch.cuda.CUDAGraph()
        groups = self.optimizer.param_groups
        floats = [g["lr"] for g in groups]
        for g, t in zip(groups, self._lr):  # the captured update reads the learning rate from these tensors
            g["lr"] = t
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                losses, norm = self._body(inputs)
        except RuntimeError as exc:
            raise GraphCaptureError(f"capturing the training step failed (a host sync or a data-dependent shape "
                                    f"in the model's forward or backward?): {str(exc).splitlines()[0]}") from exc
        finally:
            for g, lr in zip(groups, floats):
                g["lr"] = lr
        self.captures += 1
        return _Graph(graph, inputs, losses, norm)

    # ---- a step -----------------------------------------------------------------------------------------------------
    def step(self, micro_batches: Sequence[Any]) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        key = _signature(list(micro_batches))
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._graphs[key] = self._capture(micro_batches)
        else:
            _copy_into(graph.inputs, list(micro_batches))
        for t, g in zip(self._lr, self.optimizer.param_groups):
            t.fill_(float(g["lr"]))
        graph.graph.replay()
        return graph.losses, graph.grad_norm
