"""Slot pools: one inference state of ``capacity`` rows per task, whose running sequences step together.

A new job prefills in a state of its own rows as ``UnifiedModel.answer`` / ``generate_images`` prefill it (jobs
that arrive together with prompts of one length as one batch), and its rows are then copied into free rows of the
pool; from the next step on it decodes with the
others. Each iteration samples every running job's next token (jobs grouped by sampling rule, each job drawing its
noise from its own generator, shaped as the Python API draws it for that job alone), then runs one backbone step
over the pool's first rows (the smallest bucket holding every used row), each row at its own position. A job that
ends, or is cancelled, gives its rows back at once. On CUDA the step of each bucket is a captured graph.

Only recurrent backbones (a state of fixed size per row) let sequences at different steps share a batch; for others
(KV caches share one column offset) a pool takes new jobs only when it is empty, and only jobs whose prompts have
the same length together (T2I prompts always do).
"""

from __future__ import annotations

import heapq
import logging
import queue
import threading
from typing import Callable

import torch

from ..generation.api import codes_to_images
from ..generation.graphs import GraphedStep, graphs_enabled
from ..generation.sampling import mark_seen, pick_guided, pick_token
from .jobs import ImageJob, Job, TextJob
from .state_rows import copy_rows, is_recurrent, row_view

log = logging.getLogger("omnicore.serve")


def buckets(capacity: int) -> list[int]:
    """Batch sizes a step runs at: powers of two below ``capacity``, then ``capacity``."""
    out = [1]
    while out[-1] * 2 < capacity:
        out.append(out[-1] * 2)
    return sorted(set(out + [capacity]))


class _Running:
    """A job in the pool: its rows and how far it is."""

    def __init__(self, job: Job, rows: list[int], device: torch.device, vocab: int) -> None:
        self.job = job
        self.rows = rows
        self.t = 0  # tokens sampled so far
        self.ended = [False] * job.n  # MMU: which answers have reached a stop token
        self.generator = torch.Generator(device=device).manual_seed(job.sampling.seed)
        self.noise = None if job.sampling.is_greedy else torch.zeros(job.n, vocab, device=device)

    def draw_noise(self) -> torch.Tensor | None:
        # the API refills a (batch, vocab) buffer once per step from the call's generator: the same draw here
        if self.noise is not None:
            self.noise.uniform_(generator=self.generator)
        return self.noise


class Pool:
    """Rows, buffers and the batched step of one task; subclasses say how a job prefills and how it samples."""

    task = ""
    positions = ""  # the position table of the task's tokens
    head = ""

    def __init__(self, model, capacity: int, max_len: int, use_graphs: bool | None = None) -> None:
        self.model = model
        self.capacity = capacity
        self.max_len = max_len
        dev = model.device
        self.device = dev
        self.dtype = next(model.backbone.parameters()).dtype
        self.recurrent = is_recurrent(model.backbone, self.dtype, dev)
        self.vocab = _vocab(model, self.head)
        self.state = self._allocate(capacity)
        self.logits = torch.zeros(capacity, self.vocab, device=dev)
        self.token = torch.zeros(capacity, dtype=torch.long, device=dev)
        self.pos = torch.zeros(capacity, dtype=torch.long, device=dev)
        # 1 for rows in use: only they move on a position (a free row inside the bucket is stepped too, and would
        # run past the position table)
        self.active = torch.zeros(capacity, dtype=torch.long, device=dev)
        self.seen: torch.Tensor | None = None  # (rows, vocab), allocated for the first job with a repetition penalty
        self.free = list(range(capacity))  # a heap: new jobs take the lowest rows, so the used rows stay few
        self.running: list[_Running] = []
        self.graphs = graphs_enabled(use_graphs, dev)
        self.steps: dict[int, GraphedStep] = {}
        self._indices: dict[tuple, torch.Tensor] = {}  # row lists on the device, kept while the batch is unchanged
        prepare = getattr(model.backbone, "prepare_decode", None)
        if prepare is not None:  # the task's merged decoding weights, made once (the model does not change)
            prepare(self.task)

    # --- rows ----------------------------------------------------------------------------------------
    def _allocate(self, rows: int):
        return self.model.backbone.allocate_inference_state(rows, self.max_len, dtype=self.dtype, device=self.device)

    @property
    def rows_used(self) -> int:
        return self.capacity - len(self.free)

    def bucket(self) -> int:
        high = max((r for run in self.running for r in run.rows), default=-1) + 1
        return next(b for b in buckets(self.capacity) if b >= high)

    def _release(self, run: _Running) -> None:
        self.running.remove(run)
        index = self.index(run.rows)
        self.active.index_fill_(0, index, 0)
        self.pos.index_fill_(0, index, 0)
        for r in run.rows:
            heapq.heappush(self.free, r)

    def drop_cancelled(self) -> list[Job]:
        gone = [run for run in self.running if run.job.cancelled.is_set()]
        for run in gone:
            self._release(run)
        return [run.job for run in gone]

    def fail_all(self, message: str) -> None:
        for run in list(self.running):
            self._release(run)
            run.job.emit(("error", message))

    # --- admission -----------------------------------------------------------------------------------
    def admit(self, jobs: list[Job]) -> None:
        """Prefill ``jobs`` and copy them into free rows; the caller checked that their rows are free (and, for a
        non-recurrent state, that they may start together). Jobs whose prompts have one length (``prefill_key``)
        prefill as one batch, the rows of each as the Python API would prefill that request alone; a batch that
        fails fails its jobs, the others go on."""
        groups: dict[object, list[Job]] = {}
        for job in jobs:
            groups.setdefault(self.prefill_key(job), []).append(job)
        for group in groups.values():
            rows = [[heapq.heappop(self.free) for _ in range(job.rows)] for job in group]
            try:
                state, logits, offsets, extra = self.prefill(group)
            except Exception as exc:  # these jobs fail; the other groups go on
                for r in (r for part in rows for r in part):
                    heapq.heappush(self.free, r)
                log.exception("prefill failed")
                for job in group:
                    job.emit(("error", f"the server failed to read this request ({type(exc).__name__})"))
                continue
            index = torch.tensor([r for part in rows for r in part], device=self.device)
            copy_rows(self.state, state, index, not self.recurrent)
            self.logits.index_copy_(0, index, logits.float())
            self.pos.index_copy_(0, index, offsets)
            self.active.index_fill_(0, index, 1)
            if self.seen is None and any(job.sampling.repetition_penalty != 1.0 for job in group):
                self.seen = torch.zeros(self.capacity, self.vocab, dtype=torch.bool, device=self.device)
                self.steps.clear()  # captured before the buffer existed; recaptured over the new set of buffers
            if self.seen is not None:
                self.seen.index_fill_(0, index, False)
            self.store_extra(index, extra)
            for job, part in zip(group, rows):
                self.running.append(_Running(job, part, self.device, self.vocab))

    def prefill(self, jobs: list[Job]):
        """(state of the jobs' rows, job after job; last logits (rows, V); each row's next position; extra per-row
        tensors). The jobs share a ``prefill_key``: their prompts have one length."""
        raise NotImplementedError

    def store_extra(self, index: torch.Tensor, extra) -> None:
        pass

    def prefill_key(self, job: Job):
        """Jobs prefill together (and, in a non-recurrent pool, start together) only when this is the same: the
        length of their prompts."""
        return None

    # --- one iteration -------------------------------------------------------------------------------
    def iterate(self) -> None:
        """Sample each running job's next token, report it, release ended jobs, then step the remaining rows."""
        if not self.running:
            return
        self.sample_and_report()
        if self.running:
            self._step(self.bucket())

    def sample_and_report(self) -> None:
        raise NotImplementedError

    def index(self, rows: list[int]) -> torch.Tensor:
        """``rows`` as a device tensor; kept, since building one each step waits for the device on CUDA."""
        key = tuple(rows)
        t = self._indices.get(key)
        if t is None:
            if len(self._indices) > 512:
                self._indices.clear()
            t = self._indices[key] = torch.tensor(rows, device=self.device)
        return t

    def _groups(self, key: Callable[[_Running], tuple]) -> list[list[_Running]]:
        groups: dict[tuple, list[_Running]] = {}
        for run in self.running:
            groups.setdefault(key(run), []).append(run)
        return list(groups.values())

    def _sample(self, runs: list[_Running], cond: list[int], uncond: list[int] | None, scale: float) -> torch.Tensor:
        """One sampling call over these jobs' rows (all of one rule): ``cond`` rows, guided by ``uncond`` ones."""
        s = runs[0].job.sampling
        noises = [run.draw_noise() for run in runs]
        noise = None if s.is_greedy else (noises[0] if len(noises) == 1 else torch.cat(noises))
        ci = self.index(cond)
        seen = self.seen[ci] if self.seen is not None and s.repetition_penalty != 1.0 else None
        if uncond is None:
            new = pick_token(self.logits[ci], s, noise, seen)
        else:
            new = pick_guided(self.logits[ci], self.logits[self.index(uncond)], scale, s, noise, seen)
        if seen is not None:
            mark_seen(seen, new)
            self.seen.index_copy_(0, ci, seen)
        return new

    def _step(self, rows: int) -> None:
        runner = self.steps.get(rows)
        if runner is None:
            view = row_view(self.state, rows)
            mutable = [*view.tensors(), self.logits, self.pos]
            runner = GraphedStep(lambda: self.step(view, rows), mutable, use_graph=self.graphs, device=self.device)
            self.steps[rows] = runner
        runner()
        self.state.mark_written()

    def step(self, state, rows: int) -> None:
        """The backbone step of the first ``rows`` rows: each row's token at its own position."""
        m = self.model
        e = m.add_positions(self.embed(rows), self.positions, self.pos[:rows, None])
        h = m.backbone(e, task=self.task, state=state)
        self.logits[:rows].copy_(m.heads[self.head].logits(h[:, -1]))
        self.pos[:rows].add_(self.active[:rows])

    def embed(self, rows: int) -> torch.Tensor:
        raise NotImplementedError

    def warm_up(self) -> None:
        """Run (and on CUDA capture) the step of every bucket once, so no request waits for a capture."""
        with torch.inference_mode():
            snapshot = [t.clone() for t in (*self.state.tensors(), self.logits, self.pos, self.token)]
            for rows in buckets(self.capacity):
                self._step(rows)
            for t, s in zip((*self.state.tensors(), self.logits, self.pos, self.token), snapshot):
                t.copy_(s)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _vocab(model, head: str) -> int:
    p = next(model.heads[head].parameters())
    return model.heads[head].logits(p.new_zeros(1, model.d_model)).shape[-1]


def _round_up(n: int, multiple: int = 256) -> int:
    return (n + multiple - 1) // multiple * multiple


class TextPool(Pool):
    """MMU: answers to questions about images."""

    task, positions, head = "mmu", "mmu_positions", "text"

    def __init__(self, model, capacity: int, max_len: int, use_graphs: bool | None = None) -> None:
        super().__init__(model, capacity, max_len, use_graphs)
        self.stops = set(model.layout.mmu_stop_ids)

    def embed(self, rows: int) -> torch.Tensor:
        return self.model.text_embed(self.token[:rows, None])

    def prefill_key(self, job: TextJob):
        return len(job.question_ids)

    def prefill(self, jobs: list[TextJob]):
        # as engine.stream_text prefills answer([image] * n, [question] * n): each row's prompt (one length for all
        # these jobs, so no padding), through the backbone with a mask
        m, dev = self.model, self.device
        B = sum(job.n for job in jobs)
        pixels = has = None
        # text-only rows: the API multiplies a blank image's features by 0; zeros are those (up to the sign of a zero,
        # which the position table's add removes), without running the encoder
        if m.encoder is not None and any(job.pixels is not None for job in jobs):
            size = m.encoder.image_size
            blank = torch.zeros(3, size, size)
            pixels = torch.stack([job.pixels if job.pixels is not None else blank for job in jobs for _ in
                                  range(job.n)]).to(dev)
            has = torch.tensor([float(job.pixels is not None) for job in jobs for _ in range(job.n)]).to(dev)
        prefix = m.mmu_embeddings(pixels, has, torch.zeros(B, 0, dtype=torch.long, device=dev), B)
        questions = torch.tensor([job.question_ids for job in jobs for _ in range(job.n)], dtype=torch.long,
                                 device=dev)
        x = torch.cat([prefix, m.text_embed(questions)], dim=1)
        L = x.shape[1]
        mask = torch.ones(B, L, dtype=torch.bool, device=dev)
        positions = (mask.long().cumsum(1) - 1).clamp(min=0)
        x = m.add_positions(x, self.positions, positions)
        state = self._allocate(B)
        h = m.backbone(x, task=self.task, state=state, mask=mask)
        logits = m.heads[self.head].logits(h[:, -1])
        return state, logits, torch.full((B,), L, dtype=torch.long, device=dev), None

    def sample_and_report(self) -> None:
        picked: list[tuple[list[_Running], torch.Tensor]] = []
        for runs in self._groups(lambda run: run.job.rule()):
            cond = [r for run in runs for r in run.rows]
            new = self._sample(runs, cond, None, 1.0)
            self.token.index_copy_(0, self.index(cond), new)
            picked.append((runs, new))
        for runs, new in picked:
            ids = new.tolist()  # the host needs each token now: to stream it and to see stops
            at = 0
            for run in runs:
                mine, at = ids[at:at + run.job.n], at + run.job.n
                run.t += 1
                out = []
                for i, tok in enumerate(mine):
                    if run.ended[i]:
                        out.append(None)
                    elif tok in self.stops:
                        run.ended[i] = True
                        out.append(None)
                    else:
                        out.append(tok)
                run.job.emit(("tokens", out))
                if all(run.ended) or run.t >= run.job.sampling.max_new_tokens:
                    self._release(run)
                    run.job.emit(("end", ["stop" if e else "length" for e in run.ended]))


class ImagePool(Pool):
    """T2I: image codes from captions; a guided job has a conditional and an unconditional (or negative-prompt) row
    per image, fed the same code."""

    task, positions, head = "t2i", "t2i_positions", "image"

    def __init__(self, model, capacity: int, use_graphs: bool | None = None) -> None:
        self.prefix_len = model.layout.t2i_prefix_len
        self.codes = model.num_image_codes
        super().__init__(model, capacity, _round_up(self.prefix_len + self.codes), use_graphs)
        probe = model.t2i_condition(torch.tensor([model.layout.t2i_prefix(None)], device=self.device))
        self.condition = None if probe is None else torch.zeros(capacity, *probe.shape[1:], dtype=probe.dtype,
                                                                device=self.device)
        self.out = torch.zeros(capacity, self.codes, dtype=torch.long, device=self.device)
        self.decoder = ImageDecoder(model)

    def embed(self, rows: int) -> torch.Tensor:
        cond = None if self.condition is None else self.condition[:rows]
        return self.model.code_embeddings(self.token[:rows, None], cond)

    def prefill_key(self, job: ImageJob):
        return 0  # T2I prompts all have one length

    def prefill(self, jobs: list[ImageJob]):
        # as engine.generate_codes prefills generate_images([prompt], n_per_prompt=n): the caption's rows, then (with
        # guidance) as many unconditional or negative-prompt rows; job after job
        m, dev = self.model, self.device
        prefixes = []
        for job in jobs:
            prefixes += [m.layout.t2i_prefix(job.prompt)] * job.n
            if job.guided:
                prefixes += [m.layout.t2i_prefix(job.negative_prompt)] * job.n
        prompt = torch.tensor(prefixes, device=dev)
        state = self._allocate(prompt.shape[0])
        x = m.add_positions(m.t2i_prefix_embeddings(prompt), self.positions)
        h = m.backbone(x, task=self.task, state=state)
        logits = m.heads[self.head].logits(h[:, -1])
        offsets = torch.full((prompt.shape[0],), prompt.shape[1], dtype=torch.long, device=dev)
        return state, logits, offsets, m.t2i_condition(prompt)

    def store_extra(self, index: torch.Tensor, condition) -> None:
        if self.condition is not None and condition is not None:
            self.condition.index_copy_(0, index, condition.to(self.condition.dtype))

    def sample_and_report(self) -> None:
        for runs in self._groups(lambda run: (run.job.rule(), run.job.guided, float(run.job.guidance_scale))):
            job = runs[0].job
            cond = [r for run in runs for r in run.rows[:run.job.n]]
            uncond = [r for run in runs for r in run.rows[run.job.n:]] if job.guided else None
            code = self._sample(runs, cond, uncond, float(job.guidance_scale))
            ci = self.index(cond)
            self.out.index_put_((ci, self.pos[ci] - self.prefix_len), code)
            self.token.index_copy_(0, ci, code)
            if uncond is not None:
                self.token.index_copy_(0, self.index(uncond), code)
        for run in list(self.running):
            run.t += 1
            if run.t >= self.codes:
                codes = self.out[run.rows[:run.job.n]]  # a copy (advanced indexing): the rows can be reused now
                self._release(run)
                self.decoder.submit(run.job, codes)


class ImageDecoder:
    """Codes -> images. On CUDA in a thread of its own, on a stream of its own, so the image tokenizer's decoder runs
    beside the decoding steps instead of between them. On the CPU in the caller's thread (the scheduler's): a
    thread there would not run beside the steps but take turns with them for Python's lock, and its waits cost
    the steps more than the decoding itself (measured on 2 cores, 16 clients: ~9 ms an image in the thread against
    ~4.5 ms inline). Each job's images are decoded on their own, as generate_images decodes that request: its
    convolutions round differently at other batch sizes."""

    def __init__(self, model) -> None:
        self.model = model
        self.stream = torch.cuda.Stream(model.device) if model.device.type == "cuda" else None
        self.queue: queue.SimpleQueue | None = None
        if self.stream is not None:
            self.queue = queue.SimpleQueue()
            threading.Thread(target=self._loop, name="omni-image-decoder", daemon=True).start()

    def submit(self, job: ImageJob, codes: torch.Tensor) -> None:
        if self.stream is None:
            self._decode(job, codes, None)
            return
        ready = torch.cuda.Event()
        ready.record()  # the codes are written on the scheduler's stream
        codes.record_stream(self.stream)
        self.queue.put((job, codes, ready))

    def _loop(self) -> None:
        while True:
            self._decode(*self.queue.get())

    def _decode(self, job: ImageJob, codes: torch.Tensor, ready) -> None:
        try:
            if self.stream is None:
                images = codes_to_images(self.model, codes)
            else:
                with torch.cuda.stream(self.stream):
                    self.stream.wait_event(ready)
                    images = codes_to_images(self.model, codes)
        except Exception as exc:  # noqa: BLE001 - the job fails, the server goes on
            log.exception("decoding images failed")
            job.emit(("error", f"the server failed to decode the images ({type(exc).__name__})"))
            return
        job.emit(("images", images))


def pool_sizes(max_batch: int) -> dict[str, int]:
    """Rows per pool for ``max_batch`` sequences decoding at once per task (T2I: two rows an image with guidance)."""
    return {"mmu": max_batch, "t2i": 2 * max_batch}

