"""subspace-ops: fast, checkpoint-safe subspace (GaLore-style) optimizers for PyTorch."""
from . import _install_check

_install_check.check(__file__)  # before anything imports .kernels

from . import reference
from .helpers import lowrank_param_groups, memory_report
from .ops import back_project, project
from .grad_filter import GradFilter
from .optim import AdamSNSM, GaLoreAdamW

__version__ = "0.1.0"

__all__ = [
    "GaLoreAdamW",
    "AdamSNSM",
    "GradFilter",
    "project",
    "back_project",
    "lowrank_param_groups",
    "memory_report",
    "reference",
]
