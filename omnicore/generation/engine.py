"""The decode engine: prefill the backbone's inference state, then one token at a time.

MMU: prompts of different lengths are left padded with a mask, so padding leaves the state untouched and a
batch gives the same tokens as one-by-one generation. T2I: conditional and unconditional (dropped caption)
streams share one batch for classifier-free guidance; only image codes are sampled, exactly h*w of them.
On CUDA the one-token step is captured as a CUDA graph per batch size (``cuda_graph=True``, the default there).
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from .graphs import StepRunner
from .sampling import Sampling, next_token


def _state(model, batch: int, max_len: int):
    dtype = next(model.backbone.parameters()).dtype
    return model.backbone.allocate_inference_state(batch, max_len, dtype=dtype, device=model.device)


@torch.inference_mode()
def generate_codes(model, captions: list[str | None], guidance_scale: float = 1.0, sampling: Sampling | None = None,
                   cuda_graph: bool | None = None) -> torch.Tensor:
    """Captions -> image codes ``(B, h*w)``. ``None`` captions are unconditional."""
    s = sampling or Sampling()
    dev = model.device
    B, N = len(captions), model.num_image_codes
    guided = guidance_scale != 1.0
    prefixes = [model.layout.t2i_prefix(c) for c in captions]
    if guided:
        prefixes += [model.layout.t2i_prefix(None)] * B
    prefix = torch.tensor(prefixes, device=dev)
    Lp = prefix.shape[1]
    rows = prefix.shape[0]
    state = _state(model, rows, Lp + N)
    x = model.add_positions(model.t2i_prefix_embeddings(prefix), "t2i_positions")
    h = model.backbone(x, task="t2i", state=state)
    logits = model.heads["image"].logits(h[:, -1]).float()

    def step(codes: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        e = model.code_embeddings(codes[:, None])
        e = model.add_positions(e, "t2i_positions", position.expand(codes.shape[0], 1))
        out = model.backbone(e, task="t2i", state=state)
        return model.heads["image"].logits(out[:, -1]).float()

    runner = StepRunner(step, state, use_graph=cuda_graph, device=dev)
    generator = s.generator(dev)
    out = torch.empty(B, N, dtype=torch.long, device=dev)
    for t in range(N):
        if guided:
            cond, uncond = logits[:B], logits[B:]
            logits = uncond + guidance_scale * (cond - uncond)
        code = next_token(logits, s, generator, out[:, :t] if s.repetition_penalty != 1.0 else None)
        out[:, t] = code
        if t + 1 < N:
            feed = torch.cat([code, code]) if guided else code
            logits = runner(feed, torch.tensor([Lp + t], device=dev))
    return out


@torch.inference_mode()
def stream_text(model, pixels: torch.Tensor | None, has_image: torch.Tensor | None, questions: list[list[int]],
                sampling: Sampling | None = None, cuda_graph: bool | None = None) -> Iterator[torch.Tensor]:
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
    state = _state(model, B, L + s.max_new_tokens)
    h = model.backbone(x, task="mmu", state=state, mask=mask)
    logits = model.heads["text"].logits(h[:, -1]).float()

    def step(tokens: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        e = model.text_embed(tokens[:, None])
        e = model.add_positions(e, "mmu_positions", position[:, None])
        out = model.backbone(e, task="mmu", state=state)
        return model.heads["text"].logits(out[:, -1]).float()

    runner = StepRunner(step, state, use_graph=cuda_graph, device=dev)
    stops = torch.tensor(sorted({model.layout.sid("<|eot|>"), model.text_tokenizer.eos_id}), device=dev)
    pad = model.text_tokenizer.pad_id
    finished = torch.zeros(B, dtype=torch.bool, device=dev)
    generated = torch.empty(B, 0, dtype=torch.long, device=dev)
    generator = s.generator(dev)
    for t in range(s.max_new_tokens):
        token = next_token(logits, s, generator, generated if s.repetition_penalty != 1.0 else None)
        token = torch.where(finished, torch.full_like(token, pad), token)
        if not s.ignore_eos:
            finished |= torch.isin(token, stops)
        generated = torch.cat([generated, token[:, None]], dim=1)
        yield token
        if bool(finished.all()) or t + 1 == s.max_new_tokens:
            break
        logits = runner(token, lengths + t)


def generate_text(model, pixels, has_image, questions: list[list[int]], sampling: Sampling | None = None,
                  cuda_graph: bool | None = None, on_token: Callable[[torch.Tensor], None] | None = None) -> list[list[int]]:
    """Token ids of each answer, without the stop token."""
    stops = {model.layout.sid("<|eot|>"), model.text_tokenizer.eos_id}
    outs: list[list[int]] = [[] for _ in questions]
    done = [False] * len(questions)
    for token in stream_text(model, pixels, has_image, questions, sampling, cuda_graph):
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
