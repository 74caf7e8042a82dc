"""Test set-up: on machines without CUDA, Triton kernels run through Triton's CPU interpreter.

TRITON_INTERPRET must be in the environment before ``triton`` is imported, so it is set here, at
collection time, before any test module imports the kernels.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# TF32 would make fp32 comparisons against the reference meaningless (docs/design.md, Testing).
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
