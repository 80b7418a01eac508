"""kernels/_common.py: the dot precision keyed like the dense baseline, and the kernel-layout cache of weights."""

import gc

import pytest
import torch

pytest.importorskip("triton")

from tritonslide.kernels import _common  # noqa: E402


@pytest.fixture
def tf32_flags():
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("cudnn_flag", [True, False])
@pytest.mark.parametrize("matmul_flag", [True, False])
def test_dot_precision_follows_the_flag_of_the_replaced_layer(monkeypatch, tf32_flags, cudnn_flag, matmul_flag):
    """Convolutions follow cudnn.allow_tf32 (F.conv2d's flag), linear layers cuda.matmul.allow_tf32 (F.linear's)."""
    monkeypatch.setattr(_common, "interpreting", lambda: False)
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn_flag, matmul_flag
    assert _common.dot_precision(torch.float32) == ("tf32" if cudnn_flag else "ieee")
    assert _common.dot_precision(torch.float32, "conv") == ("tf32" if cudnn_flag else "ieee")
    assert _common.dot_precision(torch.float32, "linear") == ("tf32" if matmul_flag else "ieee")
    for half in (torch.float16, torch.bfloat16):  # products of half inputs are exact in fp32: the flags don't apply
        assert _common.dot_precision(half, "conv") == "ieee"
        assert _common.dot_precision(half, "linear") == "ieee"


def test_dot_precision_is_ieee_under_the_interpreter(monkeypatch, tf32_flags):
    monkeypatch.setattr(_common, "interpreting", lambda: True)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    assert _common.dot_precision(torch.float32, "conv") == "ieee"
    assert _common.dot_precision(torch.float32, "linear") == "ieee"


def test_dot_precision_rejects_an_unknown_kind():
    with pytest.raises(ValueError, match="kind must be 'conv' or 'linear'"):
        _common.dot_precision(torch.float32, "attention")


def test_channels_inner_is_cached_per_weight_version():
    w = torch.nn.Parameter(torch.randn(7, 5, 3, 2))
    first = _common.channels_inner(w)
    assert first.is_contiguous(memory_format=torch.channels_last) and torch.equal(first, w)
    assert not first.requires_grad
    assert _common.channels_inner(w) is first
    assert _common.channels_inner(w.detach()) is first  # a view of the same storage and version counter
    with torch.no_grad():
        w.mul_(2)  # an optimizer step: the version counter moves, the copy is rebuilt
    second = _common.channels_inner(w)
    assert second is not first and torch.equal(second, w)


def test_channels_inner_drops_the_copy_when_the_weight_dies():
    before = len(_common._LAYOUT_CACHE)
    w = torch.randn(6, 4, 3, 3)
    _common.channels_inner(w)
    assert len(_common._LAYOUT_CACHE) == before + 1
    del w
    gc.collect()
    assert len(_common._LAYOUT_CACHE) == before


def test_channels_inner_returns_channels_last_tensors_and_converts_inference_tensors():
    w = torch.randn(6, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    assert _common.channels_inner(w) is w
    with torch.inference_mode():
        t = torch.randn(6, 4, 3, 3)
        out = _common.channels_inner(t)  # no version counter: converted, not cached
    assert out.is_contiguous(memory_format=torch.channels_last) and torch.equal(out, t)


def test_channels_inner_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(_common, "_LAYOUT_CACHE_SIZE", 3)
    keep = [torch.randn(2, 3, 2, 2) for _ in range(5)]
    for t in keep:
        _common.channels_inner(t)
    assert len(_common._LAYOUT_CACHE) <= 3


def test_activations_channels_last():
    x = torch.randn(2, 5, 4, 3)
    cl = _common.activations_channels_last(x)
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(cl, x)
    assert _common.activations_channels_last(cl) is cl


# ------------------------------------------------------------------------------------------------ shared helpers


@pytest.mark.parametrize("geom", [((1, 1), (0, 0), (1, 1)), ((2, 3), (1, 2), (1, 1)), ((1, 2), (3, 0), (2, 3))])
def test_conv_out_hw_matches_conv2d(geom):
    stride, padding, dilation = geom
    x, w = torch.zeros(1, 2, 13, 17), torch.zeros(3, 2, 3, 4)
    y = torch.nn.functional.conv2d(x, w, stride=stride, padding=padding, dilation=dilation)
    assert _common.conv_out_hw(13, 17, 3, 4, stride, padding, dilation) == tuple(y.shape[2:])


@pytest.mark.parametrize("channels_last", [False, True])
def test_empty_like_format_and_take_channels(channels_last):
    x = torch.randn(2, 7, 5, 3)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out = _common.empty_like_format(x, (2, 4, 3, 3), zero=True, dtype=torch.float64)
    assert _common.is_channels_last(out) == channels_last and out.dtype == torch.float64 and not out.any()
    idx = torch.tensor([5, 0, 3])
    assert _common.take_channels(x, None) is x
    took = _common.take_channels(x, idx)
    assert torch.equal(took, x[:, idx]) and took.is_contiguous(memory_format=torch.channels_last)
    padded = _common.take_channels(x, idx, 16, dtype=torch.float16)  # zero channels up to 16, in another dtype
    assert padded.shape == (2, 16, 5, 3) and padded.dtype == torch.float16
    assert torch.equal(padded[:, :3], x[:, idx].half()) and not padded[:, 3:].any()
    assert torch.equal(_common.take_channels(x, None, 8)[:, :7], x)


def test_dot_configs_and_clamp_blocks():
    import triton
    from triton.runtime.jit import MockTensor

    from tritonslide.kernels import _gemm

    make = _gemm.config_factory("BLOCK_M", "BLOCK_N", "BLOCK_K")
    tc, fma, tf32 = [make(128, 64, 32, 8, 3)], [make(64, 32, 16, 4, 3)], [make(64, 64, 32, 4, 3)]
    every = tc + fma + tf32
    assert every[0].kwargs == {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32} and every[0].num_warps == 8
    for dtype, prec, want in ((torch.float16, "ieee", tc), (torch.float32, "ieee", fma), (torch.float32, "tf32", tf32)):
        args = {"x_ptr": MockTensor(dtype), "PRECISION": prec}
        assert _gemm.dot_configs(every, args, "x_ptr", tc, fma, tf32) == want
    # without a TF32 list, TF32 takes the tensor-core list; a list with no member of it gives nothing
    assert _gemm.dot_configs(every, {"x_ptr": MockTensor(torch.float32), "PRECISION": "tf32"}, "x_ptr", tc, fma) == tc
    assert _gemm.dot_configs([make(16, 16, 16, 4, 1)], {"x_ptr": MockTensor(torch.float16), "PRECISION": "ieee"},
                             "x_ptr", tc, fma) == []
    # clamping to 3 active rows x 20 channels: BLOCK_N 16, BLOCK_K 32; the duplicates this makes are dropped
    clamped = _gemm.clamp_blocks([make(64, 64, 64, 4, 3), make(64, 32, 64, 4, 3)], 3, 20)
    assert [(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) for c in clamped] == [(16, 32)]
    assert all(isinstance(c, triton.Config) for c in clamped)
