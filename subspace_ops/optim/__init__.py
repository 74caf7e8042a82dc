"""Optimizers, one file per family."""
from .adam_snsm import AdamSNSM
from .base import SubspaceOptimizer
from .galore_adamw import GaLoreAdamW

__all__ = ["GaLoreAdamW", "AdamSNSM", "SubspaceOptimizer"]
