"""The engine process: the model and its Scheduler in a process of their own, beside the HTTP server's.

In one process the scheduler thread and the HTTP side (parsing, SSE chunks, PNG encoding, the event loop) take
turns for Python's interpreter lock, so a loaded server uses about one core however many it has. Here the engine
process runs nothing but batched steps, and the server process talks to it over a pipe: jobs and cancellations go
in, a step's events for every job come back as one message, with the scheduler's counters for /metrics.

``EngineGroup`` (one engine process or several replicas) offers the server the part of ``Scheduler``'s interface it
uses (``submit``, ``pools``, ``queue_depth``, ``running``, ``rows_used``, the counters), so the handlers do not know
which of the two they hold.
Messages are pickled: both ends are this package's own processes, joined by an anonymous pipe.
"""

from __future__ import annotations

import logging
import multiprocessing
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..inputs import first_line
from .jobs import ImageJob, Job, TextJob
from .scheduler import QueueFull, Scheduler

log = logging.getLogger("omnicore.serve")
TERMINAL = ("end", "images", "error")  # a job's last event


@dataclass(frozen=True)
class EngineConfig:
    """What the engine process needs to load and run the model (plain values: it is sent to a spawned process)."""

    model_dir: str
    device: str
    max_batch: int
    use_graphs: bool | None
    threads: int | None  # torch's CPU threads in the engine; None: torch's default
    dtype: str | None = None  # the model's type by name ("bfloat16"); None: the type it was saved in


def load_dtype(name: str | None) -> torch.dtype | None:
    """A dtype named in the options (plain text, so that it crosses to a spawned process) as omnicore.load takes it."""
    return None if name is None else getattr(torch, name)


@dataclass(frozen=True)
class PoolInfo:
    capacity: int


# --- the server's side --------------------------------------------------------------------------------------------
class EngineProcess:
    """A Scheduler in a spawned process: ``launch`` it, then ``wait_ready`` until the model there is loaded and warm.
    The queue limit is its EngineGroup's."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.pools: dict[str, PoolInfo] = {}
        self.steps: dict[str, int] = {}
        self.stepped_requests: dict[str, int] = {}
        self.cancelled = 0
        self.error: str | None = None
        self.on_exit: Callable[[str], None] | None = None  # called once if the engine dies while serving
        self._stats: dict[str, Any] = {"running": {}, "rows_used": {}, "taken": 0}
        self._jobs: dict[int, Job] = {}
        self._next_id = 0
        self._sent = 0  # jobs sent; the engine reports how many it took from its queue ("taken")
        self._lock = threading.Lock()
        self._outgoing: queue.SimpleQueue = queue.SimpleQueue()
        self._stopping = False
        self._process = None
        self._conn = None
        self._sender: threading.Thread | None = None

    def launch(self) -> None:
        ctx = multiprocessing.get_context("spawn")  # never fork a process that holds threads (and maybe CUDA)
        parent, child = ctx.Pipe(duplex=True)
        self._process = ctx.Process(target=engine_main, args=(child, self.config), name="omni-engine", daemon=True)
        self._process.start()
        child.close()
        self._conn = parent

    def wait_ready(self, timeout: float = 1800.0) -> None:
        parent = self._conn
        deadline = time.monotonic() + timeout
        while not parent.poll(1.0):
            if not self._process.is_alive():
                raise RuntimeError(f"the engine process exited (code {self._process.exitcode}) before it was ready")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the engine process was not ready in {timeout:.0f} s")
        try:
            message = parent.recv()
        except EOFError:
            raise RuntimeError("the engine process exited before it was ready") from None
        if message[0] == "failed":
            self._process.join(10)
            raise RuntimeError(message[1])
        self.pools = {task: PoolInfo(capacity) for task, capacity in message[1].items()}
        self.steps = {task: 0 for task in self.pools}
        self.stepped_requests = {task: 0 for task in self.pools}
        threading.Thread(target=self._receive, name="omni-engine-events", daemon=True).start()
        self._sender = threading.Thread(target=self._send_loop, name="omni-engine-jobs", daemon=True)
        self._sender.start()

    # the Scheduler interface the server uses
    def submit(self, job: Job) -> None:
        task = job.task
        if task not in self.pools:
            raise ValueError(f"this model cannot serve {task} requests")
        with self._lock:
            if self._process is None or not self._process.is_alive():
                raise RuntimeError("the engine process is not running")
            ident = self._next_id
            self._next_id += 1
            self._sent += 1
            self._jobs[ident] = job
        self._outgoing.put(("job", ident, _job_message(job)))
        job.on_cancel = lambda: self._outgoing.put(("cancel", ident))
        if job.cancelled.is_set():  # cancelled before the hook was set
            self._outgoing.put(("cancel", ident))

    @property
    def queue_depth(self) -> int:
        return max(0, self._sent - self._stats["taken"])

    def in_hand(self, task: str) -> tuple[int, int]:
        """Requests sent and not yet answered in full: of ``task``, and of other tasks."""
        jobs = list(self._jobs.values())
        mine = sum(job.task == task for job in jobs)
        return mine, len(jobs) - mine

    def running(self, task: str) -> int:
        return self._stats["running"].get(task, 0)

    def rows_used(self, task: str) -> int:
        return self._stats["rows_used"].get(task, 0)

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        if self._process is None:
            return
        if self._sender is None:  # not ready yet: nothing else writes to the pipe
            try:
                self._conn.send(("stop",))
            except (OSError, ValueError):
                pass
        else:
            self._outgoing.put(("stop",))
        self._process.join(timeout)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(5)

    # the pipe
    def _send_loop(self) -> None:
        # a thread of its own: a large message (an image's pixels) waits for the engine to read it between steps,
        # which must not hold up the event loop
        while True:
            message = self._outgoing.get()
            try:
                self._conn.send(message)
            except (OSError, ValueError):  # the engine is gone; _receive reports it
                return
            if message[0] == "stop":
                return

    def _receive(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            _, events, stats = message
            self._apply(stats)  # first: a handler woken by these events reads counters that include them
            for ident, event in events:
                job = self._jobs.pop(ident, None) if event[0] in TERMINAL else self._jobs.get(ident)
                if job is not None:
                    job.emit(event)
        if not self._stopping:  # the engine died under us: fail what it held, and say so
            self._process.join(5)  # reaped, so that its exit code is known
            self.error = f"the engine process exited (code {self._process.exitcode})"
            log.error("%s; its requests get an error", self.error)
            with self._lock:
                jobs, self._jobs = list(self._jobs.values()), {}
            for job in jobs:
                job.emit(("error", "the server's engine stopped"))
            if self.on_exit is not None:
                self.on_exit(self.error)

    def _apply(self, stats: dict) -> None:
        self._stats = stats
        self.steps, self.stepped_requests = stats["steps"], stats["stepped"]
        self.cancelled, self.error = stats["cancelled"], stats["error"]
        for ident in stats["dropped"]:  # cancelled jobs the engine let go of: no event will come for them
            self._jobs.pop(ident, None)


# A replica that runs no request of a task pays a whole extra step an iteration (and slows its other requests) to
# take one: a request goes to the replica with the fewest requests in hand, counting a replica busy with other
# tasks only as this many requests fuller, so that under mixed load replicas settle into one task each and batch it.
NEW_TASK_COST = 4


class EngineGroup:
    """Several engine processes, each with the whole model (data-parallel replicas). For a CPU with more cores than
    one engine's steps can use (a small model's step is mostly Python and dispatch, which one more torch thread does
    not shorten). Same interface as one engine."""

    def __init__(self, configs: list[EngineConfig], max_queue: int) -> None:
        self.engines = [EngineProcess(c) for c in configs]
        self.max_queue = max_queue
        self._lock = threading.Lock()

    def start(self, timeout: float = 1800.0) -> None:
        for engine in self.engines:  # they load side by side
            engine.launch()
        try:
            for engine in self.engines:
                engine.wait_ready(timeout)
        except Exception:
            self.stop()
            raise

    @property
    def on_exit(self):
        return self.engines[0].on_exit

    @on_exit.setter
    def on_exit(self, callback) -> None:
        for engine in self.engines:
            engine.on_exit = callback

    def submit(self, job: Job) -> None:
        with self._lock:
            if self.queue_depth >= self.max_queue:
                raise QueueFull(f"{self.queue_depth} requests are waiting (the queue limit)")
            self._pick(job.task).submit(job)

    def _pick(self, task: str) -> EngineProcess:
        def cost(engine: EngineProcess) -> int:
            mine, other = engine.in_hand(task)
            return mine + other + (NEW_TASK_COST if mine == 0 and other else 0)

        return min(self.engines, key=cost)

    @property
    def pools(self) -> dict[str, PoolInfo]:
        return {task: PoolInfo(sum(e.pools[task].capacity for e in self.engines)) for task in self.engines[0].pools}

    @property
    def queue_depth(self) -> int:
        return sum(e.queue_depth for e in self.engines)

    def running(self, task: str) -> int:
        return sum(e.running(task) for e in self.engines)

    def rows_used(self, task: str) -> int:
        return sum(e.rows_used(task) for e in self.engines)

    @property
    def steps(self) -> dict[str, int]:
        return {task: sum(e.steps.get(task, 0) for e in self.engines) for task in self.pools}

    @property
    def stepped_requests(self) -> dict[str, int]:
        return {task: sum(e.stepped_requests.get(task, 0) for e in self.engines) for task in self.pools}

    @property
    def cancelled(self) -> int:
        return sum(e.cancelled for e in self.engines)

    @property
    def error(self) -> str | None:
        return next((e.error for e in self.engines if e.error), None)

    def stop(self, timeout: float = 10.0) -> None:
        for engine in self.engines:
            engine.stop(timeout)


def _job_message(job: Job) -> dict:
    base = {"n": job.n, "sampling": job.sampling}
    if isinstance(job, TextJob):
        return {**base, "kind": "text", "question_ids": job.question_ids, "pixels": job.pixels}
    return {**base, "kind": "image", "prompt": job.prompt, "guidance_scale": job.guidance_scale,
            "negative_prompt": job.negative_prompt}


# --- the engine's side --------------------------------------------------------------------------------------------
class _Outbox:
    """Events of one scheduler iteration, sent as one message with the counters (so /metrics stays current)."""

    def __init__(self, conn, scheduler: Scheduler) -> None:
        self.conn, self.scheduler = conn, scheduler
        self.lock = threading.Lock()
        self.events: list[tuple[int, tuple]] = []
        self.dropped: list[int] = []
        self.last: dict | None = None
        self.loop_thread = threading.get_ident()

    def post(self, ident: int, event: tuple) -> None:
        with self.lock:
            self.events.append((ident, event))
        if threading.get_ident() != self.loop_thread:  # the CUDA image decoder's thread: do not wait for a step
            self.flush()

    def flush(self) -> None:
        s = self.scheduler
        with self.lock:
            stats = {"steps": dict(s.steps), "stepped": dict(s.stepped_requests), "cancelled": s.cancelled,
                     "error": s.error, "taken": s.taken, "running": {t: s.running(t) for t in s.pools},
                     "rows_used": {t: s.rows_used(t) for t in s.pools}, "dropped": self.dropped}
            if not self.events and stats == self.last:
                return
            events, self.events, self.dropped = self.events, [], []
            self.last = stats
            self.conn.send(("events", events, stats))


class _EngineScheduler(Scheduler):
    outbox: _Outbox | None = None  # set once warm: the warm-up's own jobs report in-process

    def run_once(self) -> bool:
        busy = super().run_once()
        if self.outbox is not None:
            self.outbox.flush()
        return busy


def engine_main(conn, config: EngineConfig) -> None:
    """The engine process: load, warm up, say ``ready`` (or ``failed``), then serve jobs until told to stop or the
    server goes away (the pipe closes)."""
    import omnicore

    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        model = omnicore.load(config.model_dir, device=torch.device(config.device), dtype=load_dtype(config.dtype))
        # the server process keeps the queue limit; the engine's own queue takes whatever it is sent
        scheduler = _EngineScheduler(model, config.max_batch, 1 << 30, config.use_graphs)
        scheduler.warm_up()
    except Exception as exc:  # noqa: BLE001 - reported to the server, which stops with this message
        conn.send(("failed", f"{type(exc).__name__}: {first_line(exc)}"))
        return
    outbox = scheduler.outbox = _Outbox(conn, scheduler)
    conn.send(("ready", {task: pool.capacity for task, pool in scheduler.pools.items()}))
    threading.Thread(target=_intake, args=(conn, scheduler, outbox), name="omni-engine-intake", daemon=True).start()
    scheduler._loop()


def _intake(conn, scheduler: Scheduler, outbox: _Outbox) -> None:
    jobs: dict[int, Job] = {}
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the server is gone
            break
        if message[0] == "stop":
            break
        if message[0] == "cancel":
            job = jobs.pop(message[1], None)
            if job is not None:
                job.cancel()
                with outbox.lock:
                    outbox.dropped.append(message[1])
            continue
        ident, spec = message[1], message[2]
        job = _job(spec, lambda event, ident=ident: _report(jobs, outbox, ident, event))
        jobs[ident] = job
        try:
            scheduler.submit(job)
        except Exception as exc:  # noqa: BLE001 - this job fails; the intake goes on
            job.emit(("error", f"the engine refused this request: {first_line(exc)}"))
    scheduler.stop()


def _report(jobs: dict, outbox: _Outbox, ident: int, event: tuple) -> None:
    if event[0] in TERMINAL:
        jobs.pop(ident, None)
    outbox.post(ident, event)


def _job(spec: dict, emit: Callable[[tuple], None]) -> Job:
    if spec["kind"] == "text":
        return TextJob(n=spec["n"], sampling=spec["sampling"], emit=emit, question_ids=spec["question_ids"],
                       pixels=spec["pixels"])
    return ImageJob(n=spec["n"], sampling=spec["sampling"], emit=emit, prompt=spec["prompt"],
                    guidance_scale=spec["guidance_scale"], negative_prompt=spec["negative_prompt"])
