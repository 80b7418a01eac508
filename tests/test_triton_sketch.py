"""The fused Triton sketch chains (kernels/sketch.py) against an explicit dense reference and the torch fallback.

Reference 1 is the definition in float64 with the weight formed: ``F.conv2d(x, B @ A, bias)`` (``F.linear`` for
SK-FC), masked to the channels ``out_idx``; reference 2 is ``tritonslide.cpu_fallback`` (the two-step torch chain)
in the kernel's dtype. Forward and every gradient (``torch.autograd.grad``) are compared, tolerances from
tests/tolerances.py. On CPU the kernels run in Triton's interpreter (tests/conftest.py sets ``TRITON_INTERPRET=1``)
with an r tile of 16 (``MAX_BLOCK_R``), so r > 16 takes the r-chunk loop; shapes are tiny. The same tests run on
CUDA (marker ``gpu``) with bf16 as well.
"""

import pytest
import torch
import torch.nn.functional as F

import tritonslide
from tests.tolerances import assert_close
from tests.triton_utils import DEVICES, ON_INTERPRETER, dtypes_for, requires_triton
from tritonslide import ops, use_backend

pytestmark = requires_triton

# (N, C, H, W, r, O, kh, kw, stride, padding, dilation, channels_last): not powers of two. C < 16 takes the ROWS
# order (kernel-row segments of a zero-padded frame with C_PAD channels) in the forward and dA, except with a column
# dilation (3x3s2d2: flattened K), and dX reads A with its channels padded to 16; C = 16 / 20 the tap-major tiles;
# r = 20 / 17 / 23 exceed the interpreter's r tile of 16.
CONV = {
    "3x3": (2, 7, 9, 8, 5, 13, 3, 3, 1, 1, 1, False),
    "3x3s2-cl-rloop": (2, 16, 9, 8, 20, 13, 3, 3, 2, 1, 1, True),
    "11x11s4": (1, 2, 13, 14, 9, 10, 11, 11, 4, 2, 1, False),
    "5x5": (2, 5, 8, 9, 3, 6, 5, 5, 1, 2, 1, False),
    "3x2-s21-d21-rloop": (2, 6, 10, 9, 17, 11, 3, 2, (2, 1), (1, 0), (2, 1), False),
    "1x1-cl": (3, 20, 5, 6, 12, 9, 1, 1, 1, 0, 1, True),
    "3x3-m288": (2, 16, 12, 12, 6, 7, 3, 3, 1, 1, 1, False),
    "3x3s2d2-rloop": (2, 5, 10, 9, 23, 7, 3, 3, 2, 1, 2, False),
    # the kernels' layouts (x NHWC, A (r, kh, kw, C)): C = 17 flattened in channels_last; C = 70 tap-major with a
    # channel tail (70 = 4 x 16 + 6 under the interpreter's BLOCK_K 16); a dilated unit-stride conv (dX's unit-stride
    # path, dA's row table with padding); a 1x1 tap-major conv (dA's identity rows)
    "3x3-c17-cl": (2, 17, 7, 6, 9, 11, 3, 3, 1, 1, 1, True),
    "3x3-c70-cl-rloop": (1, 70, 5, 6, 19, 9, 3, 3, 1, 1, 1, True),
    "3x3d2-c16": (2, 16, 9, 7, 6, 5, 3, 3, 1, 2, 2, False),
    "1x1-c32": (2, 32, 5, 3, 7, 10, 1, 1, 1, 0, 1, False),
    # ROWS with C = 1 / 3 / 7: strides 2 and 4, padding, a row dilation, both layouts, the r loop
    "5x5s2-c1": (2, 1, 11, 10, 6, 8, 5, 5, 2, 2, 1, False),  # C = 1: NCHW and channels_last are one layout
    "11x11s4-c3-cl": (1, 3, 19, 17, 7, 9, 11, 11, 4, 2, 1, True),
    "3x3-c7-d21-rloop": (2, 7, 9, 8, 18, 6, 3, 3, 1, 1, (2, 1), False),
}


def _idx(spec, o, gen, device):
    if spec is None:
        return None
    if spec == "empty":
        return torch.empty(0, dtype=torch.int64, device=device)
    return torch.randperm(o, generator=gen)[: max(1, round(o * spec))].sort().values.to(device)


def conv_factors(case, dtype, device, seed=0):
    n, c, h, w, r, o, kh, kw, stride, padding, dilation, cl = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=gen)
    a = torch.randn(r, c, kh, kw, generator=gen) / (c * kh * kw) ** 0.5
    b = torch.randn(o, r, generator=gen) / r**0.5
    bias = torch.randn(o, generator=gen)
    x, a, b, bias = (t.to(device, dtype) for t in (x, a, b, bias))
    if cl:
        x = x.to(memory_format=torch.channels_last)
    return x, a, b, bias, gen


def dense_conv_reference(x, a, b, bias, out_idx, stride, padding, dilation, grad_y):
    """(y, dx, dA, dB, dbias) in float64 on CPU: the full weight B @ A, one conv, the inactive channels masked."""
    x, a, b = (t.detach().cpu().double().requires_grad_() for t in (x, a, b))
    bias = None if bias is None else bias.detach().cpu().double().requires_grad_()
    w = (b @ a.flatten(1)).view(b.shape[0], *a.shape[1:])
    y = F.conv2d(x, w, bias, stride, padding, dilation)
    mask = torch.ones(b.shape[0], dtype=torch.float64)
    if out_idx is not None:
        mask.zero_()[out_idx.cpu()] = 1
    y = y * mask.view(1, -1, 1, 1)
    leaves = [t for t in (x, a, b, bias) if t is not None]
    return (y.detach(), *torch.autograd.grad(y, leaves, grad_y.detach().cpu().double()))


def run_op(backend, fn, leaves, needs, extra, grad_y=None):
    """y and the gradients of the leaves marked in ``needs`` (None elsewhere) through tritonslide.ops."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(bool(nd)) for t, nd in zip(leaves, needs)]
    with use_backend(backend):
        y = fn(*leaves, *extra)
    if grad_y is None:
        return y, leaves
    wanted = [t for t in leaves if t is not None and t.requires_grad]
    grads = iter(torch.autograd.grad(y, wanted, grad_y))
    return y.detach(), [next(grads) if t is not None and t.requires_grad else None for t in leaves]


def check_conv(case, dtype, device, out_idx_spec, needs=(True, True, True, True), with_bias=True, seed=0,
               fallback=True):
    x, a, b, bias, gen = conv_factors(case, dtype, device, seed)
    n, c, h, w, r, o, kh, kw, stride, padding, dilation, cl = case
    bias = bias if with_bias else None
    out_idx = _idx(out_idx_spec, o, gen, device)
    extra = (out_idx, stride, padding, dilation)
    y, _ = run_op("triton", ops.sketch_conv2d, (x, a, b, bias), needs, extra)
    grad_y = torch.randn(y.shape, generator=gen).to(device, dtype)
    y, grads = run_op("triton", ops.sketch_conv2d, (x, a, b, bias), needs, extra, grad_y)
    if fallback:
        y_fb, grads_fb = run_op("torch", ops.sketch_conv2d, (x, a, b, bias), needs, extra, grad_y)
    else:  # compared with the dense reference only
        y_fb, grads_fb = y, grads
    ref = dense_conv_reference(x, a, b, bias, out_idx, stride, padding, dilation, grad_y)

    assert y.dtype == dtype and y.shape == ref[0].shape
    if cl:
        assert y.is_contiguous(memory_format=torch.channels_last)
    spatial = n * y.shape[2] * y.shape[3]
    reductions = (c * kh * kw * r, o * r * kh * kw, spatial * o, spatial * c * kh * kw, spatial)
    assert_close(y.cpu(), ref[0], dtype, reduction=reductions[0], msg="y vs dense")
    assert_close(y, y_fb, dtype, reduction=reductions[0], msg="y vs torch fallback")
    ref_grads = iter(ref[1:])
    for name, got, fb, leaf, red, need in zip("x A B bias".split(), grads, grads_fb, (x, a, b, bias), reductions[1:],
                                             needs):
        if leaf is None:
            continue
        want = next(ref_grads)
        if not need:
            assert got is None
            continue
        assert got.shape == leaf.shape and got.dtype == dtype
        assert_close(got.cpu(), want, dtype, reduction=red, msg=f"d{name} vs dense")
        assert_close(got, fb, dtype, reduction=red, msg=f"d{name} vs torch fallback")
    if out_idx is not None:
        off = torch.ones(o, dtype=torch.bool, device=device)
        off[out_idx] = False
        assert (y[:, off] == 0).all()
        if needs[2]:
            assert (grads[2][off] == 0).all()
        if needs[3] and with_bias:
            assert (grads[3][off] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CONV.values(), ids=CONV.keys())
@pytest.mark.parametrize("active", [None, 0.5], ids=["all", "half-active"])
def test_conv_fp32(device, case, active):
    check_conv(case, torch.float32, device, active)


HALF_CASES = ["3x3", "3x3s2-cl-rloop", "3x2-s21-d21-rloop", "1x1-cl", "3x3d2-c16", "11x11s4-c3-cl"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", dtypes_for())
@pytest.mark.parametrize("name", HALF_CASES)
def test_conv_half(device, dtype, name):
    check_conv(CONV[name], dtype, device, 0.6 if "rloop" in name else None)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "needs, with_bias",
    [((False, True, False, True), True),   # output side: A = S1 trainable, B = U1 fixed, x the first layer's input
     ((True, False, True, False), True),   # input side: A = U2 fixed, B = S2 trainable, bias frozen
     ((False, False, False, True), True),  # only the bias
     ((True, True, True, True), False)],   # no bias
    ids=["no-x-no-B", "no-A-no-bias", "bias-only", "no-bias"],
)
def test_conv_needs(device, needs, with_bias):
    check_conv(CONV["3x3s2d2-rloop"], torch.float32, device, 0.5, needs=needs, with_bias=with_bias)


@pytest.mark.parametrize("device", DEVICES)
def test_conv_empty_out_idx(device):
    check_conv(CONV["3x3"], torch.float32, device, "empty")


@pytest.mark.parametrize("device", DEVICES)
def test_launcher_returns_none_for_skipped_gradients(device):
    from tritonslide.kernels.sketch import sketch_conv2d_backward, sketch_conv2d_forward

    x, a, b, bias, _ = conv_factors(CONV["3x3"], torch.float32, device)
    y, z = sketch_conv2d_forward(x, a, b, bias, None, (1, 1), (1, 1), (1, 1))
    assert z.shape == (2, 5, 9, 8)
    assert_close(z.cpu(), F.conv2d(x.double().cpu(), a.double().cpu(), None, 1, 1), torch.float32, reduction=63)
    grads = sketch_conv2d_backward(torch.ones_like(y), x, a, b, z, True, None, (1, 1), (1, 1), (1, 1),
                                   (False, True, False, False))
    assert grads[0] is None and grads[2] is None and grads[3] is None and grads[1].shape == a.shape


@pytest.mark.parametrize("device", DEVICES)
def test_conv_weight_updated_in_place(device):
    """A is read in its kernel layout (r, kh, kw, C), a copy cached per weight version: an in-place update (an
    optimizer step) must reach the next call, forward and backward."""
    from tritonslide.kernels.sketch import sketch_conv2d_backward, sketch_conv2d_forward

    case = CONV["3x3-m288"]
    x, a, b, bias, _ = conv_factors(case, torch.float32, device)
    args = (None, (1, 1), (1, 1), (1, 1))
    sketch_conv2d_forward(x, a, b, bias, *args)
    with torch.no_grad():
        a.mul_(-2.0).add_(0.25)
    y, z = sketch_conv2d_forward(x, a, b, bias, *args)
    ref = dense_conv_reference(x, a, b, bias, None, (1, 1), (1, 1), (1, 1), torch.ones_like(y))
    assert_close(y.cpu(), ref[0], torch.float32, reduction=16 * 9 * 6)
    gy = torch.ones_like(y)
    dx = sketch_conv2d_backward(gy, x, a, b, z, True, None, (1, 1), (1, 1), (1, 1), (True, False, False, False))[0]
    assert_close(dx.cpu(), ref[1], torch.float32, reduction=7 * 6 * 9)


def test_autotune_lists_after_prune():
    """What bench.aot checks on compiled code rests on the lists: tensor-core tiles with at least 64 rows per dot
    and whole 4-warp groups (wgmma on sm_90), FMA tiles only for fp32 with IEEE products, tiles no wider than the
    problem."""
    from triton.runtime.jit import MockTensor

    from tritonslide.kernels import _gemm, sketch

    lists = {  # tensor-core list, FMA list, pointer argument, limits, TF32 list, name of the dot's M tile
        "fwd": (sketch._FWD_TC, sketch._FWD_FMA, "x_ptr", sketch._fwd_limits, None, "BLOCK_M"),
        "dz": (sketch._DZ_TC, sketch._DZ_FMA, "g_ptr", sketch._r_limits, None, "BLOCK_M"),
        "db": (sketch._DB_TC, sketch._DB_FMA, "g_ptr", sketch._r_limits, None, "BLOCK_O"),
        "da": (sketch._DA_TC, sketch._DA_FMA, "x_ptr", sketch._da_limits, sketch._DA_TF32, "BLOCK_R"),
        "dx": (sketch._DX_TC, sketch._DX_FMA, "dz_ptr", sketch._dx_limits, None, "BLOCK_M"),
    }
    for name, (tc, fma, ptr, limits, tf32, m_name) in lists.items():
        for cfg in tc + (tf32 or []):
            assert cfg.kwargs[m_name] >= 64 and cfg.num_warps % 4 == 0, (name, cfg)
        every = tc + (tf32 or []) + fma
        prune = _gemm.prune_by_dot(tc, fma, ptr, limits, tf32)
        base = {"C": 256, "R": 64, "TAP_MAJOR": True, "SINGLE_R": True, "sdc": 1}
        for dtype, prec, want in ((torch.float16, "ieee", tc), (torch.float32, "ieee", fma),
                                  (torch.float32, "tf32", tf32 or tc)):
            kept = prune(every, {**base, ptr: MockTensor(dtype)}, PRECISION=prec)
            assert kept and all(any(c is w for w in want) for c in kept), (name, dtype, prec)
            if name in ("dz", "db", "da"):  # r = 64: no 128-wide r tile
                assert all(c.kwargs["BLOCK_R"] <= 64 for c in kept), name


# ---------------------------------------------------------------------------------------------------- linear

# (lead, in, r, out, out_idx): r = 20 > 16 loops over r chunks; M = 7 rows fill one position tile, so the output
# channels are split over programs (O_SPLIT) and dZ's reduction over O is split too.
LINEAR = {
    "7x23-r9": ((7,), 23, 9, 17, None),
    "2x5x30-r20-idx": ((2, 5), 30, 20, 37, 0.6),
    "vector-r5": ((), 11, 5, 19, 0.5),
    "7x23-r20-split": ((7,), 23, 20, 37, None),
    "9x48-r11-idx": ((9,), 48, 11, 21, 0.5),  # tap-major K (48 = 3 x 16): 16-byte rows, dA's identity rows
}


def check_linear(case, dtype, device, needs=(True, True, True, True), seed=1):
    lead, d_in, r, d_out, frac = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, d_in, generator=gen).to(device, dtype)
    a = (torch.randn(r, d_in, generator=gen) / d_in**0.5).to(device, dtype)
    b = (torch.randn(d_out, r, generator=gen) / r**0.5).to(device, dtype)
    bias = torch.randn(d_out, generator=gen).to(device, dtype)
    out_idx = _idx(frac, d_out, gen, device)
    grad_y = torch.randn(*lead, d_out, generator=gen).to(device, dtype)
    y, grads = run_op("triton", ops.sketch_linear, (x, a, b, bias), needs, (out_idx,), grad_y)
    y_fb, grads_fb = run_op("torch", ops.sketch_linear, (x, a, b, bias), needs, (out_idx,), grad_y)
    xr, ar, br, biasr = (t.detach().cpu().double().requires_grad_() for t in (x, a, b, bias))
    y_ref = F.linear(xr, br @ ar, biasr)
    if out_idx is not None:
        mask = torch.zeros(d_out, dtype=torch.float64)
        mask[out_idx.cpu()] = 1
        y_ref = y_ref * mask
    ref = torch.autograd.grad(y_ref, (xr, ar, br, biasr), grad_y.cpu().double())
    m = max(1, x[..., 0].numel())
    assert y.shape == y_ref.shape and y.dtype == dtype
    assert_close(y.cpu(), y_ref.detach(), dtype, reduction=d_in * r)
    assert_close(y, y_fb, dtype, reduction=d_in * r)
    for name, got, fb, want, red, need in zip("x A B bias".split(), grads, grads_fb, ref,
                                             (d_out * r, m * d_out, m * d_in, m), needs):
        if not need:
            assert got is None
            continue
        assert_close(got.cpu(), want, dtype, reduction=red, msg=f"d{name} vs dense")
        assert_close(got, fb, dtype, reduction=red, msg=f"d{name} vs torch fallback")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", LINEAR.values(), ids=LINEAR.keys())
def test_linear_fp32(device, case):
    check_linear(case, torch.float32, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", dtypes_for())
def test_linear_half(device, dtype):
    check_linear(LINEAR["2x5x30-r20-idx"], dtype, device)


@pytest.mark.parametrize("device", DEVICES)
def test_linear_needs(device):
    check_linear(LINEAR["7x23-r20-split"], torch.float32, device, needs=(False, True, False, True))


# ---------------------------------------------------------------------------------------------------- layers


def _sketch_ops_only(monkeypatch):
    """Route only the sketch ops to Triton: MILF's hashing (hash_histogram, active-set selection) stays on the torch
    path, so both runs pick the same active filters and the comparison is about the sketch kernels alone."""
    real = ops.resolve_backend
    monkeypatch.setattr(ops, "resolve_backend", lambda op, t: real(op, t) if op.startswith("sketch") else "torch")


def _compare_layer(layer, x, backends=("torch", "triton")):
    results = []
    for backend in backends:
        layer.zero_grad(set_to_none=True)
        with use_backend(backend):
            y = layer(x)
        gy = torch.linspace(-1, 1, y.numel(), device=y.device, dtype=y.dtype).view(y.shape)
        y.backward(gy)
        grads = {name: p.grad.detach().clone() for name, p in layer.named_parameters() if p.grad is not None}
        results.append((y.detach(), grads))
    (y_t, g_t), (y_k, g_k) = results
    assert g_t.keys() == g_k.keys() and len(g_t) > 0
    assert_close(y_k, y_t, torch.float32, reduction=64)
    for name in g_t:
        assert_close(g_k[name], g_t[name], torch.float32, reduction=x.numel(), msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_layers_match_torch_backend(device, monkeypatch):
    _sketch_ops_only(monkeypatch)
    cfg = tritonslide.SketchConfig(k=3, pairs=2, mode="both")
    conv = tritonslide.nn.SketchConv2d(5, 9, 3, stride=2, padding=1, config=cfg).to(device)
    _compare_layer(conv, torch.randn(2, 5, 9, 7, device=device))
    lin = tritonslide.nn.SketchLinear(13, 11, config=cfg).to(device)
    _compare_layer(lin, torch.randn(3, 13, device=device))
    milf = tritonslide.nn.MILFConv2d(4, 12, 3, padding=1, config=tritonslide.MILFConfig()).to(device)
    _compare_layer(milf, torch.randn(2, 4, 7, 6, device=device))
    assert milf.last_active_counts is not None and 0 < milf.last_active_counts[0] <= 12


def test_interpreter_exercises_r_loop():
    """The r-chunk path is tested only when the r tile is smaller than the tests' r (20 > 16)."""
    if not ON_INTERPRETER:
        pytest.skip("the GPU r tile is 128")
    from tritonslide.kernels import sketch

    assert sketch.MAX_BLOCK_R == 16


@pytest.mark.parametrize("device", DEVICES)
def test_conv_few_channels_padding_never_reaches_other_patches(device):
    """The ROWS forward (C < 16) multiplies no element outside a patch (zero channels, the chunk past the last kernel
    row, rows past M): a non-finite pixel reaches only z and y at the positions whose patches hold it."""
    from tritonslide.kernels.sketch import sketch_conv2d_forward

    x, a, b, bias, _ = conv_factors(CONV["3x3"], torch.float32, device)  # C = 7, 3x3, padding 1
    x = x.clone()
    x[1, 3, 2, 5] = float("inf")
    y, z = sketch_conv2d_forward(x, a, b, bias, None, (1, 1), (1, 1), (1, 1))
    bad = ~torch.isfinite(x)
    hit = F.conv2d(bad.any(1, keepdim=True).double(), torch.ones(1, 1, 3, 3, dtype=torch.float64), None, 1, 1)[:, 0] > 0
    for t in (y, z):
        assert torch.isfinite(t.permute(0, 2, 3, 1)[~hit]).all()
        assert not torch.isfinite(t.permute(0, 2, 3, 1)[hit]).all(-1).any()
    x_ok = torch.where(bad, torch.zeros_like(x), x)
    ref = dense_conv_reference(x_ok, a, b, bias, None, (1, 1), (1, 1), (1, 1), torch.ones_like(y))[0]
    assert_close(y.permute(0, 2, 3, 1)[~hit].cpu(), ref.permute(0, 2, 3, 1)[~hit.cpu()], torch.float32,
                 reduction=7 * 9 * 5)
