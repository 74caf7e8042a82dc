"""Optimizers, one file per family."""
from .galore_adamw import GaLoreAdamW

__all__ = ["GaLoreAdamW"]
