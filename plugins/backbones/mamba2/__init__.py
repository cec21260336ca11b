"""Mamba-2 backbone in plain PyTorch with mamba_ssm's parameter layout, optional mamba_ssm Triton kernels."""

from .backbone import Mamba2Backbone
from .mixer import Mamba2
from .mmmamba_mixer import MMambaMixer, pack_inference, unpack_inference
from .ssd import ssd_chunked, ssd_step
from .state import InferenceState

__all__ = ["Mamba2Backbone", "Mamba2", "MMambaMixer", "InferenceState", "ssd_chunked", "ssd_step",
           "pack_inference", "unpack_inference"]
