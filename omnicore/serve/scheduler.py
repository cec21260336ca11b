"""The scheduler: one background thread that does all torch work, continuously batching the jobs it is given.

The server's event loop calls ``submit`` (any thread); the thread takes new jobs in at step boundaries, prefills
them into free rows of their task's pool, and runs one batched step per task per iteration (MMU and T2I in turn).
Jobs report through their ``emit`` callback; a cancelled job is dropped at the next boundary and its rows freed.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time

import torch

from ..inputs import first_line
from .jobs import ImageJob, Job, TextJob
from .pool import ImagePool, Pool, TextPool, pool_sizes

log = logging.getLogger("omnicore.serve")


# A new job joining a busy pool waits until PREFILL_GROUP jobs wait or PREFILL_HOLD steps have passed, so that
# newcomers prefill together: on a CPU a prefill's cost barely grows with its rows (quick-start MMU: 4.5 ms for one
# request, 11 ms for four), and one prefill a step for each newcomer took a third of a loaded scheduler's time.
# An idle pool takes a job at once.
PREFILL_GROUP = 4
PREFILL_HOLD = 4


class QueueFull(Exception):
    """More jobs are waiting than the scheduler's queue limit."""


class Scheduler:
    def __init__(self, model, max_batch: int = 32, max_queue: int = 256, use_graphs: bool | None = None) -> None:
        self.model = model
        self.max_batch = max_batch
        self.max_queue = max_queue
        sizes = pool_sizes(max_batch)
        mmu_room = _mmu_room(model)
        self.pools: dict[str, Pool] = {"mmu": TextPool(model, sizes["mmu"], mmu_room, use_graphs)}
        if model.image_tokenizer is not None and "image" in model.heads:
            self.pools["t2i"] = ImagePool(model, sizes["t2i"], use_graphs)
        self.waiting: dict[str, collections.deque[Job]] = {task: collections.deque() for task in self.pools}
        self._held = {task: 0 for task in self.pools}  # steps the waiting jobs of a busy pool were held back
        self._intake: queue.SimpleQueue = queue.SimpleQueue()
        self._pending = 0  # submitted, not yet admitted (or dropped)
        self.taken = 0  # jobs ever taken from the queue (admitted or dropped)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # what /metrics reports: per task, batched steps run, rows they stepped (their mean is the running batch),
        # and jobs dropped because their client went away
        self.steps = {task: 0 for task in self.pools}
        self.stepped_requests = {task: 0 for task in self.pools}
        self.cancelled = 0
        self.error: str | None = None  # the last failure of a batched step, for the log

    # --- called from the server --------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Queue ``job``; raises QueueFull when ``max_queue`` jobs are already waiting."""
        task = job.task
        if task not in self.pools:
            raise ValueError(f"this model cannot serve {task} requests")
        with self._lock:
            if self._pending >= self.max_queue:
                raise QueueFull(f"{self._pending} requests are waiting (the queue limit)")
            self._pending += 1
        self._intake.put(job)
        self._wake.set()

    @property
    def queue_depth(self) -> int:
        return self._pending

    def running(self, task: str) -> int:
        pool = self.pools.get(task)
        return len(pool.running) if pool is not None else 0

    def rows_used(self, task: str) -> int:
        pool = self.pools.get(task)
        return pool.rows_used if pool is not None else 0

    # --- the thread ----------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="omni-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            busy = self.run_once()
            if not busy:
                self._wake.wait(0.5)
                self._wake.clear()

    def run_once(self) -> bool:
        """One iteration: take new jobs in, admit what fits, one step per pool. False when there was nothing to do."""
        self._wake.clear()
        while True:
            try:
                job = self._intake.get_nowait()
            except queue.Empty:
                break
            self.waiting[job.task].append(job)
        with torch.inference_mode():
            for task, pool in self.pools.items():
                self.cancelled += len(pool.drop_cancelled())
                self._admit(task, pool)
            busy = False
            for task, pool in self.pools.items():
                if not pool.running:
                    continue
                busy = True
                self.steps[task] += 1
                self.stepped_requests[task] += len(pool.running)
                try:
                    pool.iterate()
                except Exception as exc:  # never let one step take the server down: its jobs fail, others go on
                    self.error = f"{task} step failed: {type(exc).__name__}: {first_line(exc)}"
                    log.exception("the %s step failed; its requests get an error", task)
                    pool.fail_all("the server failed to generate this response")
                    self._release_memory()
        return busy or any(self.waiting.values())

    def _admit(self, task: str, pool: Pool) -> None:
        waiting = self.waiting[task]
        while waiting and waiting[0].cancelled.is_set():
            self._took(waiting.popleft())
            self.cancelled += 1
        if not waiting:
            return
        if not pool.recurrent:
            if pool.running:
                return
            key = pool.prefill_key(waiting[0])
            group, room = [], pool.capacity
            for job in list(waiting):
                if pool.prefill_key(job) == key and job.rows <= room and not job.cancelled.is_set():
                    group.append(job)
                    room -= job.rows
            for job in group:
                waiting.remove(job)
                self._took(job)
            self._prefill(pool, group)
            return
        if pool.running and len(waiting) < PREFILL_GROUP and self._held[task] < PREFILL_HOLD:
            self._held[task] += 1  # newcomers wait a few steps for others to prefill with
            return
        self._held[task] = 0
        group, room = [], len(pool.free)
        while waiting and waiting[0].rows <= room:  # first come, first served: a large job is not overtaken
            job = waiting.popleft()
            self._took(job)
            if not job.cancelled.is_set():
                group.append(job)
                room -= job.rows
        if group:  # jobs that join at this boundary prefill together where the task allows (T2I)
            self._prefill(pool, group)

    def _prefill(self, pool: Pool, jobs: list[Job]) -> None:
        try:
            pool.admit(jobs)
        except Exception as exc:
            log.exception("prefill failed")
            for job in jobs:
                job.emit(("error", f"the server failed to read this request ({type(exc).__name__})"))
            self._release_memory()

    def _took(self, job: Job) -> None:
        with self._lock:
            self._pending -= 1
            self.taken += 1

    def _release_memory(self) -> None:
        if self.model.device.type == "cuda":
            torch.cuda.empty_cache()

    # --- start-up -------------------------------------------------------------------------------------
    def warm_up(self) -> None:
        """Before serving: every bucket's step run (captured on CUDA), and one short job per task through prefill,
        sampling and (T2I) decoding, so kernels are compiled and tuned before the first request."""
        from ..generation.sampling import Sampling

        for pool in self.pools.values():
            pool.warm_up()
        events: list = []
        jobs: list[Job] = [TextJob(n=1, sampling=Sampling(temperature=1.0, max_new_tokens=2, seed=0),
                                   emit=events.append, question_ids=self.model.layout.question_ids("hi"))]
        if "t2i" in self.pools:
            jobs.append(ImageJob(n=1, sampling=Sampling(temperature=1.0, seed=0), emit=events.append, prompt="a"))
        for job in jobs:
            self.submit(job)
        deadline = time.monotonic() + 600
        while sum(e[0] in ("end", "images", "error") for e in events) < len(jobs):  # images come from their thread
            if not self.run_once():
                time.sleep(0.01)
            if time.monotonic() > deadline:
                raise RuntimeError("warm-up did not finish in 10 minutes")
        errors = [e[1] for e in events if e[0] == "error"]
        if errors:
            raise RuntimeError(f"warm-up failed: {errors[0]}; {self.error or ''}")


def _mmu_room(model) -> int:
    """The MMU state's length: the positions the model has (prompt and answer together)."""
    table = model.heads["mmu_positions"] if "mmu_positions" in model.heads else None
    n = getattr(table, "num_positions", None)
    return int(n) if n else model.mmu_prefix_len + model.layout.max_text_tokens + 1024
