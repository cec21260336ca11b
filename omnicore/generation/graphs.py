"""CUDA-graph capture of the one-token decode step, per batch size; plain eager calls elsewhere.

The step must read its inputs only from the tensors it is given and update the inference state in place
(static shapes), which the backbone's state guarantees. Inputs are copied into static buffers and the
captured graph is replayed.
"""

from __future__ import annotations

from typing import Callable

import torch


class StepRunner:
    def __init__(self, step: Callable[..., torch.Tensor], state, use_graph: bool | None, device: torch.device) -> None:
        self.step = step
        self.state = state
        self.use_graph = (device.type == "cuda") if use_graph is None else (use_graph and device.type == "cuda")
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_in: list[torch.Tensor] = []
        self.static_out: torch.Tensor | None = None

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if not self.use_graph:
            return self.step(*inputs)
        if self.graph is None:
            self._capture(inputs)
        for buf, value in zip(self.static_in, inputs):
            buf.copy_(value)
        self.graph.replay()
        return self.static_out

    def _capture(self, inputs: tuple[torch.Tensor, ...]) -> None:
        self.static_in = [t.clone() for t in inputs]
        snapshot = self.state.snapshot() if hasattr(self.state, "snapshot") else None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the graph (allocator, Triton autotuning)
            for _ in range(2):
                self.step(*self.static_in)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_out = self.step(*self.static_in)
        if snapshot is not None:  # warm-up and capture advanced the state: put it back
            self.state.restore(snapshot)
