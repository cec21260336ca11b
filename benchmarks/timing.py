"""GPU timing shared by the benchmark scripts."""

from __future__ import annotations

import torch


def replay_ms(fn, reps: int = 30) -> float:
    """Median milliseconds of ``fn()`` between CUDA events over ``reps`` calls (``fn`` is typically a graph replay)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def graph_us(launch, k: int = 24) -> float:
    """Microseconds per call of ``launch(i)`` (i = 0..k-1), from replays of a CUDA graph of k back-to-back calls
    (timing single eager launches measures the host's launch cost, not the kernel)."""
    launch(0)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(k):
            launch(i)
    return replay_ms(graph.replay, 20) / k * 1e3
