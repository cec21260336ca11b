"""torch.distributed on an existing engine: torchrun sets the environment, we wrap with DDP or FSDP2.

FSDP2 (``fully_shard``) swaps a module's parameters for shards in place. The trainer therefore shards a copy of the
model for the stage and keeps the model itself whole: saving, evaluation and later stages read the plain model,
and ``gather_into`` copies the trained weights back into it when the stage ends. Checkpoints hold the full
(consolidated) weights and optimizer state, written by rank 0, so a run resumes on any number of processes.
"""

from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group torchrun describes (WORLD_SIZE > 1); gloo on CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def end_distributed(info: DistInfo, completed: bool) -> None:
    """Leave the process group before the interpreter exits: a group torn down by the exit itself can abort a
    process (gloo: "terminate called without an active exception"). After a completed run every rank first waits
    for the others (rank 0 may still be saving); after a failure nobody waits, since a peer may never arrive."""
    if not info.enabled or not dist.is_initialized():
        return
    if completed:
        dist.barrier()
    dist.destroy_process_group()


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def _scalars_as_vectors(model: nn.Module) -> None:
    """fully_shard refuses 0-dim parameters (a contrastive head's ``logit_scale``); hold them as shape (1,), which
    broadcasts the same. ``full_state_dict`` gives them back their own shape."""
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.dim() == 0:
                setattr(module, name, nn.Parameter(param.detach().reshape(1).clone(), requires_grad=param.requires_grad))


def wrap_model(model: nn.Module, info: DistInfo, strategy: str, device: torch.device) -> nn.Module:
    """DDP around the model, or FSDP2 over a copy of it (each backbone block, then the rest); the model itself
    in one process."""
    if not info.enabled:
        return model
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        sharded = copy.deepcopy(model)
        _scalars_as_vectors(sharded)
        # blocks return views (a split of in_proj's output); nothing modifies them in place, which is what it warns of
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        mesh = init_device_mesh(device.type, (info.world_size,))
        for layer in getattr(sharded.backbone, "layers", []):
            fully_shard(layer, mesh=mesh)
        fully_shard(sharded, mesh=mesh)
        return sharded
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)


def full_state_dict(wrapped: nn.Module, like: nn.Module, *, all_ranks: bool = False) -> dict[str, torch.Tensor]:
    """The whole model's weights in ``like``'s names and shapes. For an FSDP2 model this is a collective call:
    every rank must make it; the tensors come back on rank 0 only (on every rank with ``all_ranks``), on the CPU."""
    plain = getattr(wrapped, "module", wrapped)
    if not is_sharded(wrapped):
        return plain.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                   broadcast_from_rank0=False))
    if all_ranks:
        state = _broadcast_state(state, like)
    shapes = {k: v.shape for k, v in like.state_dict().items()}
    return {k: v.reshape(shapes[k]) if k in shapes else v for k, v in state.items()}


def _broadcast_state(state: dict[str, torch.Tensor], like: nn.Module) -> dict[str, torch.Tensor]:
    """Rank 0's tensors to every rank (gloo and nccl alike: through the device the process group uses)."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    out = {}
    for name, ref in like.state_dict().items():
        t = state[name].to(device) if dist.get_rank() == 0 else torch.empty(ref.numel(), dtype=ref.dtype, device=device)
        t = t.reshape(-1).contiguous()
        dist.broadcast(t, src=0)
        out[name] = t.cpu()
    return out


def gather_into(model: nn.Module, wrapped: nn.Module) -> None:
    """After a stage: the trained weights of the sharded copy into the whole model (collective for FSDP2)."""
    if wrapped is model or not is_sharded(wrapped):
        return
    state = full_state_dict(wrapped, model, all_ranks=True)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            tensor.copy_(state[name].reshape(tensor.shape))


def optimizer_state(wrapped: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's whole state (collective for FSDP2: rank 0 gets the consolidated state)."""
    if not is_sharded(wrapped):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(wrapped, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(wrapped: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Inverse of ``optimizer_state``: every rank reads the full state and keeps its own shard of it."""
    if not is_sharded(wrapped):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(wrapped, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))


def all_gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Each rank's ``obj`` (small, picklable state of this run's own processes), on every rank."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def gradient_sync(wrapped: nn.Module, sync: bool):
    """A context in which backward does (``sync``) or does not all-reduce gradients (accumulation micro-steps)."""
    import contextlib

    if sync:
        return contextlib.nullcontext()
    if hasattr(wrapped, "no_sync"):  # DDP
        return wrapped.no_sync()
    if is_sharded(wrapped):
        @contextlib.contextmanager
        def _fsdp_no_sync():
            wrapped.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                wrapped.set_requires_gradient_sync(True)
        return _fsdp_no_sync()
    return contextlib.nullcontext()


def grad_norm_value(norm: torch.Tensor) -> float:
    """clip_grad_norm_ returns a DTensor for sharded gradients."""
    full = getattr(norm, "full_tensor", None)
    return float(full() if full is not None else norm)


def mean_across(value: float, info: DistInfo) -> float:
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return float(t.item()) / info.world_size


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def average_gradients(params: list[torch.nn.Parameter], info: DistInfo) -> None:
    if not info.enabled:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= info.world_size
