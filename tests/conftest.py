import os

import pytest
import torch

# Every test module runs the PyTorch fallback unless it forces a backend itself.
os.environ.pop("TRITONSLIDE_BACKEND", None)
# Without CUDA the Triton kernel tests run in Triton's interpreter on CPU tensors. Triton reads this when a kernel
# is decorated, so it is set here, before any test imports a kernel file (tests/triton_utils.py picks the device).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
