"""A decoder-only Transformer as an omnicore backbone: transformers' decoder layers (Llama or Qwen2 modules; InternLM2
mapped onto Llama's), the final RMSNorm and the rotary embedding, without the token tables (those are the model's
text head).

``forward(inputs_embeds, task, state, mask)`` returns the final normalised hidden states. With a ``state`` (from
``allocate_inference_state``) L > 1 is a prefill that continues from it and L == 1 a one-token step; both write the
KV cache in place and advance the offset. ``layers[i]`` is transformers' decoder layer (``layers[i].self_attn`` with
``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``), so code that maps attention layers into other mixers reaches them
directly.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.utils.checkpoint
from torch import nn

from .attention import AttentionContext, decoder_layer
from .hf_config import describe
from .state import InferenceState, allocate_kv


def _modules(config):
    if config.model_type == "qwen2":
        from transformers.models.qwen2.modeling_qwen2 import (Qwen2DecoderLayer as Layer, Qwen2RMSNorm as Norm,
                                                              Qwen2RotaryEmbedding as Rotary)
    else:
        from transformers.models.llama.modeling_llama import (LlamaDecoderLayer as Layer, LlamaRMSNorm as Norm,
                                                              LlamaRotaryEmbedding as Rotary)
    return Layer, Norm, Rotary


class TransformerBackbone(nn.Module):
    def __init__(self, config, arch: str, device=None, dtype=None) -> None:
        """``config``: a transformers ``LlamaConfig`` / ``Qwen2Config``; ``arch``: the layout its weights come in
        (``llama``, ``qwen2`` or ``internlm2``)."""
        super().__init__()
        self.config, self.arch = config, arch
        self.d_model = config.hidden_size
        self.n_layer = config.num_hidden_layers
        self.gradient_checkpointing = False
        Layer, Norm, Rotary = _modules(config)
        with torch.device(device) if device is not None else contextlib.nullcontext():
            self.layers = nn.ModuleList(Layer(config, i) for i in range(config.num_hidden_layers))
            self.norm = Norm(config.hidden_size, eps=config.rms_norm_eps)
            self.rotary_emb = Rotary(config=config)
        self._init_weights(getattr(config, "initializer_range", 0.02))
        if dtype is not None:
            self.to(dtype)

    def _init_weights(self, std: float) -> None:
        """As transformers initialises these models: Linear weights N(0, std), biases zero (norms start at 1)."""
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    nn.init.normal_(module.weight, std=std)
                    if module.bias is not None:
                        module.bias.zero_()

    def describe(self) -> dict:
        """The fields that decide what this stack computes (hidden size, heads, RoPE...), as in config.json."""
        return describe(self.config)

    # ---- inference state --------------------------------------------------------------------------
    def allocate_inference_state(self, batch_size: int, max_seqlen: int, dtype: torch.dtype | None = None,
                                 device: torch.device | str | None = None) -> InferenceState:
        device = torch.device(device) if device is not None else self.norm.weight.device
        caches = [allocate_kv(layer.self_attn, batch_size, max_seqlen, dtype, device) for layer in self.layers]
        return InferenceState(caches, batch_size, max_seqlen, device)

    # ---- forward ----------------------------------------------------------------------------------
    def forward(self, inputs_embeds: torch.Tensor, task: str | None = None, state: InferenceState | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """``task`` is accepted for the model's interface; this stack has no task adapters."""
        b, l, _ = inputs_embeds.shape
        if mask is not None:
            mask = mask.to(device=inputs_embeds.device, dtype=torch.bool)
        if state is not None and state.batch_size != b:
            raise ValueError(f"state was allocated for batch {state.batch_size}, got batch {b}")
        ctx = AttentionContext.build(b, l, inputs_embeds.device, mask, state, step=state is not None and l == 1)
        h = inputs_embeds.to(self.norm.weight.dtype)
        rope = self.rotary_emb(h, ctx.positions)
        checkpoint = self.gradient_checkpointing and self.training and state is None and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            cache = state.layers[i] if state is not None else None
            if checkpoint:
                h = torch.utils.checkpoint.checkpoint(decoder_layer, layer, h, rope, ctx, None, use_reentrant=False)
            else:
                h = decoder_layer(layer, h, rope, ctx, cache)
        out = self.norm(h)
        if state is not None:
            state.offset += l
            state.positions += mask.sum(1) if mask is not None else l
        return out

    # ---- Hugging Face directories -------------------------------------------------------------------
    def load_hf_directory(self, directory: str | Path, text_head: nn.Module | None = None,
                          label: str = "init_from", tokenizer=None) -> None:
        """Load a local Hugging Face decoder directory (config.json + safetensors): the layers and final norm
        here, its token embedding and LM head into ``text_head`` (when given). Strict: a directory of another
        shape, a missing, unexpected or misshapen tensor is a one-line CheckpointError naming it."""
        from .weights import load_hf_directory

        load_hf_directory(self, directory, text_head, label, tokenizer)

