"""Shared test set-up.

On a machine without a CUDA GPU, Triton kernels run through Triton's CPU interpreter: the flag
must be set before any kernel module is imported, hence here, at collection time. The interpreter
is right in float32/float16 and wrong in bfloat16, so CPU tests use those dtypes and bf16 is
checked by the ``gpu``-marked tests on a GPU.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def seeded():
    """Fresh, reproducible randomness for a test."""
    torch.manual_seed(0)
    return torch.Generator().manual_seed(0)
