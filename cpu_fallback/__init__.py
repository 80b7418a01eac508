"""Vectorized PyTorch implementations of every tritonslide op, installed as ``tritonslide.cpu_fallback``.

Pure PyTorch: this package never imports Triton, so it runs on small devices that have none. Each op
``tritonslide.ops.<op>`` has its fallback here as ``torch_<op>`` with the same signature.
"""

from .active_conv2d import torch_active_conv2d, torch_active_conv2d_backward
from .alsh_select import torch_alsh_active_set
from .hash_histogram import torch_hash_histogram, torch_hash_histogram_rows
from .sample_conv2d import torch_sample_conv2d, torch_sample_conv2d_backward
from .sketch import (
    torch_sketch_conv2d,
    torch_sketch_conv2d_backward,
    torch_sketch_linear,
    torch_sketch_linear_backward,
)

__all__ = [
    "torch_active_conv2d",
    "torch_active_conv2d_backward",
    "torch_alsh_active_set",
    "torch_hash_histogram",
    "torch_hash_histogram_rows",
    "torch_sample_conv2d",
    "torch_sample_conv2d_backward",
    "torch_sketch_conv2d",
    "torch_sketch_conv2d_backward",
    "torch_sketch_linear",
    "torch_sketch_linear_backward",
]
