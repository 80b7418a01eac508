"""Helpers shared by the Triton kernel files (imports Triton: only the kernel modules import this file)."""

from __future__ import annotations

import os
import weakref
from collections import OrderedDict

import torch
import triton


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1`` (kernels run on CPU tensors in Triton's interpreter)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotune_configs(configs: list[triton.Config], interpreter_config: triton.Config | None = None):
    """The autotune list: all ``configs`` on a GPU, one config under the interpreter, where timing means nothing
    and every extra config would run the kernel again (Fast-LLM cuts its lists the same way)."""
    if interpreting():
        return [interpreter_config or configs[0]]
    return configs


def dot_precision(dtype: torch.dtype, kind: str = "conv") -> str:
    """``tl.dot`` input precision for fp32 inputs, keyed like the dense layer a kernel replaces: "tf32" exactly when
    PyTorch would use TF32 for that layer, else "ieee".

    Convolutions (``kind="conv"``: active conv, the hash projections, SK-CONV) follow
    ``torch.backends.cudnn.allow_tf32`` (True by default), the flag ``F.conv2d`` obeys; linear layers
    (``kind="linear"``: SK-FC) follow ``torch.backends.cuda.matmul.allow_tf32`` (False by default), the flag of
    ``F.linear``. Keying the convolutions on the matmul flag pitted IEEE fp32 FMA against cuDNN's TF32 tensor cores
    (issue #12). Half-precision inputs ignore it (their products are exact in fp32 accumulation); the interpreter
    has no TF32 and always computes IEEE products."""
    if kind not in ("conv", "linear"):
        raise ValueError(f"dot_precision: kind must be 'conv' or 'linear', got {kind!r}")
    if dtype != torch.float32 or interpreting():
        return "ieee"
    flag = torch.backends.cudnn.allow_tf32 if kind == "conv" else torch.backends.cuda.matmul.allow_tf32
    return "tf32" if flag else "ieee"


def next_pow2(n: int, floor: int = 16) -> int:
    """The smallest power of two >= max(n, floor) (``tl.dot`` needs every tile dimension >= 16)."""
    return max(floor, triton.next_power_of_2(int(n)))


# ------------------------------------------------------------------------------------------------ kernel layouts
# Weights in the kernels' layout (channels innermost), keyed by the source's address, geometry and dtype, valid while
# the source tensor lives (a weak reference: while it lives its storage cannot be freed and the address reused) and
# while its version counter is unchanged. An entry is dropped when its source dies, and the LRU bound keeps the copies
# of at most _LAYOUT_CACHE_SIZE weights alive (a model's layers; ResNet-50 has 53 convolutions).
_LAYOUT_CACHE: OrderedDict = OrderedDict()
_LAYOUT_CACHE_SIZE = 128


def channels_inner(t: torch.Tensor) -> torch.Tensor:
    """``t`` (4-d: (O, C, kh, kw) weights, planes or sketches) with the channel axis innermost: the same values with
    channels_last strides, so that a kernel reducing over channels reads them with 16-byte vector loads (OIHW puts
    kh*kw elements between consecutive channels).

    A tensor already in that layout is returned as is. Otherwise the copy is cached and reused while the source
    tensor is alive and ``t._version`` is unchanged (every in-place update bumps it, optimizer steps included), so a
    layer's weight is converted once per update, not once per call. Tensors without a version counter
    (inference-mode tensors) are converted every call."""
    if t.dim() != 4 or t.is_contiguous(memory_format=torch.channels_last):
        return t
    try:
        version = t._version
    except RuntimeError:  # inference tensors track no version
        return t.contiguous(memory_format=torch.channels_last)
    key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device)
    hit = _LAYOUT_CACHE.get(key)
    if hit is not None and hit[0]() is not None and hit[1] == version:
        _LAYOUT_CACHE.move_to_end(key)
        return hit[2]
    out = t.detach().contiguous(memory_format=torch.channels_last)
    _LAYOUT_CACHE[key] = (weakref.ref(t, lambda _, key=key: _LAYOUT_CACHE.pop(key, None)), version, out)
    _LAYOUT_CACHE.move_to_end(key)
    while len(_LAYOUT_CACHE) > _LAYOUT_CACHE_SIZE:
        _LAYOUT_CACHE.popitem(last=False)
    return out


def activations_channels_last(x: torch.Tensor) -> torch.Tensor:
    """An (N, C, H, W) activation with channels innermost: ``x`` itself when it is channels_last (the kernels'
    native layout: no copy), else one converted copy (not cached: activations change every call)."""
    if x.dim() != 4 or x.is_contiguous(memory_format=torch.channels_last):
        return x
    return x.contiguous(memory_format=torch.channels_last)


# ------------------------------------------------------------------------------------------------ launch-side shapes


def conv_out_hw(h: int, w: int, kh: int, kw: int, stride, padding, dilation) -> tuple[int, int]:
    """Output (H', W') of a convolution: ``(size + 2 p - d (k - 1) - 1) // s + 1`` per axis (as ``F.conv2d``)."""
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return oh, ow


def is_channels_last(t: torch.Tensor) -> bool:
    """A 4-d tensor in channels_last memory format (and not also contiguous, as size-1 dimensions can make it)."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def empty_like_format(like: torch.Tensor, shape, zero: bool = False, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A fresh tensor in ``like``'s memory format (F.conv2d's outputs follow ``suggest_memory_format``: the output
    of a channels_last input is channels_last), zeroed when ``zero``."""
    fmt = torch.channels_last if is_channels_last(like) else torch.contiguous_format
    out = torch.empty(shape, dtype=dtype or like.dtype, device=like.device, memory_format=fmt)
    return out.zero_() if zero else out


def take_channels(t: torch.Tensor, idx: torch.Tensor | None, channels: int | None = None,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """``t[:, idx]`` for a 4-d tensor, as a new NHWC tensor (channels_last strides): the compact operand the kernels
    read with vector loads. ``t`` itself when ``idx`` is None and ``channels`` is None.

    ``channels``: zero-pad the channel axis up to that many (the copy is then made even without ``idx``), in
    ``dtype`` (default t's), so that every pixel of the copy starts on a 16-byte boundary."""
    if channels is None:
        if idx is None:
            return t
        return t.permute(0, 2, 3, 1).index_select(3, idx).permute(0, 3, 1, 2)
    n, c, h, w = t.shape
    c_read = c if idx is None else idx.numel()
    out = t.new_zeros(n, h, w, channels, dtype=dtype or t.dtype)
    tt = t.permute(0, 2, 3, 1)
    out[..., :c_read] = tt if idx is None else tt.index_select(3, idx.to(t.device))
    return out.permute(0, 3, 1, 2)
