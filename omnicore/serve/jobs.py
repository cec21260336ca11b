"""What the server hands the scheduler: one answer or image request, checked and tokenized, and how the
scheduler reports back (``emit``, called from the scheduler thread; the server forwards it to its event loop)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..generation.sampling import Sampling


@dataclass
class Job:
    task = ""  # the pool that runs it: "mmu" or "t2i" (a class attribute, not a field)
    n: int  # sequences (answers or images) drawn together from one noise stream, as the Python API draws them
    sampling: Sampling  # seed set: the server picks one when the client gave none
    emit: Callable[[tuple], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    on_cancel: Callable[[], None] | None = field(default=None, repr=False)  # an engine process forwards the cancel

    def cancel(self) -> None:
        """Called from any thread: the scheduler drops the job and frees its rows at its next step boundary."""
        if self.cancelled.is_set():
            return
        self.cancelled.set()
        if self.on_cancel is not None:
            self.on_cancel()

    def rule(self) -> tuple:
        """Jobs with the same rule are sampled by one call (sampling.pick_token takes one rule for all its rows)."""
        s = self.sampling
        return (s.is_greedy, s.temperature, s.top_k, s.top_p, s.min_p, s.repetition_penalty)


@dataclass
class TextJob(Job):
    """``n`` answers to one question; events: ``("tokens", [id or None per answer])`` per step (None: that answer
    has ended), ``("end", [finish reason per answer])``, or ``("error", message)``."""

    question_ids: list[int] = field(default_factory=list)
    pixels: torch.Tensor | None = None  # (3, S, S) on the CPU, the encoder's transform applied; None: text only
    task = "mmu"  # the pool that runs it

    @property
    def rows(self) -> int:
        return self.n


@dataclass
class ImageJob(Job):
    """``n`` images of one caption; events: ``("images", [PIL images])`` or ``("error", message)``."""

    prompt: str = ""
    guidance_scale: float = 1.0
    negative_prompt: str | None = None
    task = "t2i"

    @property
    def guided(self) -> bool:
        return self.guidance_scale != 1.0  # as engine.generate_codes: scale 1 runs the conditional rows alone

    @property
    def rows(self) -> int:
        return 2 * self.n if self.guided else self.n
