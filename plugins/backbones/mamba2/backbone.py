"""The Mamba-2 backbone: mamba_ssm's ``MixerModel`` without the embedding (names ``layers.{i}.mixer.*``,
``layers.{i}.norm.weight``, ``norm_f.weight``), optional gated MLPs and attention layers (hybrid stacks).
The non-attention layers' mixer is ``Mamba2`` or, with ``mixer="mmmamba"``, ``MMambaMixer`` (options in ssm_cfg).
The decode fast paths cover both as follows: the compiled step runs either mixer's ``step``; the fused Triton step
and the merged LoRA weights are Mamba2's alone (an mmMamba stack decodes without them).

``forward(inputs_embeds, task, state, mask)`` returns the final normalised hidden states. With a ``state``
(from ``allocate_inference_state``) L > 1 is a prefill that continues from it and L == 1 a recurrent step;
both update the state in place and advance its offset.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.utils.checkpoint
from torch import nn

from omnicore.convert.strict import check_tensors
from omnicore.errors import CheckpointError

from . import compiled_step, fused_step, kernels, lora
from .attention import MHA, AttnContext
from .block import DEFAULT_FUSED_OPS, FUSED_OPS, Block, GatedMLP, fused_here, make_norm
from .mixer import Mamba2
from .mmmamba_mixer import MMambaMixer
from .norm import RMSNorm
from .state import InferenceState

_SKIPPED = ("embedding.weight", "lm_head.weight")
# CUDA prefills through the task's merged LoRA weight (False: peft's adapters; bench_generation.py --ablate
# prefill-lora)
MERGE_LORA_PREFILL = True


class MambaStateDictError(CheckpointError, ValueError):
    """A mamba_ssm state dict that does not fit the backbone (a ValueError too, as it was first raised)."""


class LoadResult(NamedTuple):
    missing_keys: list[str]
    unexpected_keys: list[str]


class Mamba2Backbone(nn.Module):
    def __init__(self, d_model: int, n_layer: int, ssm_cfg: dict | None = None, d_intermediate: int = 0,
                 attn_layer_idx: list[int] | None = None, attn_cfg: dict | None = None, rms_norm: bool = True,
                 residual_in_fp32: bool = True, norm_epsilon: float = 1e-5, kernel: str = "auto",
                 compile_decode: bool | None = None, mixer: str = "mamba2",
                 fused_ops: tuple[str, ...] | list[str] = DEFAULT_FUSED_OPS, device=None, dtype=None) -> None:
        super().__init__()
        unknown = sorted(set(fused_ops) - set(FUSED_OPS))
        if unknown:
            raise ValueError(f"fused_ops {unknown} unknown; choose from {', '.join(FUSED_OPS)}")
        # the Triton kernels the chunked training path may use on CUDA with mamba_ssm (block.FUSED_OPS)
        self.fused_ops = frozenset(fused_ops)
        fk = {"device": device, "dtype": dtype}
        self.d_model, self.n_layer = d_model, n_layer
        self.attn_layer_idx = sorted(set(attn_layer_idx or []))
        mixers = {"mamba2": Mamba2, "mmmamba": MMambaMixer}
        if mixer not in mixers:
            raise ValueError(f"mixer must be one of {', '.join(mixers)}; got {mixer!r}")
        self.mixer_kind = mixer
        if any(not 0 <= i < n_layer for i in self.attn_layer_idx):
            raise ValueError(f"attn_layer_idx {self.attn_layer_idx} out of range for n_layer={n_layer}")
        self.gradient_checkpointing = False
        self.compile_decode = compile_decode  # None: compiled one-token steps on CUDA for wide models (compiled_step.py)
        # one-token steps without gradients run in_proj with the task's merged LoRA weight (lora.decode_weight)
        self.merge_lora_decode = True
        # one-token steps of small batches on CUDA run three Triton kernels a layer (fused_step.py) where they can
        self.fused_decode = True
        self.merged_task: str | None = None
        layers = []
        for i in range(n_layer):
            if i in self.attn_layer_idx:
                mixer = MHA(d_model, causal=True, layer_idx=i, **(attn_cfg or {}), **fk)
            else:
                mixer = mixers[self.mixer_kind](d_model, layer_idx=i, kernel=kernel, **(ssm_cfg or {}), **fk)
            mlp = GatedMLP(d_model, d_intermediate, **fk) if d_intermediate > 0 else None
            layers.append(Block(d_model, mixer, mlp, rms_norm, norm_epsilon, residual_in_fp32, **fk))
        self.layers = nn.ModuleList(layers)
        self.norm_f = make_norm(d_model, rms_norm, norm_epsilon, **fk)
        self._init_weights(n_residuals_per_layer=1 if d_intermediate == 0 else 2)

    def _init_weights(self, n_residuals_per_layer: int) -> None:
        """As mamba_ssm: Linear biases zeroed; out_proj / fc2 (and mmMamba's o_proj) rescaled by
        1/sqrt(n_residuals * n_layer)."""
        with torch.no_grad():
            for name, module in self.named_modules():
                if isinstance(module, nn.Linear):
                    if module.bias is not None and not getattr(module.bias, "_no_reinit", False):
                        module.bias.zero_()
                    if name.endswith(("out_proj", "o_proj", "fc2")):
                        nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5))
                        module.weight /= math.sqrt(n_residuals_per_layer * self.n_layer)

    # ---- inference state --------------------------------------------------------------------------
    def allocate_inference_state(self, batch_size: int, max_seqlen: int, dtype: torch.dtype | None = None,
                                 device: torch.device | str | None = None) -> InferenceState:
        device = torch.device(device) if device is not None else self.norm_f.weight.device
        caches = []
        for block in self.layers:
            if isinstance(block.mixer, MHA):
                caches.append(block.mixer.allocate_cache(batch_size, max_seqlen, dtype, device))
            else:
                caches.append(block.mixer.allocate_cache(batch_size, dtype, device))
        return InferenceState(caches, batch_size, max_seqlen, device)

    # ---- forward ----------------------------------------------------------------------------------
    def forward(self, inputs_embeds: torch.Tensor, task: str | None = None, state: InferenceState | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        lora.check_task(self, task)
        b, l, _ = inputs_embeds.shape
        if mask is not None:
            mask = mask.to(device=inputs_embeds.device, dtype=torch.bool)
        if state is not None and state.batch_size != b:
            raise ValueError(f"state was allocated for batch {state.batch_size}, got batch {b}")
        ctx = None
        if self.attn_layer_idx:
            ctx = AttnContext.build(b, l, inputs_embeds.device, mask, state, step=state is not None and l == 1)
        if (state is not None and l == 1 and mask is None and not torch.is_grad_enabled() and self.fused_decode
                and self.merge_lora_decode):
            weights = fused_step.plan(self, inputs_embeds, task)
            if weights is not None:  # small batches on CUDA: three Triton kernels a layer
                out = fused_step.step(self, inputs_embeds, state, weights)
                _advance(state, l, mask)
                return out
        checkpoint = self.gradient_checkpointing and self.training and state is None and torch.is_grad_enabled()
        compiled = (state is not None and l == 1 and mask is None and not torch.is_grad_enabled()
                    and compiled_step.wanted(self.compile_decode, inputs_embeds))
        # the task's merged LoRA weight: one product for in_proj instead of three and an add; for prefills too on
        # CUDA (MERGE_LORA_PREFILL), where the adapter's products cost time at large batches; CPU prefills keep
        # peft's unmerged adapters
        merge = (state is not None and self.merge_lora_decode and not torch.is_grad_enabled()
                 and (l == 1 or (MERGE_LORA_PREFILL and inputs_embeds.is_cuda)))
        h, residual = inputs_embeds, None
        pending = None  # a compiled block's gated-norm scale still to apply to h (compiled_step.block_step)
        for i, block in enumerate(self.layers):
            cache = state.layers[i] if state is not None else None
            weight = None
            if merge and isinstance(block.mixer, Mamba2):
                weight = lora.decode_weight(block.mixer.in_proj, task)
            if compiled and not isinstance(block.mixer, MHA):
                lora.activate(block.lora_layers, task)
                h, residual, pending = compiled_step.block_step(block, h, residual, cache, weight, pending)
                continue
            h, pending = compiled_step.apply_pending(h, pending), None
            if checkpoint:
                h, residual = torch.utils.checkpoint.checkpoint(_run_block, block, task, h, residual, cache, mask,
                                                                ctx, None, self.fused_ops, use_reentrant=False)
            else:
                h, residual = _run_block(block, task, h, residual, cache, mask, ctx, weight, self.fused_ops)
        h = compiled_step.apply_pending(h, pending)
        if "add_norm" in self.fused_ops and fused_here(self.fused_ops, h, self.layers[-1].mixer_kernel()):
            n = self.norm_f  # the last residual add and the final norm in one Triton pass
            out = kernels.fast_ops().add_norm(h, n.weight, getattr(n, "bias", None), residual=residual,
                                              residual_in_fp32=True, eps=n.eps, is_rms_norm=isinstance(n, RMSNorm))
        else:
            out = self.norm_f((h + residual).to(self.norm_f.weight.dtype))
        if state is not None:
            _advance(state, l, mask)
        return out

    # ---- mamba_ssm checkpoints ---------------------------------------------------------------------
    def load_mamba_state_dict(self, sd: dict[str, torch.Tensor], strict: bool = True,
                              source: str = "mamba state dict") -> LoadResult:
        """Load mamba_ssm names (``layers.0.mixer.in_proj.weight``, ...) or a full LM checkpoint's ``backbone.*``
        keys (embedding and lm_head skipped). Works with adapters attached (peft's ``base_layer`` names; the
        adapters keep their values). A misshapen tensor, and with ``strict`` a missing or unexpected one, is a
        one-line ``MambaStateDictError`` starting with ``source`` and naming the tensor as the file names it."""
        own = self.state_dict()
        prefix = "backbone." if any(k.startswith("backbone.") for k in sd) else ""
        mapped: dict[str, torch.Tensor] = {}
        file_names: dict[str, str] = {}  # model key -> the file's name for it
        unexpected: list[str] = []
        for name, value in sd.items():
            key = name[len("backbone."):] if name.startswith("backbone.") else name
            if key in _SKIPPED or key.startswith("lm_head."):  # the LM's token tables, not the backbone's
                continue
            target = key
            if target not in own:
                head, _, leaf = key.rpartition(".")
                target = f"{head}.base_layer.{leaf}"
            if target not in own:
                unexpected.append(name)
                continue
            mapped[target], file_names[target] = value, prefix + key
        # what the file should hold, in its own names: every base tensor (adapters keep their init)
        expected = {prefix + k.replace(".base_layer.", "."): tuple(v.shape)
                    for k, v in own.items() if ".lora_" not in k}
        named = {file_names[k]: v for k, v in mapped.items()}
        missing = [k for k in expected if k not in named]
        if strict:
            check_tensors({**named, **{u: sd[u] for u in unexpected}}, expected, source, MambaStateDictError)
        else:
            check_tensors(named, {k: expected[k] for k in named if k in expected}, source, MambaStateDictError)
        self.load_state_dict(mapped, strict=False)
        return LoadResult(missing, unexpected)

    # ---- task adapters (see lora.py) ------------------------------------------------------------------
    def add_task_adapters(self, tasks=("mmu", "t2i"), r: int = 8, alpha: float = 32, dropout: float = 0.05,
                          target_modules=("in_proj",)) -> None:
        lora.add_task_adapters(self, tasks, r=r, alpha=alpha, dropout=dropout, target_modules=target_modules)

    @property
    def tasks(self) -> list[str]:
        return lora.tasks_of(self)

    def adapter_parameters(self, task: str | None = None):
        return lora.adapter_parameters(self, task)

    def base_parameters(self):
        return lora.base_parameters(self)

    def save_adapters(self, path, tasks=None):
        return lora.save_adapters(self, path, tasks)

    def load_adapters(self, path, strict: bool = True):
        return lora.load_adapters(self, path, strict)

    def prepare_decode(self, task: str | None) -> tuple:
        """Before decoding (and before replaying a captured step): make the merged decoding weights of ``task`` exist
        and match the current weights (updated in place). Returns which buffers the step will read: a CUDA graph
        captured over the step stays valid while this is unchanged."""
        if not self.merge_lora_decode:
            return ()
        weights = [lora.decode_weight(b.mixer.in_proj, task) for b in self.layers if isinstance(b.mixer, Mamba2)]
        return tuple(None if w is None else (w.data_ptr(), w.dtype) for w in weights)

    def clear_decode_weights(self) -> None:
        lora.clear_decode_weights(self)

    def merge_adapter(self, task: str) -> None:
        lora.merge_adapter(self, task)

    def unmerge_adapter(self) -> None:
        lora.unmerge_adapter(self)


def _advance(state: InferenceState, l: int, mask: torch.Tensor | None) -> None:
    """After a forward of ``l`` columns: the offset, each sample's real-token count, the caches marked written."""
    state.offset += l
    state.positions += mask.sum(1) if mask is not None else l
    state.mark_written()


def _run_block(block: Block, task, h, residual, cache, mask, ctx, in_proj_weight=None, fused=frozenset()):
    lora.activate(block.lora_layers, task)  # per block, so a checkpoint recompute uses the same adapter
    return block(h, residual, cache, mask, ctx, in_proj_weight=in_proj_weight, fused=fused)
