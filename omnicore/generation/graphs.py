"""CUDA-graph capture of a whole decoding step (sample, feed, backbone step, head); eager calls elsewhere.

The step takes no arguments: it reads and writes only tensors allocated before capture (the inference state,
the logits and noise buffers, a step counter), so replaying the graph is the same as calling it. Warm-up calls
(which also trigger any compilation and Triton autotuning) run before capture, and everything they advanced
is put back afterwards, so capture leaves no trace in the results.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch


def graphs_enabled(setting: bool | None, device: torch.device) -> bool:
    """``cuda_graph`` as callers give it: None means on for CUDA; graphs are never used off CUDA."""
    return device.type == "cuda" and (setting is None or bool(setting))


class GraphedStep:
    def __init__(self, step: Callable[[], None], mutable: Sequence[torch.Tensor], use_graph: bool | None,
                 device: torch.device) -> None:
        """``mutable``: every tensor the step writes (restored after the warm-up calls)."""
        self.step = step
        self.mutable = list(mutable)
        self.use_graph = graphs_enabled(use_graph, device)
        self.graph: torch.cuda.CUDAGraph | None = None

    def __call__(self) -> None:
        if not self.use_graph:
            self.step()
            return
        if self.graph is None:
            self._capture()
        self.graph.replay()

    def _capture(self) -> None:
        snapshot = [t.clone() for t in self.mutable]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the graph (allocator, compilation, autotuning)
            for _ in range(2):
                self.step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.step()
        for t, s in zip(self.mutable, snapshot):
            t.copy_(s)
        self.graph = graph
