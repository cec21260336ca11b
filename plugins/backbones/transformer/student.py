"""A distilled student of a Transformer stack: the teacher's decoder layers with their attention replaced by seeded
state-space mixers (mmMamba's), except the ``hybrid`` layers, which keep the teacher's attention (weights, RoPE and
KV cache).

Each layer keeps the teacher's MLP and norms; the mixer sits where the attention was (``layers[i].self_attn``), so
parameter names stay the teacher's (``layers.3.self_attn.q_proj.weight`` ...) plus the mixer's own (``conv1d``,
``in_proj``, ``g_proj``, ``g_norm``, ``dt_bias``, ``A_log_bias``). Built two ways: from a live teacher
(``StudentBackbone.from_teacher``: every mixer seeded from its attention layer through ``omnicore.distill.seed``),
or from a model directory's params (``build_student``: the teacher's architecture, then weights load over it).

The inference state holds a Mamba cache (conv and SSM state) per mixer layer and a KV cache per attention layer;
``teacher_forced`` runs a teacher stack and returns, per converted layer, the mixer's heads before o_proj next to
the teacher attention's heads on the same (teacher) input: what layerwise distillation compares.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

from omnicore.errors import ParamError

from .attention import AttentionContext, attention_heads, decoder_layer
from .state import InferenceState, allocate_kv


def _check_hybrid(hybrid, n_layer: int) -> list[int]:
    layers = sorted(set(int(i) for i in hybrid))
    bad = [i for i in layers if not 0 <= i < n_layer]
    if bad:
        raise ParamError(f"student: hybrid layer {bad[0]} is out of range for a stack of {n_layer} layers")
    return layers


class StudentBackbone(nn.Module):
    """The teacher's layers, modules (``norm``, ``rotary_emb``) and config, attention replaced by mixers outside
    ``hybrid``. ``teacher_params``: the teacher backbone's params as its model spec holds them (kept in the student's
    spec so a model directory rebuilds the same stack)."""

    def __init__(self, teacher, hybrid: list[int], mixer: str, mixer_options: dict[str, Any],
                 generator: torch.Generator | None = None) -> None:
        from omnicore.distill import seed

        super().__init__()
        self.config, self.arch = teacher.config, teacher.arch
        self.d_model, self.n_layer = teacher.d_model, teacher.n_layer
        self.hybrid = _check_hybrid(hybrid, self.n_layer)
        self.mixer_kind, self.mixer_options = mixer, dict(mixer_options)
        self.gradient_checkpointing = False
        self.layers = copy.deepcopy(teacher.layers)
        self.norm = copy.deepcopy(teacher.norm)
        self.rotary_emb = copy.deepcopy(teacher.rotary_emb)
        options = dict(mixer_options)
        if generator is not None:
            options["generator"] = generator
        for i, layer in enumerate(self.layers):
            if i not in self.hybrid:
                layer.self_attn = seed(layer.self_attn, mixer=mixer, layer_idx=i, **options)

    @classmethod
    def from_teacher(cls, teacher, hybrid: list[int] | tuple = (), mixer: str = "mmmamba",
                     mixer_options: dict[str, Any] | None = None,
                     generator: torch.Generator | None = None) -> "StudentBackbone":
        """A student of ``teacher`` (a ``TransformerBackbone``, left untouched): its layers copied, each attention
        outside ``hybrid`` seeded into a ``mixer`` (``mixer_options``: that mixer's seed options)."""
        if not hasattr(teacher, "rotary_emb") or not hasattr(teacher, "layers"):
            raise ParamError(f"student: the teacher backbone must be a transformer stack; got {type(teacher).__name__}")
        return cls(teacher, list(hybrid), mixer, mixer_options or {}, generator)

    def describe(self) -> dict:
        from .hf_config import describe

        return {**describe(self.config), "hybrid": list(self.hybrid), "mixer": self.mixer_kind}

    def is_mixer(self, i: int) -> bool:
        return i not in self.hybrid

    @property
    def mixer_layers(self) -> list[int]:
        return [i for i in range(self.n_layer) if self.is_mixer(i)]

    # ---- inference state --------------------------------------------------------------------------
    def allocate_inference_state(self, batch_size: int, max_seqlen: int, dtype: torch.dtype | None = None,
                                 device: torch.device | str | None = None) -> InferenceState:
        device = torch.device(device) if device is not None else self.norm.weight.device
        caches = [layer.self_attn.allocate_cache(batch_size, dtype=dtype, device=device) if self.is_mixer(i)
                  else allocate_kv(layer.self_attn, batch_size, max_seqlen, dtype, device)
                  for i, layer in enumerate(self.layers)]
        return InferenceState(caches, batch_size, max_seqlen, device)

    # ---- forward ----------------------------------------------------------------------------------
    def _mixer_layer(self, layer, h: torch.Tensor, cache, mask: torch.Tensor | None) -> torch.Tensor:
        h = h + layer.self_attn(layer.input_layernorm(h), cache=cache, mask=mask)
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def forward(self, inputs_embeds: torch.Tensor, task: str | None = None, state: InferenceState | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """As ``TransformerBackbone.forward``: final normalised hidden states; with a ``state`` a prefill (L > 1)
        or a one-token step, caches updated in place. ``task`` is accepted for the model's interface."""
        b, l, _ = inputs_embeds.shape
        if mask is not None:
            mask = mask.to(device=inputs_embeds.device, dtype=torch.bool)
        if state is not None and state.batch_size != b:
            raise ValueError(f"state was allocated for batch {state.batch_size}, got batch {b}")
        if state is not None and l > 1 and state.seqlen_offset + l > state.max_seqlen:
            raise ValueError(f"sequence of {state.seqlen_offset + l} tokens exceeds the state's max_seqlen "
                             f"{state.max_seqlen}")
        h = inputs_embeds.to(self.norm.weight.dtype)
        ctx = rope = None
        if self.hybrid:  # only attention layers read positions and the shared mask
            ctx = AttentionContext.build(b, l, h.device, mask, state, step=state is not None and l == 1)
            rope = self.rotary_emb(h, ctx.positions)
        checkpoint = self.gradient_checkpointing and self.training and state is None and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            cache = state.layers[i] if state is not None else None
            if self.is_mixer(i):
                args = (self._mixer_layer, layer, h, cache, mask)
            else:
                args = (decoder_layer, layer, h, rope, ctx, cache)
            if checkpoint:
                h = torch.utils.checkpoint.checkpoint(*args, use_reentrant=False)
            else:
                h = args[0](*args[1:])
        out = self.norm(h)
        if state is not None:
            state.offset += l
            state.positions += mask.sum(1) if mask is not None else l
        return out

    def teacher_forced(self, teacher, inputs_embeds: torch.Tensor,
                       mask: torch.Tensor | None = None) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """Run ``teacher`` (a TransformerBackbone of the same shape) over ``inputs_embeds`` without gradients; at
        every mixer layer feed the teacher's normalised input to the mixer. Returns ``(layer, student heads,
        teacher heads)`` per mixer layer, both ``(B, L, heads * head_dim)`` before o_proj; the student's carry
        gradients. ``mask`` (B, L) marks real tokens (right padding after them is causal: it changes no real row)."""
        if len(teacher.layers) != self.n_layer:
            raise ParamError(f"student: the teacher has {len(teacher.layers)} layers, the student {self.n_layer}")
        b, l, _ = inputs_embeds.shape
        out = []
        with torch.no_grad():
            h = inputs_embeds.to(teacher.norm.weight.dtype)
            ctx = AttentionContext.build(b, l, h.device, None, None, step=False)
            rope = teacher.rotary_emb(h, ctx.positions)
        for i, (t_layer, s_layer) in enumerate(zip(teacher.layers, self.layers)):
            with torch.no_grad():
                u = t_layer.input_layernorm(h)
                target = attention_heads(t_layer.self_attn, u, rope, ctx)
            if self.is_mixer(i):
                out.append((i, s_layer.self_attn.heads(u.detach(), mask), target))
            with torch.no_grad():
                h = h + t_layer.self_attn.o_proj(target)
                h = h + t_layer.mlp(t_layer.post_attention_layernorm(h))
        return out

    def load_hf_directory(self, directory, text_head=None, label: str = "init_from", tokenizer=None) -> None:
        raise ParamError(f"{label}: a distilled student cannot load a Hugging Face Transformer directory; load it "
                         "into the teacher (backbone type transformer) and distil that")


def build_student(teacher: dict[str, Any], hybrid: list[int] = [], mixer: str = "mmmamba",
                  mixer_options: dict[str, Any] = {}):
    """A distilled student of a ``transformer`` backbone (``teacher``: that backbone's params): every attention layer
    outside ``hybrid`` (layer indices) becomes a ``mixer`` (mmMamba's by default; ``mixer_options``: its seed
    options, e.g. conv_width, chunk_size, dt_min, dt_max, A_log_init, gate_gain, kernel). Built seeded from a
    randomly initialised teacher; a model directory's weights then load over it."""
    from . import build_transformer

    if not isinstance(teacher, dict):
        raise ParamError("student: teacher must be the transformer backbone's params (a mapping)")
    if "generator" in mixer_options:
        raise ParamError("student: mixer_options.generator cannot be given in a spec")
    try:
        base = build_transformer(**teacher)
    except TypeError as exc:
        raise ParamError(f"student: teacher: {exc}") from None
    return StudentBackbone.from_teacher(base, hybrid, mixer, mixer_options)
