"""The decode engine: prefill the backbone's inference state, then one token at a time.

MMU: prompts of different lengths are left padded with a mask, so padding leaves the state untouched and a
batch gives the same tokens as one-by-one generation. T2I: conditional and unconditional (dropped caption)
streams share one batch for classifier-free guidance; only image codes are sampled, exactly h*w of them.
Composable guidance (Liu et al. 2022, on logits) adds K component streams per prompt to the same batch. A negative
prompt takes the unconditional stream's place, so guidance pushes away from it.
On CUDA a whole step (sampling, feeding the token, the backbone step and the head) is captured as one CUDA
graph (``cuda_graph=True``, the default there), kept with its buffers per shape and sampling rule so later calls
only replay it; the host only refills the noise buffer between replays. The T2I prefill (a prompt of fixed length)
is captured as a second graph over a prompt buffer that each call refills.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

import torch

from ..errors import OmnicoreError
from .graphs import GraphedStep, graphs_enabled
from .sampling import Sampling, mark_seen, pick_guided, pick_token


def _state(model, batch: int, max_len: int):
    dtype = next(model.backbone.parameters()).dtype
    return model.backbone.allocate_inference_state(batch, max_len, dtype=dtype, device=model.device)


class _Session:
    """Everything one decoding step touches, allocated once: the inference state, the current logits, the
    sampling noise, per-row bookkeeping and a step counter. On CUDA the step is captured once per session and the
    session is kept (per model, by shape and sampling rule) so later calls with the same shapes only replay it."""

    def __init__(self, model, rows: int, batch: int, vocab: int, max_len: int, s: Sampling, n_out: int) -> None:
        dev = model.device
        self.state = _state(model, rows, max_len)
        self.logits = torch.zeros(rows, vocab, device=dev)
        self.noise = None if s.is_greedy else torch.zeros(batch, vocab, device=dev)
        self.seen = torch.zeros(batch, vocab, dtype=torch.bool, device=dev) if s.repetition_penalty != 1.0 else None
        self.t = torch.zeros(1, dtype=torch.long, device=dev)  # tokens sampled so far
        self.token = torch.zeros(batch, dtype=torch.long, device=dev)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=dev)
        self.offsets = torch.zeros(rows, dtype=torch.long, device=dev)  # position of the first decoded token
        self.out = torch.zeros(batch, n_out, dtype=torch.long, device=dev)  # T2I: the codes sampled so far
        self.condition: torch.Tensor | None = None  # T2I: each row's pooled caption (heads.caption_pool), or None
        self.runner: GraphedStep | None = None
        self.prefill_runner: GraphedStep | None = None  # T2I: the prefill, over a fixed-shape prompt buffer
        self.prompt: torch.Tensor | None = None
        self.decode_weights = None  # the backbone's decoding buffers the captured step reads (_prepare_decode)
        self.generator: torch.Generator | None = None

    def _own_buffers(self) -> list[torch.Tensor]:
        extra = [t for t in (self.seen, self.condition) if t is not None]
        return [self.logits, self.t, self.token, self.finished, self.offsets, self.out, *extra]

    def buffers(self) -> list[torch.Tensor]:
        return [*self.state.tensors(), *self._own_buffers()]

    def start(self, s: Sampling, generator: torch.Generator | None = None) -> None:
        """A new call: empty state and counters (in place, so a captured graph stays valid). The sampling noise comes
        from ``generator`` (a caller decoding several batches passes one on, so they draw different noise), else from
        a new one seeded with ``s.seed``."""
        for b in self._own_buffers():
            b.zero_()
        self.state.reset()  # also marks the caches empty: the prefill skips reading them
        self.generator = generator if generator is not None else s.generator(self.logits.device)

    def refill_noise(self) -> None:
        if self.noise is not None:
            self.noise.uniform_(generator=self.generator)


GRAPH_PREFILL = True  # capture the T2I prefill as well as the step (False: eager prefill; for measurements)
_MAX_SESSIONS = 2  # per model: the state of a big batch is large, so keep only the latest few


def _session(model, kind: str, rows: int, batch: int, vocab: int, max_len: int, s: Sampling, graph: bool,
             n_out: int = 0, extra: tuple = ()) -> _Session:
    """A session for these shapes and sampling rules: a kept one (already captured) or a new one."""
    if not graph:
        return _Session(model, rows, batch, vocab, max_len, s, n_out)
    p = next(model.parameters())
    rule = (s.is_greedy, s.temperature, s.top_k, s.top_p, s.min_p, s.repetition_penalty, s.ignore_eos)
    key = (kind, rows, batch, vocab, max_len, n_out, rule, extra, p.device, p.dtype, p.data_ptr())
    cache: dict = model.__dict__.setdefault("_decode_sessions", {})
    if key in cache:
        cache[key] = cache.pop(key)  # most recently used last
        return cache[key]
    while len(cache) >= _MAX_SESSIONS:
        cache.pop(next(iter(cache)))
    cache[key] = _Session(model, rows, batch, vocab, max_len, s, n_out)
    return cache[key]


def clear_decode_cache(model) -> None:
    """Drop the kept decoding sessions (their inference states and CUDA graphs) of ``model``, and the backbone's
    merged decoding weights."""
    model.__dict__.pop("_decode_sessions", None)
    clear = getattr(model.backbone, "clear_decode_weights", None)
    if clear is not None:
        clear()


def _prepare_decode(model, ses: _Session, task: str) -> None:
    """Before the first step of a call: the backbone's per-task decoding weights (merged LoRA) made up to date with
    the current weights, in place, so a kept CUDA graph reads the right ones; if they are other buffers than the
    graph was captured with (freed, moved, merging switched), the step is captured again."""
    prepare = getattr(model.backbone, "prepare_decode", None)
    weights = prepare(task) if prepare is not None else None
    if ses.runner is not None and weights != ses.decode_weights:
        ses.runner = None
    ses.decode_weights = weights


def _round_up(n: int, multiple: int = 256) -> int:
    return (n + multiple - 1) // multiple * multiple


def _vocab(model, head: str) -> int:
    p = next(model.heads[head].parameters())
    return model.heads[head].logits(p.new_zeros(1, model.d_model)).shape[-1]


def check_components(components, n: int) -> int:
    """K, the number of component prompts each of ``n`` prompts has (0: none), or a clear error."""
    if components is None:
        return 0
    if not isinstance(components, (list, tuple)) or len(components) != n:
        got = f"{len(components)} entries" if isinstance(components, (list, tuple)) else type(components).__name__
        raise OmnicoreError(f"components: give one list of component prompts per prompt ({n}), got {got}")
    for i, comp in enumerate(components):
        if not isinstance(comp, (list, tuple)) or not all(c is None or isinstance(c, str) for c in comp):
            raise OmnicoreError(f"components[{i}]: must be a list of strings, got {comp!r}")
    counts = sorted({len(c) for c in components})
    if len(counts) > 1:
        raise OmnicoreError(f"components: every prompt needs the same number of component prompts, got "
                            f"{', '.join(map(str, counts))} (pad with None, which adds nothing)")
    return counts[0] if counts else 0


def check_negative_prompts(negative_prompts, n: int) -> None:
    """A clear error unless ``negative_prompts`` is None or one string (or None) per prompt."""
    if negative_prompts is None:
        return
    if isinstance(negative_prompts, str) or not isinstance(negative_prompts, (list, tuple)) \
            or len(negative_prompts) != n:
        got = f"{len(negative_prompts)} entries" if isinstance(negative_prompts, (list, tuple)) else \
            repr(negative_prompts)
        raise OmnicoreError(f"negative_prompts: give one negative prompt (or None) per prompt ({n}), got {got}")
    for i, neg in enumerate(negative_prompts):
        if neg is not None and not isinstance(neg, str):
            raise OmnicoreError(f"negative_prompts[{i}]: must be a string or None, got {neg!r}")


def _compose(logits: torch.Tensor, B: int, K: int, scale: float, component_scale: float):
    """The (cond, uncond, scale) for ``pick_guided`` whose mix ``uncond + scale * (cond - uncond)`` is the composed
    ``u + s (c - u) + s_c sum_k (c_k - u)``. Rows: c (B), u (B), then c_1 .. c_K (B each)."""
    c, u = logits[:B], logits[B:2 * B]
    parts = logits[2 * B:].view(K, B, -1) - u
    if scale != 0:
        # c + (s_c / s) sum_k (c_k - u): exactly c when s_c = 0, so the fused guided sampler sees plain guidance
        return c + (component_scale / scale) * parts.sum(0), u, scale
    # s = 0 leaves the full prompt out: u + s_c sum_k (c_k - u), i.e. guidance towards c_1 (+ the other parts)
    return logits[2 * B:3 * B] + parts[1:].sum(0), u, component_scale


@torch.inference_mode()
def generate_codes(model, captions: list[str | None], guidance_scale: float = 1.0, sampling: Sampling | None = None,
                   cuda_graph: bool | None = None, components: list[list[str | None]] | None = None,
                   component_scale: float = 1.0, negative_prompts: list[str | None] | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Captions -> image codes ``(B, h*w)``. ``None`` captions are unconditional.

    ``components``: per caption, K further prompts (the same K for all; ``None`` is the unconditional prompt, so it
    adds nothing: padding) composed with it: the sampled logits are
    ``u + guidance_scale * (c - u) + component_scale * sum_k (c_k - u)`` (u: unconditional, c: the caption).
    ``negative_prompts``: per caption, the prompt whose logits take u's place in that mix (``None``: the
    unconditional prompt), so guidance pushes the image away from it: ``n + guidance_scale * (c - n)``; it changes
    nothing at ``guidance_scale`` 1 without components."""
    s = sampling or Sampling()
    dev = model.device
    B, N = len(captions), model.num_image_codes
    K = check_components(components, B)
    check_negative_prompts(negative_prompts, B)
    if K and not math.isfinite(component_scale):
        raise OmnicoreError(f"component_scale: must be a finite number, got {component_scale!r}")
    guided = guidance_scale != 1.0 or K > 0
    streams = 2 + K if guided else 1  # rows per caption; every stream of a caption is fed the same code
    prefixes = [model.layout.t2i_prefix(c) for c in captions]
    if guided:
        prefixes += [model.layout.t2i_prefix(n) for n in (negative_prompts or [None] * B)]
    for k in range(K):
        prefixes += [model.layout.t2i_prefix(comp[k]) for comp in components]
    prefix = torch.tensor(prefixes, device=dev)
    Lp, rows = prefix.shape[1], prefix.shape[0]
    graph = graphs_enabled(cuda_graph, dev)
    # the scales are constants of the captured step, K and the rows are its shape
    ses = _session(model, "t2i", rows, B, _vocab(model, "image"), _round_up(Lp + N), s, graph, n_out=N,
                   extra=(float(guidance_scale), K, float(component_scale) if K else None, Lp))
    if ses.prompt is None:
        ses.prompt = torch.zeros_like(prefix)
        condition = model.t2i_condition(prefix)  # allocated before any capture, refilled by the prefill
        ses.condition = None if condition is None else torch.zeros_like(condition)
    ses.start(s, generator)
    ses.prompt.copy_(prefix)

    def prefill() -> None:
        # a new sequence (start() zeroed the state): the prefill need not read the caches, also in the warm-up
        # calls and the capture of its graph, which run on a state the previous call left written
        ses.state.mark_empty()
        x = model.add_positions(model.t2i_prefix_embeddings(ses.prompt), "t2i_positions")
        h = model.backbone(x, task="t2i", state=ses.state)
        ses.logits.copy_(model.heads["image"].logits(h[:, -1]))
        if ses.condition is not None:
            ses.condition.copy_(model.t2i_condition(ses.prompt))

    # T2I prompts always have the same length, so the prefill is captured too: at small batches its ~0.1 s of eager
    # kernel launches (1.3B shape, 48 layers of chunked-scan kernels) was most of its cost; at batch 64 the GPU work
    # dominates and the graph saves little (benchmarks/NOTES.md, "2026-12-01, H200: graphed T2I prefill")
    if ses.prefill_runner is None:
        ses.prefill_runner = GraphedStep(prefill, ses.buffers(), use_graph=graph and GRAPH_PREFILL, device=dev)
    ses.prefill_runner()
    ses.state.mark_written()  # a replay ran no Python: the layers did not record it
    ses.offsets.fill_(Lp)
    _prepare_decode(model, ses, "t2i")

    def sample() -> torch.Tensor:
        logits = ses.logits
        if K:
            cond, uncond, scale = _compose(logits, B, K, float(guidance_scale), float(component_scale))
            code = pick_guided(cond, uncond, scale, s, ses.noise, ses.seen)
        elif guided:
            code = pick_guided(logits[:B], logits[B:], guidance_scale, s, ses.noise, ses.seen)
        else:
            code = pick_token(logits, s, ses.noise, ses.seen)
        ses.out.index_copy_(1, ses.t, code[:, None])
        mark_seen(ses.seen, code)
        return code

    def step() -> None:
        code = sample()
        feed = code.repeat(streams)  # [code, code, ...]: the same code to the caption's every stream
        e = model.add_positions(model.code_embeddings(feed[:, None], ses.condition), "t2i_positions",
                                (ses.offsets + ses.t)[:, None])
        out_h = model.backbone(e, task="t2i", state=ses.state)
        ses.logits.copy_(model.heads["image"].logits(out_h[:, -1]))
        ses.t.add_(1)

    if ses.runner is None:
        ses.runner = GraphedStep(step, ses.buffers(), use_graph=graph, device=dev)
    for i in range(N):
        ses.refill_noise()
        if i + 1 < N:
            ses.runner()
        else:
            sample()
    return ses.out.clone()


@torch.inference_mode()
def stream_text(model, pixels: torch.Tensor | None, has_image: torch.Tensor | None, questions: list[list[int]],
                sampling: Sampling | None = None, cuda_graph: bool | None = None,
                generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """Yield ``(B,)`` new token ids per step (pad for finished rows) until every row has stopped."""
    s = sampling or Sampling(greedy=True)
    dev = model.device
    B = len(questions)
    prefix = model.mmu_embeddings(pixels, has_image, torch.zeros(B, 0, dtype=torch.long, device=dev), B)
    rows = [torch.cat([prefix[i], model.text_embed(torch.tensor(q, dtype=torch.long, device=dev))]) for i, q in enumerate(questions)]
    lengths = torch.tensor([r.shape[0] for r in rows], device=dev)
    L = int(lengths.max())
    x = prefix.new_zeros(B, L, prefix.shape[-1])
    mask = torch.zeros(B, L, dtype=torch.bool, device=dev)
    for i, r in enumerate(rows):  # left padding: real tokens end at the same column
        x[i, L - r.shape[0]:] = r
        mask[i, L - r.shape[0]:] = True
    positions = (mask.long().cumsum(1) - 1).clamp(min=0)
    x = model.add_positions(x, "mmu_positions", positions)
    graph = graphs_enabled(cuda_graph, dev)
    ses = _session(model, "mmu", B, B, _vocab(model, "text"), _round_up(L + s.max_new_tokens), s, graph)
    ses.start(s, generator)
    h = model.backbone(x, task="mmu", state=ses.state, mask=mask)
    ses.logits.copy_(model.heads["text"].logits(h[:, -1]))
    ses.offsets.copy_(lengths)
    _prepare_decode(model, ses, "mmu")
    stops = torch.tensor(sorted(model.layout.mmu_stop_ids), device=dev)
    pad = model.text_tokenizer.pad_id

    def sample() -> None:
        new = pick_token(ses.logits, s, ses.noise, ses.seen)
        new = torch.where(ses.finished, torch.full_like(new, pad), new)
        mark_seen(ses.seen, new)
        if not s.ignore_eos:
            ses.finished.logical_or_(torch.isin(new, stops))
        ses.token.copy_(new)

    def step() -> None:
        sample()
        e = model.add_positions(model.text_embed(ses.token[:, None]), "mmu_positions", (ses.offsets + ses.t)[:, None])
        out_h = model.backbone(e, task="mmu", state=ses.state)
        ses.logits.copy_(model.heads["text"].logits(out_h[:, -1]))
        ses.t.add_(1)

    if ses.runner is None:
        ses.runner = GraphedStep(step, ses.buffers(), use_graph=graph, device=dev)
    for i in range(s.max_new_tokens):
        ses.refill_noise()
        last = i + 1 == s.max_new_tokens
        if last:
            sample()
        else:
            ses.runner()  # samples this token and computes the next logits in one go
        yield ses.token.clone()
        if last or bool(ses.finished.all()):
            break


def generate_text(model, pixels, has_image, questions: list[list[int]], sampling: Sampling | None = None,
                  cuda_graph: bool | None = None, on_token: Callable[[torch.Tensor], None] | None = None,
                  generator: torch.Generator | None = None) -> list[list[int]]:
    """Token ids of each answer, without the stop token."""
    stops = model.layout.mmu_stop_ids
    outs: list[list[int]] = [[] for _ in questions]
    done = [False] * len(questions)
    for token in stream_text(model, pixels, has_image, questions, sampling, cuda_graph, generator):
        if on_token is not None:
            on_token(token)
        for i, tok in enumerate(token.tolist()):
            if done[i]:
                continue
            if tok in stops:
                done[i] = True
            else:
                outs[i].append(tok)
    return outs
