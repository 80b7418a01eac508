"""Per-sample active sets in the Triton kernels (kernels/sample_conv2d.py, the per-sample hash histogram of
kernels/hash_histogram.py) against deliberately plain per-sample references (issue #15).

The convolution reference is a Python loop over the samples, in float64: sample n is ``F.conv2d(x[n], W * m[n],
b * m[n])`` with ``m[n]`` the 0/1 mask of its active filters, and the gradients come from ``torch.autograd.grad``
of ``sum(y * grad_y)``. The histogram reference is ``torch_hash_histogram`` of each sample alone. On CPU the
kernels run in Triton's interpreter (tests/conftest.py sets ``TRITON_INTERPRET=1``), so the shapes are tiny.
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from tests.tolerances import assert_close
from tests.triton_utils import DEVICES, deterministic_algorithms, dtypes_for, requires_triton
from tritonslide.cpu_fallback import torch_hash_histogram

pytestmark = requires_triton

# (C, H, W, O, kh, kw, stride, padding, dilation): not powers of two; 3x3, 11x11 s4, 5x5 s2, 3x2 asymmetric with
# dilation, 1x1, 3x3 s2 d2 (the SHAPES of tests/test_triton_active_conv2d.py, 3 samples each).
SHAPES = [
    (5, 9, 8, 7, 3, 3, 1, 1, 1),
    (3, 15, 13, 5, 11, 11, 4, 2, 1),
    (6, 11, 10, 9, 5, 5, 2, 2, 1),
    (4, 9, 10, 6, 3, 2, (2, 3), (1, 0), (2, 1)),
    (7, 7, 6, 9, 1, 1, 1, 0, 1),
    (5, 10, 9, 7, 3, 3, 2, 1, 2),
]
SHAPE_IDS = ["3x3", "11x11s4", "5x5s2", "3x2-s23-d21", "1x1", "3x3s2d2"]
BATCH = 3


def sample_sets(counts, o, gen, device, padding="inactive"):
    """(out_idx (N, O) int64, out_count (N,) int64): row n starts with ``counts[n]`` sorted random filters; the rest
    of the row is padding, the inactive filters ("inactive") or repeats of filter 0 / the first active one
    ("repeat")."""
    rows = []
    for c in counts:
        perm = torch.randperm(o, generator=gen)
        active, rest = perm[:c].sort().values, perm[c:].sort().values
        if padding == "repeat":
            rest = torch.full_like(rest, int(active[0]) if c else 0)
        rows.append(torch.cat([active, rest]))
    return torch.stack(rows).to(device), torch.tensor(counts, dtype=torch.int64, device=device)


def masks(out_idx, out_count, o):
    """(N, O) float64 0/1 masks, built by a plain loop."""
    m = torch.zeros(out_idx.shape[0], o, dtype=torch.float64)
    for n in range(out_idx.shape[0]):
        for j in range(int(out_count[n])):
            m[n, int(out_idx[n, j])] = 1
    return m


def per_sample_reference(x, w, b, out_idx, out_count, stride, padding, dilation, grad_y):
    """(y, dx, dW, db) in float64 on CPU: a loop over the samples, each with its own masked filters."""
    m = masks(out_idx.cpu(), out_count.cpu(), w.shape[0])
    x = x.detach().cpu().double().requires_grad_()
    w = w.detach().cpu().double().requires_grad_()
    b = None if b is None else b.detach().cpu().double().requires_grad_()
    ys = []
    for n in range(x.shape[0]):
        mn = m[n]
        ys.append(F.conv2d(x[n:n + 1], w * mn.view(-1, 1, 1, 1), None if b is None else b * mn, stride, padding,
                           dilation))
    y = torch.cat(ys)
    leaves = (x, w) + (() if b is None else (b,))
    grads = torch.autograd.grad((y * grad_y.cpu().double()).sum(), leaves)
    return (y.detach(), *grads) + ((None,) if b is None else ())


def make_case(shape, dtype, device, counts, seed=0, with_bias=True, padding="inactive"):
    c, h, w_, o, kh, kw, stride, pad, dilation = shape
    gen = torch.Generator().manual_seed(seed)
    n = len(counts)
    x = torch.randn(n, c, h, w_, generator=gen).to(device, dtype)
    w = (torch.randn(o, c, kh, kw, generator=gen) / (c * kh * kw) ** 0.5).to(device, dtype)
    b = torch.randn(o, generator=gen).to(device, dtype) if with_bias else None
    out_idx, out_count = sample_sets(counts, o, gen, device, padding)
    ho, wo = F.conv2d(x[:1, :1].float().cpu(), w[:1, :1].float().cpu(), None, _pair(stride), _pair(pad),
                      _pair(dilation)).shape[2:]
    gy = torch.randn(n, o, ho, wo, generator=gen).to(device, dtype)
    return x, w, b, out_idx, out_count, gy


def run_kernels(x, w, b, out_idx, out_count, shape, gy, needs=(True, True, True)):
    from tritonslide.kernels import get_kernel

    stride, padding, dilation = (_pair(v) for v in shape[6:])
    y = get_kernel("sample_conv2d")(x, w, b, out_idx, out_count, stride, padding, dilation)
    grads = get_kernel("sample_conv2d_backward")(gy, x, w, b is not None, out_idx, out_count, stride, padding,
                                                 dilation, needs)
    return (y, *grads)


def reductions(shape, y):
    """Reduction lengths of (y, dx, dW / db) for the tolerance scaling."""
    c, _, _, o, kh, kw = shape[:6]
    return c * kh * kw, o * kh * kw, y.shape[0] * y.shape[2] * y.shape[3]


def check(shape, dtype, got, ref, out_idx, out_count):
    y, dx, dw, db = got
    y_ref, dx_ref, dw_ref, db_ref = ref
    red_y, red_x, red_w = reductions(shape, y)
    assert y.dtype == dtype and dx.dtype == dtype and dw.dtype == dtype
    assert y.shape == y_ref.shape and dx.shape == dx_ref.shape and dw.shape == dw_ref.shape
    assert_close(y.cpu(), y_ref, dtype, reduction=red_y, msg="y")
    assert_close(dx.cpu(), dx_ref, dtype, reduction=red_x, msg="dx")
    assert_close(dw.cpu(), dw_ref, dtype, reduction=red_w, msg="dW")
    if db_ref is not None:
        assert db.dtype == dtype
        assert_close(db.cpu(), db_ref, dtype, reduction=red_w, msg="db")
    else:
        assert db is None
    # the contract, exactly: zero outside each sample's set, and in the rows inactive in every sample
    m = masks(out_idx.cpu(), out_count.cpu(), shape[3]).bool()
    assert (y.cpu()[~m] == 0).all(), "an output outside its sample's active set is not exactly zero"
    never = ~m.any(0)
    assert (dw.cpu()[never] == 0).all()
    if db is not None:
        assert (db.cpu()[never] == 0).all()


COUNTS = {"empty-full-random": lambda o: [0, o, o // 2 + 1], "random": lambda o: [1, o - 2, (2 * o) // 3]}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32] + dtypes_for())
@pytest.mark.parametrize("counts", list(COUNTS), ids=list(COUNTS))
def test_forward_and_gradients_match_per_sample_reference(device, shape, dtype, counts):
    x, w, b, out_idx, out_count, gy = make_case(shape, dtype, device, COUNTS[counts](shape[3]))
    got = run_kernels(x, w, b, out_idx, out_count, shape, gy)
    ref = per_sample_reference(x, w, b, out_idx, out_count, *(_pair(v) for v in shape[6:]), gy)
    check(shape, dtype, got, ref, out_idx, out_count)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[3], SHAPES[5]], ids=[SHAPE_IDS[0], SHAPE_IDS[3], SHAPE_IDS[5]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_channels_last_input_gives_channels_last_output(device, shape, dtype, with_bias):
    x, w, b, out_idx, out_count, gy = make_case(shape, dtype, device, [2, 0, shape[3]], seed=1,
                                                with_bias=with_bias)
    x = x.contiguous(memory_format=torch.channels_last)
    gy = gy.contiguous(memory_format=torch.channels_last)
    got = run_kernels(x, w, b, out_idx, out_count, shape, gy)
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    assert got[1].is_contiguous(memory_format=torch.channels_last)
    ref = per_sample_reference(x, w, b, out_idx, out_count, *(_pair(v) for v in shape[6:]), gy)
    check(shape, dtype, got, ref, out_idx, out_count)


@pytest.mark.parametrize("device", DEVICES)
def test_nchw_input_gives_nchw_output_without_bias(device):
    shape = SHAPES[2]
    x, w, _, out_idx, out_count, gy = make_case(shape, torch.float32, device, [3, 9, 0], seed=2, with_bias=False)
    got = run_kernels(x, w, None, out_idx, out_count, shape, gy)
    assert got[0].is_contiguous() and got[1].is_contiguous()
    ref = per_sample_reference(x, w, None, out_idx, out_count, *(_pair(v) for v in shape[6:]), gy)
    check(shape, torch.float32, got, ref, out_idx, out_count)


@pytest.mark.parametrize("device", DEVICES)
def test_several_chunks_per_tap_and_tiles_per_sample(device):
    """21 channels and 19 filters: more than one BLOCK_K chunk per tap in the forward and dX loops (the
    interpreter's tile has BLOCK_K = 16) and more than one filter tile per sample (BLOCK_N = 16), with a count that
    stops inside the second chunk; 10x9 positions: two position tiles of 64 per sample."""
    shape = (21, 10, 9, 19, 3, 3, 1, 1, 1)
    x, w, b, out_idx, out_count, gy = make_case(shape, torch.float32, device, [17, 19, 5], seed=3)
    got = run_kernels(x, w, b, out_idx, out_count, shape, gy)
    ref = per_sample_reference(x, w, b, out_idx, out_count, *(_pair(v) for v in shape[6:]), gy)
    check(shape, torch.float32, got, ref, out_idx, out_count)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels", [5, 17], ids=["rows-path", "tap-major-path"])
def test_a_sample_never_reads_its_neighbours_pixels(device, channels):
    """Sample 1 holds non-finite pixels and no active filter: sample 0's results, forward and every gradient, are
    exactly those of sample 0 alone. The dW tiles of sample 0 run past its 72 positions (BLOCK_K = 64 in the
    interpreter): with few channels (the ROWS path) the position-row table past a sample points at the frame's zero
    image, not at sample 1, whose inf would turn the zero products of the masked dy into NaN."""
    shape = (channels, 9, 8, 7, 3, 3, 1, 1, 1)
    x, w, b, out_idx, out_count, gy = make_case(shape, torch.float32, device, [7, 0], seed=13)
    x[1, :, 2:5, 3] = float("inf")
    x[1, 0, 0, 0] = float("nan")
    both = run_kernels(x, w, b, out_idx, out_count, shape, gy)
    alone = run_kernels(x[:1], w, b, out_idx[:1], out_count[:1], shape, gy[:1])
    assert torch.equal(both[0][:1], alone[0]) and torch.equal(both[1][:1], alone[1])
    assert torch.isfinite(both[2]).all() and torch.isfinite(both[3]).all()
    torch.testing.assert_close(both[2], alone[2], rtol=1e-6, atol=1e-6)  # fp32 atomics: summation order may differ
    torch.testing.assert_close(both[3], alone[3], rtol=1e-6, atol=1e-6)
    assert (both[0][1] == 0).all() and (both[1][1] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(5, 7, 6, 7, 1, 1, 2, 0, 1), (4, 8, 7, 6, 2, 2, 3, 1, 1),
                                   (18, 9, 8, 5, 3, 3, 2, 1, 1)], ids=["1x1s2", "2x2s3", "3x3s2-c18"])
def test_dx_by_stride_phase_per_sample(device, shape):
    """Per-sample dX runs by stride phase too (phases no tap reaches, phases with fewer rows, the tap-major path
    with 18 channels)."""
    x, w, b, out_idx, out_count, gy = make_case(shape, torch.float32, device, [5, 0, 3], seed=14)
    got = run_kernels(x, w, b, out_idx, out_count, shape, gy)
    ref = per_sample_reference(x, w, b, out_idx, out_count, *(_pair(v) for v in shape[6:]), gy)
    check(shape, torch.float32, got, ref, out_idx, out_count)


@pytest.mark.parametrize("device", DEVICES)
def test_dw_never_touches_rows_inactive_in_every_sample(device):
    """Filters 0, 3 and 6 are active in no sample: their dW and db rows stay exactly zero (never accumulated),
    whatever the padding of the index rows holds (here: repeats of active filters and of filter 0)."""
    shape = SHAPES[0]
    x, w, b, _, _, gy = make_case(shape, torch.float32, device, [1, 1, 1], seed=4)
    out_idx = torch.tensor([[1, 2, 5, 2, 2, 0, 0], [4, 5, 0, 0, 0, 0, 3], [2, 6, 6, 6, 6, 6, 6]], device=device)
    out_count = torch.tensor([3, 2, 1], device=device)
    got = run_kernels(x, w, b, out_idx, out_count, shape, gy)
    ref = per_sample_reference(x, w, b, out_idx, out_count, *(_pair(v) for v in shape[6:]), gy)
    check(shape, torch.float32, got, ref, out_idx, out_count)
    dw, db = got[2], got[3]
    for o in (0, 3, 6):
        assert torch.count_nonzero(dw[o]) == 0 and db[o] == 0
    for o in (1, 2, 4, 5):
        assert torch.count_nonzero(dw[o]) > 0 and db[o] != 0


@pytest.mark.parametrize("device", DEVICES)
def test_padding_of_the_index_rows_is_never_used(device):
    """The same sets with two paddings (the inactive filters, or repeats of an active one) give the same results."""
    shape = SHAPES[3]
    gen_counts = [4, 0, 2]
    a = make_case(shape, torch.float32, device, gen_counts, seed=5, padding="inactive")
    b = make_case(shape, torch.float32, device, gen_counts, seed=5, padding="repeat")
    assert torch.equal(a[4], b[4]) and not torch.equal(a[3], b[3])
    for i in range(3):
        assert torch.equal(a[3][i, :gen_counts[i]], b[3][i, :gen_counts[i]])
    got_a = run_kernels(*a[:5], shape, a[5])
    got_b = run_kernels(*b[:5], shape, b[5])
    for ga, gb in zip(got_a, got_b):
        assert torch.equal(ga, gb)


@pytest.mark.parametrize("device", DEVICES)
def test_all_counts_zero(device):
    shape = SHAPES[0]
    x, w, b, out_idx, out_count, gy = make_case(shape, torch.float32, device, [0, 0, 0], seed=6)
    y, dx, dw, db = run_kernels(x, w, b, out_idx, out_count, shape, gy)
    for t in (y, dx, dw, db):
        assert torch.count_nonzero(t) == 0


@pytest.mark.parametrize("device", DEVICES)
def test_partial_needs_and_broadcast_grad(device):
    """Only the requested gradients come back (db alone takes the launcher's torch path); a stride-0 grad (from
    ``y.sum()``) is read through its strides."""
    shape = SHAPES[0]
    x, w, b, out_idx, out_count, gy = make_case(shape, torch.float32, device, [2, 7, 0], seed=7)
    gy = torch.ones((), device=device).expand(gy.shape)
    ref = per_sample_reference(x, w, b, out_idx, out_count, *(_pair(v) for v in shape[6:]), gy)
    _, red_x, red_w = reductions(shape, gy)
    for needs in ((True, False, False), (False, True, False), (False, False, True), (False, True, True)):
        got = run_kernels(x, w, b, out_idx, out_count, shape, gy, needs)[1:]
        for need, g, r, red in zip(needs, got, ref[1:], (red_x, red_w, red_w)):
            assert (g is None) == (not need)
            if need:
                assert_close(g.cpu(), r, torch.float32, reduction=red)


@pytest.mark.parametrize("device", DEVICES)
def test_launchers_check_the_index_sets(device):
    from tritonslide.kernels.sample_conv2d import sample_conv2d_forward

    shape = SHAPES[0]
    x, w, b, out_idx, out_count, _ = make_case(shape, torch.float32, device, [1, 2, 3])
    geometry = tuple(_pair(v) for v in shape[6:])
    with pytest.raises(TypeError, match="out_idx"):
        sample_conv2d_forward(x, w, b, out_idx[0], out_count, *geometry)  # one row for the batch: the old form
    with pytest.raises(TypeError, match="out_count"):
        sample_conv2d_forward(x, w, b, out_idx, out_count[0], *geometry)
    with pytest.raises(TypeError, match="out_idx"):
        sample_conv2d_forward(x, w, b, out_idx.int(), out_count, *geometry)


def test_registered_kernel_names():
    from tritonslide.kernels import TRITON_OPS, get_kernel
    from tritonslide.kernels.sample_conv2d import sample_conv2d_backward, sample_conv2d_forward

    assert {"sample_conv2d", "sample_conv2d_backward"} <= TRITON_OPS
    assert get_kernel("sample_conv2d") is sample_conv2d_forward
    assert get_kernel("sample_conv2d_backward") is sample_conv2d_backward


# ------------------------------------------------------------------------------------------- per-sample histogram

# (N, C, H, W, tables, bits, k, stride, padding): ROWS order (C < 16), tap-major tiles spanning images (H'W' < the
# interpreter's 64 rows: the per-position branch) or mostly inside one (H'W' = 72: both branches), per-position
# atomics (2**11 buckets > LOCAL_HIST_MAX_BUCKETS), ROWS with stride 2.
HIST_CASES = [
    (3, 3, 9, 8, 3, 5, 3, 1, 1),
    (3, 20, 5, 4, 3, 5, 3, 1, 1),
    (2, 20, 9, 8, 3, 5, 3, 1, 1),
    (2, 20, 9, 8, 2, 11, 3, 1, 1),
    (3, 5, 11, 10, 2, 4, 3, 2, 0),
]
HIST_IDS = ["rows-C3", "tapmajor-span", "tapmajor-one-image", "tapmajor-atomics-K11", "rows-s2"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", HIST_CASES, ids=HIST_IDS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_per_sample_histogram_equals_each_samples_own(device, case, layout):
    from tritonslide.kernels.hash_histogram import hash_histogram_forward

    n, c, h, w, tables, bits, k, s, p = case
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(n, c, h, w, generator=gen).to(device)
    planes = torch.randn(tables * bits, c, k, k, generator=gen).to(device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    geometry = ((s, s), (p, p), (1, 1))
    hist, codes = hash_histogram_forward(x, planes, bits, *geometry, return_codes=True, per_sample=True)
    assert hist.shape == (n, tables, 1 << bits) and hist.dtype == torch.int64
    ref = torch.stack([torch_hash_histogram(x[i:i + 1].cpu(), planes.cpu(), bits, *geometry) for i in range(n)])
    assert torch.equal(hist.cpu(), ref)
    # the batch histogram is the sum over samples, and the codes do not depend on the histogram's form
    batch, codes_b = hash_histogram_forward(x, planes, bits, *geometry, return_codes=True)
    assert torch.equal(hist.sum(0), batch) and torch.equal(codes, codes_b)


@pytest.mark.parametrize("device", DEVICES)
def test_per_sample_histogram_with_in_idx_and_empty_in_idx(device):
    from tritonslide.kernels.hash_histogram import hash_histogram_forward

    n, c, h, w, bits = 2, 6, 7, 9, 4
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(n, c, h, w, generator=gen).to(device)
    planes = torch.randn(2 * bits, c, 3, 3, generator=gen).to(device)
    geometry = ((1, 1), (1, 1), (1, 1))
    for in_idx in (torch.tensor([0, 2, 5], device=device), torch.empty(0, dtype=torch.int64, device=device)):
        hist = hash_histogram_forward(x, planes, bits, *geometry, in_idx=in_idx, per_sample=True)
        ref = torch.stack([torch_hash_histogram(x[i:i + 1].cpu(), planes.cpu(), bits, *geometry,
                                                in_idx=in_idx.cpu()) for i in range(n)])
        assert torch.equal(hist.cpu(), ref)


def test_prunes_read_keyword_arguments_as_triton_passes_them():
    """The per-sample launches run active_conv2d's kernels with PER_SAMPLE: their prunes read the launch's
    positional arguments (``nargs``) and keyword ones (PRECISION, PER_SAMPLE) as Triton's autotuner passes them and
    keep the per-sample subsets (IEEE fp32: only the tiles marked to fit FMA dots; dW: no split-K, program_id(1) is
    the sample); a sample of at most 64 positions gets no 128-row position tile."""
    from triton.runtime.jit import MockTensor

    from tritonslide.kernels import active_conv2d as k

    extents = {"N_ACT": 128, "C_ACT": 128, "R_ACT": 128, "HO": 28, "WO": 28, "H": 28, "W": 28, "K_RED": 784,
               "KH": 3, "KW": 3}

    def keys(cs):
        return {(tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages) for c in cs}

    for prune, configs, use, fma, ptr in ((k._prune_fwd, k._FWD_GPU, k._FWD_SAMPLE_GPU, k._FWD_SAMPLE_FMA, "x_ptr"),
                                          (k._prune_dx, k._DX_GPU, k._DX_SAMPLE_GPU, k._DX_SAMPLE_FMA, "g_ptr"),
                                          (k._prune_dw, k._DW_GPU, k._DW_SAMPLE_GPU, k._DW_SAMPLE_FMA, "g_ptr")):
        for dtype, prec in ((torch.float16, "ieee"), (torch.float32, "tf32"), (torch.float32, "ieee")):
            kept = prune(configs, {**extents, ptr: MockTensor(dtype)}, PRECISION=prec, PER_SAMPLE=True)
            assert kept, (prune.__name__, dtype, prec)
            assert keys(kept) <= keys(use), prune.__name__
            if prec == "ieee" and dtype == torch.float32:
                assert keys(kept) <= keys(fma)
            if prune is k._prune_dw:
                assert all(c.kwargs["SPLIT_K"] == 1 for c in kept)
    small = {**extents, "HO": 7, "WO": 7, "x_ptr": MockTensor(torch.float16)}
    kept = k._prune_fwd(k._FWD_GPU, small, PRECISION="ieee", PER_SAMPLE=True)
    assert kept and all(c.kwargs["BLOCK_M"] == 64 for c in kept)


# ---------------------------------------------------------------------- through the op layer
def _op_case(device, seed, in_width):
    """3 samples, 5 channels, 7 filters on 9x8 maps: x, W, b, (3, 5) output rows with counts (5, 0, 3) and (3,
    in_width) sorted input rows (the caller sets their counts), and the generator to go on with."""
    gen = torch.Generator().manual_seed(seed)
    n, c, o = 3, 5, 7
    x = torch.randn(n, c, 9, 8, generator=gen).to(device)
    w = torch.randn(o, c, 3, 3, generator=gen).to(device)
    b = torch.randn(o, generator=gen).to(device)
    out_rows = torch.stack([torch.randperm(o, generator=gen)[:5].sort().values for _ in range(n)]).to(device)
    out_count = torch.tensor([5, 0, 3], device=device)
    in_rows = torch.stack([torch.randperm(c, generator=gen)[:in_width].sort().values for _ in range(n)]).to(device)
    return x, w, b, out_rows, out_count, in_rows, gen


@pytest.mark.parametrize("device", DEVICES)
def test_op_layer_with_triton_equals_the_torch_backend(device):
    """ops.active_conv2d with per-sample out and in rows (shorter than O, with counts) and ops.hash_histogram with
    per_sample=True route to these kernels and agree with the PyTorch fallback, forward and every gradient."""
    from tritonslide import ops, use_backend

    c = 5
    x, w, b, out_rows, out_count, in_rows, _ = _op_case(device, 21, c)
    in_count = torch.tensor([2, 5, 4], device=device)
    in_rows[0, :2] = torch.tensor([1, 3])
    in_rows[2, :4] = torch.tensor([0, 1, 2, 4])
    results = {}
    for backend in ("torch", "triton"):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        with use_backend(backend):
            y = ops.active_conv2d(*leaves, out_rows, in_rows, 1, 1, out_count=out_count, in_count=in_count)
            y.backward(torch.linspace(-1, 1, y.numel(), device=device).view_as(y))
            planes = torch.randn(10, c, 3, 3, generator=torch.Generator().manual_seed(2)).to(device)
            hist = ops.hash_histogram(x, planes, 5, 1, 1, in_idx=in_rows, in_count=in_count, per_sample=True)
        results[backend] = (y.detach(), *(t.grad for t in leaves), hist)
    for got, exp in zip(results["triton"][:4], results["torch"][:4]):
        assert_close(got, exp, torch.float32, reduction=c * 9 * 4)
    assert torch.equal(results["triton"][4], results["torch"][4])


@pytest.mark.parametrize("device", DEVICES)
def test_op_layer_compact_forms_with_triton_equal_the_torch_backend(device):
    """The per-sample compact input and output (expanded to full size around the kernels) agree with the PyTorch
    fallback, forward and every gradient; the NaN past each row's count is never read."""
    from tritonslide import ops, use_backend
    from tritonslide._library import compact_rows

    n, c = 3, 5
    x, w, b, out_rows, out_count, in_rows, _ = _op_case(device, 23, 4)
    in_count = torch.tensor([2, 4, 3], device=device)
    xc = compact_rows(x, in_rows, in_count)
    past = torch.arange(4, device=device)[None, :] >= in_count[:, None]
    xc[past] = float("nan")
    grad = torch.linspace(-1, 1, n * 5 * 81, device=device).view(n, 5, 9, 9)[..., :8]
    grad = torch.where((torch.arange(5, device=device)[None, :] >= out_count[:, None])[:, :, None, None],
                       float("nan"), grad)
    results = {}
    for backend in ("torch", "triton"):
        leaves = [t.clone().requires_grad_() for t in (xc, w, b)]
        with use_backend(backend):
            y = ops.active_conv2d(*leaves, out_rows, in_rows, 1, 1, out_count=out_count, in_count=in_count,
                                  compact_input=True, compact_output=True)
            y.backward(grad)
        results[backend] = (y.detach(), *(t.grad for t in leaves))
    assert results["torch"][0].shape == (n, 5, 9, 8)
    for got, exp in zip(results["triton"], results["torch"]):
        assert torch.isfinite(got).all()
        assert_close(got, exp, torch.float32, reduction=c * 9 * 4)


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_mode_sums_per_sample_dw_in_one_per_batch_launch(device, monkeypatch):
    """Per-sample dW adds the samples' tiles with fp32 atomics in no fixed order; under
    torch.use_deterministic_algorithms(True) it is one per-batch dW launch (no PER_SAMPLE, SPLIT_K=1) over every
    filter of dy masked per sample. Same values as the PyTorch backend, dx unchanged."""
    from tritonslide import ops, use_backend
    from tritonslide.kernels import active_conv2d as k

    launches = []
    real_run = k._active_conv2d_bwd_dw_kernel.run

    def spy(*args, **kwargs):
        launches.append((kwargs.get("PER_SAMPLE", False), kwargs.get("DETERMINISTIC", False)))
        return real_run(*args, **kwargs)

    monkeypatch.setattr(k._active_conv2d_bwd_dw_kernel, "run", spy)
    gen = torch.Generator().manual_seed(29)
    n, c, o = 3, 6, 7
    x = torch.randn(n, c, 8, 9, generator=gen).to(device)
    w = torch.randn(o, c, 3, 3, generator=gen).to(device)
    b = torch.randn(o, generator=gen).to(device)
    out_rows = torch.stack([torch.randperm(o, generator=gen).sort().values for _ in range(n)]).to(device)
    out_count = torch.tensor([4, 0, 7], device=device)
    out_rows[0, :4] = torch.tensor([0, 2, 3, 6])
    in_rows = torch.stack([torch.randperm(c, generator=gen).sort().values for _ in range(n)]).to(device)
    in_count = torch.tensor([3, 6, 2], device=device)
    in_rows[0, :3] = torch.tensor([1, 4, 5])
    in_rows[2, :2] = torch.tensor([0, 3])
    grad = torch.randn(n, o, 8, 9, generator=gen).to(device)
    results = {}
    for mode in ("torch", "triton", "deterministic"):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        launches.clear()
        with use_backend("torch" if mode == "torch" else "triton"), \
                (deterministic_algorithms() if mode == "deterministic" else contextlib.nullcontext()):
            y = ops.active_conv2d(*leaves, out_rows, in_rows, 1, 1, out_count=out_count, in_count=in_count)
            y.backward(grad)
        results[mode] = [t.grad for t in leaves]
        if mode == "triton":
            assert launches == [(True, False)]
        if mode == "deterministic":
            assert launches == [(False, True)]
            assert k._active_conv2d_bwd_dw_kernel.best_config.kwargs["SPLIT_K"] == 1
    for mode in ("triton", "deterministic"):
        for got, exp in zip(results[mode], results["torch"]):
            assert_close(got, exp, torch.float32, reduction=n * 72)
