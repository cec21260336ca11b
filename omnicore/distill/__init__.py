"""Distillation of Transformer models into state-space students: seeding a mixer from an attention layer."""

from .seeding import seed

__all__ = ["seed"]
