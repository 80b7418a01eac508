"""The Triton active-filter convolution (kernels/active_conv2d.py) against a plain masked dense reference.

The reference is the definition itself, in float64 and on dense tensors: ``F.conv2d(x * m_in, W * m_out * m_in,
b * m_out) * m_out`` with the 0/1 channel masks of ``out_idx`` / ``in_idx``; forward and all three gradients come
from ``torch.autograd.grad`` on it. On CPU the kernels run in Triton's interpreter (tests/conftest.py sets
``TRITON_INTERPRET=1``), so the shapes are tiny; the same tests run on CUDA (marker ``gpu``), with bf16 as well.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from tests.tolerances import assert_close
from tests.triton_utils import DEVICES, ON_INTERPRETER, deterministic_algorithms, dtypes_for, requires_triton
from tritonslide import ops, use_backend
from tritonslide.cpu_fallback import torch_active_conv2d, torch_active_conv2d_backward

pytestmark = requires_triton

# (N, C, H, W, O, kh, kw, stride, padding, dilation): not powers of two; 1x1, 3x3, 5x5, 11x11 s4, strides 2 and 4,
# asymmetric geometry, dilation.
SHAPES = [
    (2, 5, 9, 8, 7, 3, 3, 1, 1, 1),
    (1, 3, 15, 13, 5, 11, 11, 4, 2, 1),
    (2, 6, 11, 10, 9, 5, 5, 2, 2, 1),
    (1, 4, 9, 10, 6, 3, 2, (2, 3), (1, 0), (2, 1)),
    (2, 7, 7, 6, 9, 1, 1, 1, 0, 1),
    (2, 5, 10, 9, 7, 3, 3, 2, 1, 2),
]
SHAPE_IDS = ["3x3", "11x11s4", "5x5s2", "3x2-s23-d21", "1x1", "3x3s2d2"]


def masked_reference(x, w, b, out_idx, in_idx, stride, padding, dilation, grad_y):
    """(y, dx, dW, db) of the definition in float64, from dense tensors and 0/1 masks."""
    x, w = x.double().requires_grad_(), w.double().requires_grad_()
    b = None if b is None else b.double().requires_grad_()
    m_in = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    m_out = torch.zeros(w.shape[0], dtype=torch.float64, device=x.device)
    m_in[in_idx if in_idx is not None else slice(None)] = 1
    m_out[out_idx if out_idx is not None else slice(None)] = 1
    wm = w * m_out.view(-1, 1, 1, 1) * m_in.view(1, -1, 1, 1)
    y = F.conv2d(x * m_in.view(1, -1, 1, 1), wm, None if b is None else b * m_out, stride, padding, dilation)
    y = y * m_out.view(1, -1, 1, 1)
    leaves = (x, w) + (() if b is None else (b,))
    grads = torch.autograd.grad(y, leaves, grad_y.double())
    return (y.detach(), *grads) + ((None,) if b is None else ())


def random_idx(n, frac, gen, device):
    if frac is None:
        return None
    k = round(n * frac)
    return torch.randperm(n, generator=gen)[:k].sort().values.to(device)


def make_case(shape, dtype, device, out_frac, in_frac, seed=0, with_bias=True):
    n, c, h, w_, o, kh, kw, stride, padding, dilation = shape
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w_, generator=gen).to(device, dtype)
    w = (torch.randn(o, c, kh, kw, generator=gen) / (c * kh * kw) ** 0.5).to(device, dtype)
    b = torch.randn(o, generator=gen).to(device, dtype) if with_bias else None
    out_idx = random_idx(o, out_frac, gen, device)
    in_idx = random_idx(c, in_frac, gen, device)
    ho, wo = F.conv2d(x[:1, :1].float().cpu(), w[:1, :1].float().cpu(), None, stride, padding, dilation).shape[2:]
    gy = torch.randn(n, o, ho, wo, generator=gen).to(device, dtype)
    return x, w, b, out_idx, in_idx, gy


def run_triton(x, w, b, out_idx, in_idx, stride, padding, dilation, gy, **compact):
    leaves = [t.clone().requires_grad_() for t in (x, w) + (() if b is None else (b,))]
    with use_backend("triton"):
        y = ops.active_conv2d(leaves[0], leaves[1], None if b is None else leaves[2], out_idx, in_idx, stride,
                              padding, dilation, **compact)
    grads = torch.autograd.grad(y, leaves, gy)
    return (y.detach(), *grads) + ((None,) if b is None else ())


def reductions(shape, y):
    """Reduction lengths of (y, dx, dW / db) for the tolerance scaling."""
    n, c, _, _, o, kh, kw = shape[:7]
    return c * kh * kw, o * kh * kw, n * y.shape[2] * y.shape[3]


def check_against_reference(shape, dtype, got, ref, out_idx, in_idx):
    y, dx, dw, db = got
    y_ref, dx_ref, dw_ref, db_ref = ref
    red_y, red_x, red_w = reductions(shape, y)
    assert y.dtype == dtype and dx.dtype == dtype and dw.dtype == dtype
    assert_close(y, y_ref, dtype, reduction=red_y, msg="y")
    assert_close(dx, dx_ref, dtype, reduction=red_x, msg="dx")
    assert_close(dw, dw_ref, dtype, reduction=red_w, msg="dW")
    if db_ref is not None:
        assert_close(db, db_ref, dtype, reduction=red_w, msg="db")
    # the contract, exactly: zeros outside the active rows / channels, never "small"
    if out_idx is not None:
        off = torch.ones(shape[4], dtype=torch.bool, device=y.device)
        off[out_idx] = False
        assert (y[:, off] == 0).all() and (dw[off] == 0).all()
        if db_ref is not None:
            assert (db[off] == 0).all()
    if in_idx is not None:
        off = torch.ones(shape[1], dtype=torch.bool, device=y.device)
        off[in_idx] = False
        assert (dx[:, off] == 0).all() and (dw[:, off] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32] + dtypes_for())
@pytest.mark.parametrize("fracs", [(0.5, 0.6), (None, None)], ids=["half-active", "all"])
def test_forward_and_gradients_match_masked_reference(device, shape, dtype, fracs):
    x, w, b, out_idx, in_idx, gy = make_case(shape, dtype, device, *fracs)
    stride, padding, dilation = shape[7:]
    got = run_triton(x, w, b, out_idx, in_idx, stride, padding, dilation, gy)
    ref = masked_reference(x, w, b, out_idx, in_idx, stride, padding, dilation, gy)
    check_against_reference(shape, dtype, got, ref, out_idx, in_idx)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fracs", [(1.0, 0.4), (0.3, 1.0), (0.2, 0.2)], ids=["full-out", "full-in", "sparse"])
def test_index_sets_that_are_full_or_sparse_without_bias(device, fracs):
    shape = SHAPES[0]
    x, w, _, out_idx, in_idx, gy = make_case(shape, torch.float32, device, *fracs, seed=1, with_bias=False)
    got = run_triton(x, w, None, out_idx, in_idx, *shape[7:], gy)
    ref = masked_reference(x, w, None, out_idx, in_idx, *shape[7:], gy)
    check_against_reference(shape, torch.float32, got, ref, out_idx, in_idx)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fracs", [(None, None), (0.7, 0.8)], ids=["all", "active"])
def test_reductions_of_several_chunks_per_tap(device, fracs):
    """21 input channels and 19 filters: more than one BLOCK_K chunk per tap in the forward and dX loops (the
    interpreter's tile has BLOCK_K = 16), so the flat (tap, chunk) loop's carried step wraps inside a tap."""
    shape = (2, 21, 6, 7, 19, 3, 3, 1, 1, 1)
    x, w, b, out_idx, in_idx, gy = make_case(shape, torch.float32, device, *fracs, seed=3)
    x = x.contiguous(memory_format=torch.channels_last)
    got = run_triton(x, w, b, out_idx, in_idx, *shape[7:], gy)
    ref = masked_reference(x, w, b, out_idx, in_idx, *shape[7:], gy)
    check_against_reference(shape, torch.float32, got, ref, out_idx, in_idx)


# dX runs one program set per stride phase, over the taps that reach it: phases that no tap reaches (a kernel smaller
# than the stride: 1x1 s2, 2x2 s3), phases with fewer rows than the others (H, W not multiples of the stride), a
# dilation sharing a factor with the stride (3x3 s2 d2: every tap or none), a stride coprime with the dilation
# (3x3 s3 d2: the taps of a phase step by 3), and several filter chunks per tap (21 filters) on top of it.
STRIDE_PHASE_SHAPES = [
    (2, 5, 7, 6, 7, 1, 1, 2, 0, 1),
    (1, 4, 8, 7, 6, 2, 2, 3, 1, 1),
    (1, 6, 9, 11, 5, 3, 3, 2, 1, 2),
    (1, 5, 13, 10, 4, 3, 3, 3, 2, 2),
    (1, 5, 9, 8, 21, 3, 3, (2, 3), (1, 2), 1),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", STRIDE_PHASE_SHAPES, ids=["1x1s2", "2x2s3", "3x3s2d2", "3x3s3d2", "3x3s23-21f"])
def test_dx_by_stride_phase_matches_reference(device, shape):
    x, w, b, out_idx, in_idx, gy = make_case(shape, torch.float32, device, 0.8, None, seed=5)
    got = run_triton(x, w, b, out_idx, in_idx, *shape[7:], gy)
    ref = masked_reference(x, w, b, out_idx, in_idx, *shape[7:], gy)
    check_against_reference(shape, torch.float32, got, ref, out_idx, in_idx)
    if shape[5] == 1:  # 1x1 stride 2: the input positions between the strided ones get exactly zero
        assert (got[1][:, :, 1::2] == 0).all() and (got[1][:, :, :, 1::2] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_mode_writes_dw_without_split_k(device):
    """Under torch.use_deterministic_algorithms(True) every dW element is written by one program (SPLIT_K=1: one
    atomic add into the zeroed buffer, exact in any order) instead of split-K slices meeting through fp32 atomics;
    the values still match the reference. (The interpreter's only config splits K in two, so its default launches
    take the split-K path.)"""
    from tritonslide.kernels.active_conv2d import _active_conv2d_bwd_dw_kernel as dw_kernel

    shape = SHAPES[2]
    x, w, b, out_idx, in_idx, gy = make_case(shape, torch.float32, device, 0.5, 0.6, seed=4)
    ref = masked_reference(x, w, b, out_idx, in_idx, *shape[7:], gy)
    got = run_triton(x, w, b, out_idx, in_idx, *shape[7:], gy)
    if ON_INTERPRETER:
        assert dw_kernel.best_config.kwargs["SPLIT_K"] == 2
    with deterministic_algorithms():
        det = run_triton(x, w, b, out_idx, in_idx, *shape[7:], gy)
        assert dw_kernel.best_config.kwargs["SPLIT_K"] == 1
        again = run_triton(x, w, b, out_idx, in_idx, *shape[7:], gy)
    for one in (got, det):
        check_against_reference(shape, torch.float32, one, ref, out_idx, in_idx)
    for a, b_ in zip(det, again):
        assert a is None or torch.equal(a, b_)


@pytest.mark.parametrize("device", DEVICES)
def test_weight_updated_in_place_is_seen(device):
    """The kernel-layout copy of W is cached per weight version: an in-place update (an optimizer step) must be
    seen by the next call, forward and dX."""
    shape = SHAPES[0]
    x, w, b, out_idx, in_idx, gy = make_case(shape, torch.float32, device, 0.5, None, seed=4)
    w = w.clone()
    for step in range(2):
        got = run_triton(x, w, b, out_idx, in_idx, *shape[7:], gy)
        ref = masked_reference(x, w, b, out_idx, in_idx, *shape[7:], gy)
        check_against_reference(shape, torch.float32, got, ref, out_idx, in_idx)
        with torch.no_grad():
            w.mul_(-0.5).add_(0.1)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_active_sets(device):
    shape = SHAPES[0]
    x, w, b, _, _, gy = make_case(shape, torch.float32, device, None, None)
    none = torch.empty(0, dtype=torch.int64, device=device)
    out_idx = torch.tensor([1, 4, 6], device=device)
    for oi, ii in ((none, None), (out_idx, none), (none, none)):
        got = run_triton(x, w, b, oi, ii, *shape[7:], gy)
        ref = masked_reference(x, w, b, oi, ii, *shape[7:], gy)
        check_against_reference(shape, torch.float32, got, ref, oi, ii)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[3]], ids=[SHAPE_IDS[0], SHAPE_IDS[3]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_channels_last_input_gives_channels_last_output(device, shape, dtype):
    x, w, b, out_idx, in_idx, gy = make_case(shape, dtype, device, 0.5, 0.6, seed=2)
    x = x.contiguous(memory_format=torch.channels_last)
    gy = gy.contiguous(memory_format=torch.channels_last)
    got = run_triton(x, w, b, out_idx, in_idx, *shape[7:], gy)
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    assert got[1].is_contiguous(memory_format=torch.channels_last)
    ref = masked_reference(x, w, b, out_idx, in_idx, *shape[7:], gy)
    check_against_reference(shape, dtype, got, ref, out_idx, in_idx)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2]], ids=[SHAPE_IDS[0], SHAPE_IDS[2]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_compact_input_and_output(device, shape, dtype):
    """Alg. 6 form: x holds only the channels in_idx, y only the rows out_idx; against the definition (the active
    rows / channels of its dense results) and against the torch fallback given the same compact arguments."""
    x, w, b, out_idx, in_idx, gy = make_case(shape, dtype, device, 0.5, 0.6, seed=3)
    stride, padding, dilation = map(_pair, shape[7:])
    y_ref, dx_ref, dw_ref, db_ref = masked_reference(x, w, b, out_idx, in_idx, stride, padding, dilation, gy)
    red_y, red_x, red_w = reductions(shape, y_ref)
    xc = x.index_select(1, in_idx)
    for compact_input, compact_output in ((True, True), (True, False), (False, True)):
        xin = xc if compact_input else x
        g = gy.index_select(1, out_idx) if compact_output else gy
        # the reference, in the same compact form
        y_exp = y_ref.index_select(1, out_idx) if compact_output else y_ref
        dx_exp = dx_ref.index_select(1, in_idx) if compact_input else dx_ref
        flags = {"compact_input": compact_input, "compact_output": compact_output}
        y, dx, dw, db = run_triton(xin, w, b, out_idx, in_idx, stride, padding, dilation, g, **flags)
        assert y.shape == y_exp.shape and dx.shape == xin.shape
        assert_close(y, y_exp, dtype, reduction=red_y, msg=f"y {flags}")
        assert_close(dx, dx_exp, dtype, reduction=red_x, msg=f"dx {flags}")
        assert_close(dw, dw_ref, dtype, reduction=red_w, msg=f"dW {flags}")
        assert_close(db, db_ref, dtype, reduction=red_w, msg=f"db {flags}")
        # the torch fallback, same compact arguments
        y_t = torch_active_conv2d(xin, w, b, out_idx, in_idx, stride, padding, dilation, compact_input,
                                  compact_output)
        grads_t = torch_active_conv2d_backward(g, xin, w, True, out_idx, in_idx, stride, padding, dilation,
                                               (True, True, True), compact_input, compact_output)
        assert_close(y, y_t, dtype, reduction=red_y)
        for got, exp, red in zip((dx, dw, db), grads_t, (red_x, red_w, red_w)):
            assert_close(got, exp, dtype, reduction=red)


@pytest.mark.parametrize("device", DEVICES)
def test_out_count_uses_only_the_first_entries(device):
    """Device-side active set: out_idx has length O, only the first out_count entries are valid, the padding (values
    in range, repeating active rows) must neither be computed nor written."""
    from tritonslide.kernels.active_conv2d import active_conv2d_backward, active_conv2d_forward

    shape = (2, 5, 9, 8, 7, 3, 3, 2, 1, 1)
    stride, padding, dilation = map(_pair, shape[7:])
    x, w, b, _, in_idx, gy = make_case(shape, torch.float32, device, None, 0.6, seed=4)
    active = torch.tensor([1, 2, 5], device=device)
    padded = torch.cat([active, torch.tensor([2, 0, 0, 6], device=device)])  # length O = 7
    for count, out_idx in ((3, active), (0, active[:0]), (7, torch.arange(7, device=device))):
        pad = padded if count < 7 else out_idx
        out_count = torch.tensor(count, device=device)
        y = active_conv2d_forward(x, w, b, pad, in_idx, stride, padding, dilation, out_count=out_count)
        grads = active_conv2d_backward(gy, x, w, True, pad, in_idx, stride, padding, dilation, (True, True, True),
                                       out_count=out_count)
        ref = masked_reference(x, w, b, out_idx, in_idx, stride, padding, dilation, gy)
        check_against_reference(shape, torch.float32, (y, *grads), ref, out_idx, in_idx)
        # db alone takes the torch path of the launcher: the padding must not count there either
        _, _, db = active_conv2d_backward(gy, x, w, True, pad, in_idx, stride, padding, dilation,
                                          (False, False, True), out_count=out_count.view(1))
        assert_close(db, ref[3], torch.float32, reduction=reductions(shape, y)[2])
    with pytest.raises(ValueError, match="compact_output"):
        active_conv2d_forward(x, w, b, padded, in_idx, stride, padding, dilation, compact_output=True,
                              out_count=torch.tensor(3, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_partial_needs_and_broadcast_grad(device):
    """Only the requested gradients come back; a stride-0 grad (from ``y.sum()``) is read through its strides."""
    from tritonslide.kernels.active_conv2d import active_conv2d_backward

    shape = SHAPES[0]
    x, w, b, out_idx, in_idx, _ = make_case(shape, torch.float32, device, 0.5, 0.6, seed=5)
    gy = torch.ones((), device=device).expand(2, 7, 9, 8)  # the output shape of SHAPES[0]
    geometry = tuple(map(_pair, shape[7:]))
    ref = masked_reference(x, w, b, out_idx, in_idx, *geometry, gy)
    _, red_x, red_w = reductions(shape, gy)
    for needs in ((True, False, False), (False, True, False), (False, False, True)):
        got = active_conv2d_backward(gy, x, w, True, out_idx, in_idx, *geometry, needs)
        for need, g, r, red in zip(needs, got, ref[1:], (red_x, red_w, red_w)):
            assert (g is None) == (not need)
            if need:
                assert_close(g, r, torch.float32, reduction=red)


@pytest.mark.skipif(ON_INTERPRETER, reason="auto picks Triton only for CUDA tensors")
@pytest.mark.parametrize("device", DEVICES)
def test_auto_backend_uses_triton_on_cuda(device):
    from tritonslide._backend import resolve_backend

    assert resolve_backend("active_conv2d", torch.empty(1, device=device)) == "triton"


@requires_triton
def test_prunes_read_keyword_arguments_as_triton_passes_them():
    """Triton's autotuner hands ``early_config_prune`` the positional arguments as ``nargs`` and the keyword ones
    (PRECISION, the flags) as keywords: the prunes read both. IEEE fp32 keeps only tiles that fit FMA dots."""
    from triton.runtime.jit import MockTensor

    from tritonslide.kernels import active_conv2d as k

    extents = {"N_ACT": 128, "C_ACT": 128, "R_ACT": 128, "K_RED": 50176}
    for prune, configs, fma, ptr in ((k._prune_fwd, k._FWD_GPU, k._FWD_FMA, "x_ptr"),
                                     (k._prune_dx, k._DX_GPU, k._DX_FMA, "g_ptr"),
                                     (k._prune_dw, k._DW_GPU, k._DW_FMA, "g_ptr")):
        fits = {(tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages) for c in fma}
        for dtype, prec in ((torch.float16, "ieee"), (torch.float32, "tf32"), (torch.float32, "ieee")):
            kept = prune(configs, {**extents, ptr: MockTensor(dtype)}, PRECISION=prec)
            assert kept, (prune.__name__, dtype, prec)
            if prec == "ieee" and dtype == torch.float32:  # (extents of 128: no clamping changes these tiles)
                assert {(tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages) for c in kept} <= fits
    # dW with a device-side count drops the tile that spills there (64x128x32 / 4 warps)
    kept = k._prune_dw(k._DW_GPU, {**extents, "g_ptr": MockTensor(torch.float16)}, PRECISION="ieee", HAS_COUNT=True)
    assert kept and not any(c.kwargs["BLOCK_N"] == 128 and c.num_warps == 4 for c in kept)


@requires_triton
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("wide", [False, True])
@pytest.mark.parametrize("geometry", [((3, 2), (1, 2), (2, 1)), ((1, 1), (0, 0), (1, 1)), ((4, 3), (2, 0), (1, 3))])
def test_dw_frame_rows_address_every_tap(geometry, wide, channels_last):
    """The dW kernel's addressing: tap (r, t) of output position m reads row ``rows[m] + r d WP + t d`` of the
    zero-padded frame (from NCHW or NHWC x), which must hold x at (oh s - p + r d, ow s - p + t d) or zero in the
    padding: checked against F.unfold (the im2col of F.conv2d) for every position and tap; int32 and int64 tables
    alike."""
    from tritonslide.kernels.active_conv2d import _padded_frame, _position_rows

    stride, padding, dilation = geometry
    n, c, h, w, kh, kw = 2, 3, 7, 6, 3, 2
    x = torch.randn(n, c, h, w)
    frame = _padded_frame(x.contiguous(memory_format=torch.channels_last) if channels_last else x, padding)
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    rows = _position_rows(n, ho, wo, frame.shape[1], frame.shape[2], wide, stride, x.device)
    assert rows.dtype == (torch.int64 if wide else torch.int32) and rows.shape == (n * ho * wo,)
    flat = frame.reshape(-1, c)
    cols = F.unfold(x, (kh, kw), dilation, padding, stride)  # (n, c kh kw, ho wo)
    want = cols.view(n, c, kh, kw, ho * wo).permute(0, 4, 2, 3, 1).reshape(n * ho * wo, kh, kw, c)
    for r in range(kh):
        for t in range(kw):
            got = flat[rows.long() + r * dilation[0] * frame.shape[2] + t * dilation[1]]
            torch.testing.assert_close(got, want[:, r, t], rtol=0, atol=0)


# Few input channels (C < 16): the forward and dW reduce over kernel-row segments of a zero-padded frame with C_PAD
# channels (ROWS), dX reads W with its channels zero-padded to 16. (N, C, H, W, O, kh, kw, stride, padding, dilation):
# C in {1, 3, 5, 7}; strides 1, 2, 4; padding; a row dilation (ROWS keeps it) and a column dilation (the tap path).
ROWS_SHAPES = [
    (2, 1, 9, 8, 5, 3, 3, 1, 1, 1),
    (1, 3, 19, 17, 6, 11, 11, 4, 2, 1),
    (2, 5, 10, 11, 7, 5, 3, 2, (2, 1), (2, 1)),
    (2, 7, 8, 9, 9, 3, 3, 1, 2, 1),
    (2, 3, 9, 10, 5, 3, 3, 2, 1, (1, 2)),
]
ROWS_IDS = ["c1-3x3", "c3-11x11s4", "c5-5x3s2-d21", "c7-3x3p2", "c3-3x3s2-d12-taps"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", ROWS_SHAPES, ids=ROWS_IDS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("fracs", [(None, None), (0.6, 0.7)], ids=["all", "active"])
def test_few_channels_rows_path(device, shape, layout, fracs):
    from tritonslide.kernels.active_conv2d import rows_mode

    dtype = torch.float32 if layout == "nchw" else dtypes_for()[0]
    x, w, b, out_idx, in_idx, gy = make_case(shape, dtype, device, *fracs, seed=6)
    stride, padding, dilation = map(_pair, shape[7:])
    c_act = shape[1] if in_idx is None else in_idx.numel()
    assert rows_mode(c_act, dilation) == (dilation[1] == 1)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        gy = gy.contiguous(memory_format=torch.channels_last)
    got = run_triton(x, w, b, out_idx, in_idx, stride, padding, dilation, gy)
    ref = masked_reference(x, w, b, out_idx, in_idx, stride, padding, dilation, gy)
    check_against_reference(shape, dtype, got, ref, out_idx, in_idx)


@pytest.mark.parametrize("device", DEVICES)
def test_few_channels_compact_input(device):
    """Alg. 6's compact x (only the channels in_idx) through the ROWS frame, every gradient."""
    shape = (2, 7, 9, 8, 6, 3, 3, 2, 1, 1)
    x, w, b, out_idx, in_idx, gy = make_case(shape, torch.float32, device, 0.5, 0.5, seed=7)
    stride, padding, dilation = map(_pair, shape[7:])
    y_ref, dx_ref, dw_ref, db_ref = masked_reference(x, w, b, out_idx, in_idx, stride, padding, dilation, gy)
    red_y, red_x, red_w = reductions(shape, y_ref)
    y, dx, dw, db = run_triton(x.index_select(1, in_idx), w, b, out_idx, in_idx, stride, padding, dilation, gy,
                               compact_input=True)
    assert_close(y, y_ref, torch.float32, reduction=red_y, msg="y")
    assert_close(dx, dx_ref.index_select(1, in_idx), torch.float32, reduction=red_x, msg="dx")
    assert_close(dw, dw_ref, torch.float32, reduction=red_w, msg="dW")
    assert_close(db, db_ref, torch.float32, reduction=red_w, msg="db")


@pytest.mark.parametrize("device", DEVICES)
def test_few_channels_padding_never_reaches_other_patches(device):
    """The ROWS forward multiplies no element outside a patch: the zero channels, the chunk past the last kernel row
    and the rows past M are never combined with real pixels. A non-finite pixel changes only the outputs whose
    patches hold it (as F.conv2d); everywhere else the result is finite and equals the reference."""
    from tritonslide.kernels.active_conv2d import active_conv2d_forward

    shape = (1, 3, 12, 13, 5, 3, 3, 1, 1, 1)
    x, w, b, _, _, _ = make_case(shape, torch.float32, device, None, None, seed=8)
    x[0, 1, 4, 6] = float("inf")
    x[0, 2, 9, 0] = float("nan")
    y = active_conv2d_forward(x, w, b, None, None, (1, 1), (1, 1), (1, 1))
    hit = F.conv2d(torch.isfinite(x).logical_not().double().sum(1, keepdim=True), torch.ones(1, 1, 3, 3,
                   dtype=torch.float64), None, 1, 1)[0, 0] > 0
    assert torch.isfinite(y[:, :, ~hit]).all()
    assert not torch.isfinite(y[:, :, hit]).any()
    x_ok = torch.nan_to_num(x, nan=0.0, posinf=0.0)
    ref = F.conv2d(x_ok.double(), w.double(), b.double(), 1, 1)
    assert_close(y[:, :, ~hit], ref[:, :, ~hit], torch.float32, reduction=27)
