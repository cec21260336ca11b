"""Distillation losses on MMU batches: layerwise (teacher-forced, per-layer MSE of the mixer's heads against the
teacher attention's heads, before o_proj) and end to end (KL(teacher || student) on the answer tokens' logits).

Both count real tokens only: the layout's prefix (head, image slots, tail) and each row's text up to its length
(``text_len``); right padding weighs nothing (the public mmMamba code averages over padded positions too).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import OmnicoreError
from ..model.layout import IGNORE


def mmu_inputs(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The backbone's MMU input ``(B, P + T, d_model)`` (the layout's prefix and the text), as ``mmu_loss`` builds it."""
    text_ids = batch["text_ids"]
    x = model.mmu_embeddings(batch.get("pixels"), batch.get("has_image"), text_ids, text_ids.shape[0])
    return model.add_positions(x, "mmu_positions")


def real_tokens(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``(B, P + T)`` bool: the prefix and each row's first ``text_len`` text positions."""
    text_ids = batch["text_ids"]
    if "text_len" not in batch:
        raise OmnicoreError("distill: the batch has no 'text_len' (collate with omnicore.distill.data)")
    b, t = text_ids.shape
    text = torch.arange(t)[None, :] < batch["text_len"].cpu()[:, None]
    prefix = torch.ones(b, model.mmu_prefix_len, dtype=torch.bool)
    return torch.cat([prefix, text], dim=1).to(model.device)


def layerwise_loss(student, teacher, batch: dict[str, torch.Tensor], scale: float = 1000.0
                   ) -> tuple[torch.Tensor, dict[int, float]]:
    """Mean over the student's mixer layers of the MSE between its heads and the teacher's (same teacher input at
    every layer), over real tokens, times ``scale``. Returns the loss and each layer's (scaled) value."""
    with torch.no_grad():
        x = mmu_inputs(teacher, batch)
    mask = real_tokens(teacher, batch)
    pairs = student.backbone.teacher_forced(teacher.backbone, x, mask)
    if not pairs:
        raise OmnicoreError("distill: the student has no mixer layers to distil (every layer is hybrid)")
    weight = mask[..., None].to(pairs[0][1].dtype)
    count = weight.sum() * pairs[0][1].shape[-1]
    per_layer = {}
    total = 0.0
    for layer, got, want in pairs:
        mse = (((got.float() - want.float()) ** 2) * weight).sum() / count * scale
        per_layer[layer] = float(mse.detach())
        total = total + mse
    return total / len(pairs), per_layer


def mmu_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token logits ``(B, T, vocab)`` at the text positions: row ``i`` predicts text token ``i``."""
    x = mmu_inputs(model, batch)
    h = model.backbone(x, task="mmu")
    p = model.mmu_prefix_len
    return model.heads["text"].logits(h[:, p - 1: p - 1 + batch["text_ids"].shape[1]])


def kl_loss(student, teacher, batch: dict[str, torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions at ``temperature``, averaged over the answer tokens
    (labels other than IGNORE), times temperature squared (so gradients keep their size as T changes)."""
    labels = batch["labels"].to(student.device)
    answer = labels != IGNORE
    if not bool(answer.any()):
        raise OmnicoreError("distill: the batch has no answer tokens to distil")
    with torch.no_grad():
        want = mmu_logits(teacher, batch)[answer].float()
    got = mmu_logits(student, batch)[answer].float()
    t = temperature
    log_p = F.log_softmax(want / t, dim=-1)
    log_q = F.log_softmax(got / t, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return kl.mean() * t * t
