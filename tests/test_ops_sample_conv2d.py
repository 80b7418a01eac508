"""Per-sample active sets (issue #15) in the op layer and the PyTorch fallback, against plain references.

``ops.active_conv2d`` with (N, k) index rows, ``ops.hash_histogram(per_sample=True)`` and ``ops.alsh_active_set`` on
(N, L, 2**K) histograms. The references are deliberately plain: a Python loop over samples running ``F.conv2d`` of
each sample with its 0/1 masks (float64; gradients by ``torch.autograd.grad``), per-sample calls of the batch ops.
"""

import pytest
import torch
import torch.nn.functional as F

from tests.tolerances import assert_close
from tritonslide import ops, use_backend
from tritonslide.cpu_fallback import sample_conv2d as sc
from tritonslide.cpu_fallback import torch_sample_conv2d, torch_sample_conv2d_backward

# (N, C, H, W, O, kh, kw, stride, padding, dilation): not powers of two; 1x1, 3x3, 5x5 s2, 11x11 s4, asymmetric
SHAPES = [
    (3, 5, 9, 8, 7, 3, 3, (1, 1), (1, 1), (1, 1)),
    (2, 3, 15, 13, 5, 11, 11, (4, 4), (2, 2), (1, 1)),
    (3, 6, 11, 10, 9, 5, 5, (2, 2), (2, 2), (1, 1)),
    (2, 4, 9, 10, 6, 3, 2, (2, 3), (1, 0), (2, 1)),
    (4, 7, 7, 6, 9, 1, 1, (1, 1), (0, 0), (1, 1)),
    # sets of 16+ filters / channels: the group loop's oneDNN blocks are padded to rounded sizes there
    (3, 37, 5, 6, 45, 3, 3, (1, 1), (1, 1), (1, 1)),
]
SHAPE_IDS = ["3x3", "11x11s4", "5x5s2", "3x2-s23-d21", "1x1", "3x3-wide"]


@pytest.fixture(params=["groups", "groups-onednn", "masked"])
def path(request, monkeypatch):
    """Every computation of the fallback (the group loop, with ``F.conv2d`` or with padded oneDNN blocks for every
    float32 group however small, and one masked convolution), whichever the rules would choose for these shapes."""
    monkeypatch.setenv("TRITONSLIDE_CPU_SAMPLE_CONV", request.param.split("-")[0])
    if request.param == "groups-onednn":
        if not torch.backends.mkldnn.is_available():
            pytest.skip("this torch build has no oneDNN")
        monkeypatch.setattr(sc, "_ONEDNN_MIN_MACS", 0)
    return request.param


def loop_reference(x, w, b, out_rows, out_count, in_rows, in_count, stride, padding, dilation, grad_y):
    """(y, dx, dW, db): sample by sample, ``F.conv2d(x[n] * m_in[n], W, b) * m_out[n]``, in float64."""
    x, w = x.double().requires_grad_(), w.double().requires_grad_()
    b = None if b is None else b.double().requires_grad_()
    ys = []
    for n in range(x.shape[0]):
        m_out = torch.zeros(w.shape[0], dtype=torch.float64)
        m_out[out_rows[n, : int(out_count[n])]] = 1
        m_in = torch.ones(w.shape[1], dtype=torch.float64)
        if in_rows is not None:
            m_in = torch.zeros(w.shape[1], dtype=torch.float64)
            m_in[in_rows[n, : int(in_count[n])]] = 1
        y = F.conv2d(x[n:n + 1] * m_in.view(1, -1, 1, 1), w, b, stride, padding, dilation)
        ys.append(y * m_out.view(1, -1, 1, 1))
    y = torch.cat(ys)
    leaves = (x, w) + (() if b is None else (b,))
    grads = torch.autograd.grad(y, leaves, grad_y.double())
    return (y.detach(), *grads) + ((None,) if b is None else ())


def random_rows(n, size, gen, counts=None, repeat_padding=False):
    """(N, size) rows whose first count[n] entries are a sorted random set; padding: the other indices, or (with
    ``repeat_padding``) copies of the first index, which the ops must ignore."""
    if counts is None:
        counts = torch.randint(0, size + 1, (n,), generator=gen)
    rows = []
    for c in counts.tolist():
        perm = torch.randperm(size, generator=gen)
        active = perm[:c].sort().values
        pad = perm[c:] if not repeat_padding else torch.full((size - c,), int(perm[0]), dtype=torch.int64)
        rows.append(torch.cat([active, pad]))
    return torch.stack(rows), counts


def make(shape, dtype, seed, channels_last=False, with_in=True, repeat_padding=False):
    n, c, h, w_, o, kh, kw, stride, padding, dilation = shape
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w_, generator=gen).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(o, c, kh, kw, generator=gen).to(dtype)
    b = torch.randn(o, generator=gen).to(dtype)
    counts = torch.randint(0, o + 1, (n,), generator=gen)
    counts[0] = o  # one sample with every filter, one with none
    counts[-1] = 0
    out_rows, out_count = random_rows(n, o, gen, counts, repeat_padding)
    in_rows = in_count = None
    if with_in:
        in_rows, in_count = random_rows(n, c, gen, repeat_padding=repeat_padding)
    return x, w, b, out_rows, out_count, in_rows, in_count


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("with_in", [False, True], ids=["out", "out+in"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_forward_and_every_gradient(shape, with_in, channels_last, dtype, path):
    x, w, b, out_rows, out_count, in_rows, in_count = make(shape, dtype, 0, channels_last, with_in)
    stride, padding, dilation = shape[7:]
    xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
    with use_backend("torch"):
        y = ops.active_conv2d(xg, wg, bg, out_rows, in_rows, stride, padding, dilation, out_count=out_count,
                              in_count=in_count)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    dx, dw, db = torch.autograd.grad(y, (xg, wg, bg), grad_y)
    ref = loop_reference(x, w, b, out_rows, out_count, in_rows, in_count, stride, padding, dilation, grad_y)
    reduction = shape[1] * shape[5] * shape[6]
    assert_close(y, ref[0], dtype, reduction, "y")
    assert_close(dx, ref[1], dtype, shape[4] * shape[5] * shape[6], "dx")
    assert_close(dw, ref[2], dtype, x.shape[0] * y.shape[2] * y.shape[3], "dW")
    assert_close(db, ref[3], dtype, x.shape[0] * y.shape[2] * y.shape[3], "db")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt) and dx.is_contiguous(memory_format=fmt)


def fresh_buffers_hold_nan(monkeypatch):
    """From here on ``torch.empty`` returns floating-point tensors full of NaN: uninitialized memory may hold
    anything, so an op must write every element it returns."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)


def to_compact(t, rows, count):
    """The per-sample compact form, by a loop: channel j of sample n is t[n, rows[n, j]] for j < count[n], else 0."""
    out = torch.zeros(t.shape[0], rows.shape[1], *t.shape[2:], dtype=t.dtype)
    for n in range(t.shape[0]):
        k = int(count[n])
        out[n, :k] = t[n, rows[n, :k]]
    return out


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("compact", ["in", "out", "in+out"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_compact_forms_forward_and_every_gradient(shape, compact, channels_last, monkeypatch, path):
    """Per-sample compact input / output (the linked hand-off between per-sample layers) against the loop
    reference in the same form; what lies past a row's count (NaN here, in x and in dy) is never read, and what
    the op returns there is zero although its fresh buffers start as NaN (each group zeroes its own rows' tails).
    The Triton backend: tests/test_triton_sample_conv2d.py."""
    x, w, b, out_rows, out_count, in_rows, in_count = make(shape, torch.float32, 21, channels_last)
    stride, padding, dilation = shape[7:]
    c_in, c_out = compact.startswith("in"), compact.endswith("out")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    xc = to_compact(x, in_rows, in_count) if c_in else x.clone()
    if c_in:
        for n in range(x.shape[0]):
            xc[n, int(in_count[n]):] = float("nan")
    xg = xc.contiguous(memory_format=fmt).requires_grad_()
    wg, bg = w.clone().requires_grad_(), b.clone().requires_grad_()
    fresh_buffers_hold_nan(monkeypatch)
    with use_backend("torch"):
        y = ops.active_conv2d(xg, wg, bg, out_rows, in_rows, stride, padding, dilation, out_count=out_count,
                              in_count=in_count, compact_input=c_in, compact_output=c_out)
        grad_full = torch.randn(x.shape[0], w.shape[0], *y.shape[2:], generator=torch.Generator().manual_seed(1))
        grad_y = grad_full
        if c_out:
            grad_y = to_compact(grad_full, out_rows, out_count)
            for n in range(x.shape[0]):
                grad_y[n, int(out_count[n]):] = float("nan")
        dx, dw, db = torch.autograd.grad(y, (xg, wg, bg), grad_y)
    ref = loop_reference(x, w, b, out_rows, out_count, in_rows, in_count, stride, padding, dilation, grad_full)
    ref_y = to_compact(ref[0], out_rows, out_count) if c_out else ref[0]
    ref_dx = to_compact(ref[1], in_rows, in_count) if c_in else ref[1]
    assert y.shape == ref_y.shape and dx.shape == xc.shape
    positions = x.shape[0] * y.shape[2] * y.shape[3]
    assert_close(y, ref_y, torch.float32, shape[1] * shape[5] * shape[6], "y")
    assert_close(dx, ref_dx, torch.float32, shape[4] * shape[5] * shape[6], "dx")
    assert_close(dw, ref[2], torch.float32, positions, "dW")
    assert_close(db, ref[3], torch.float32, positions, "db")
    assert y.is_contiguous(memory_format=fmt) and dx.is_contiguous(memory_format=fmt)


def test_bfloat16_forward_and_gradients(path):
    shape = SHAPES[0]
    x, w, b, out_rows, out_count, in_rows, in_count = make(shape, torch.bfloat16, 3)
    xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
    with use_backend("torch"):
        y = ops.active_conv2d(xg, wg, bg, out_rows, in_rows, 1, 1, out_count=out_count, in_count=in_count)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    grads = torch.autograd.grad(y, (xg, wg, bg), grad_y)
    ref = loop_reference(x, w, b, out_rows, out_count, in_rows, in_count, (1, 1), (1, 1), (1, 1), grad_y)
    for got, exp, red in zip((y, *grads), ref, (45, 63, 216, 216)):
        assert_close(got, exp, torch.bfloat16, red)


def test_padding_entries_are_ignored_even_when_they_repeat_an_active_index(path):
    shape = SHAPES[0]
    x, w, b, out_rows, out_count, in_rows, in_count = make(shape, torch.float64, 5, repeat_padding=True)
    xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
    y = ops.active_conv2d(xg, wg, bg, out_rows, in_rows, 1, 1, out_count=out_count, in_count=in_count)
    grad_y = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(y, (xg, wg, bg), grad_y)
    ref = loop_reference(x, w, b, out_rows, out_count, in_rows, in_count, (1, 1), (1, 1), (1, 1), grad_y)
    for got, exp in zip((y, *grads), ref):
        torch.testing.assert_close(got, exp)


def test_no_bias_whole_rows_and_a_batch_set_next_to_rows(path):
    shape = SHAPES[2]
    x, w, _, out_rows, out_count, _, _ = make(shape, torch.float64, 7, with_in=False)
    stride, padding, dilation = shape[7:]
    # rows without counts: every entry is in the set (here: each sample's first 4 filters of a permutation, sorted)
    rows = out_rows[:, :4].sort(1).values
    y = ops.active_conv2d(x, w, None, rows, None, stride, padding, dilation)
    full = torch.full((x.shape[0],), 4)
    ref = loop_reference(x, w, None, rows, full, None, None, stride, padding, dilation, torch.ones_like(y))
    torch.testing.assert_close(y, ref[0])
    # a 1-d input set next to per-sample output rows applies to every sample
    in_idx = torch.tensor([0, 2, 5])
    y = ops.active_conv2d(x, w, None, out_rows, in_idx, stride, padding, dilation, out_count=out_count)
    in_rows = in_idx.expand(x.shape[0], -1)
    ref = loop_reference(x, w, None, out_rows, out_count, in_rows, torch.full((x.shape[0],), 3), stride, padding,
                         dilation, torch.ones_like(y))
    torch.testing.assert_close(y, ref[0])


def test_weight_gradient_touches_only_rows_some_sample_uses(path):
    shape = SHAPES[0]
    x, w, b, out_rows, out_count, _, _ = make(shape, torch.float64, 11, with_in=False)
    out_count = torch.tensor([2, 3, 1])
    used = set()
    for n in range(x.shape[0]):
        used |= set(out_rows[n, : out_count[n]].tolist())
    wg, bg = w.clone().requires_grad_(), b.clone().requires_grad_()
    y = ops.active_conv2d(x, wg, bg, out_rows, None, 1, 1, out_count=out_count)
    y.square().sum().backward()
    unused = [o for o in range(w.shape[0]) if o not in used]
    assert unused, "the case must leave some filter unused"
    assert torch.count_nonzero(wg.grad[unused]) == 0 and torch.count_nonzero(bg.grad[unused]) == 0
    assert all(torch.count_nonzero(wg.grad[o]) > 0 for o in used)


@pytest.mark.parametrize("seed", range(3))
def test_output_of_a_sample_does_not_depend_on_its_batch(seed, path):
    shape = SHAPES[0]
    x, w, b, out_rows, out_count, in_rows, in_count = make(shape, torch.float32, seed)
    y = ops.active_conv2d(x, w, b, out_rows, in_rows, 1, 1, out_count=out_count, in_count=in_count)
    perm = torch.tensor([2, 0, 1])
    ys = ops.active_conv2d(x[perm], w, b, out_rows[perm], in_rows[perm], 1, 1, out_count=out_count[perm],
                           in_count=in_count[perm])
    torch.testing.assert_close(ys, y[perm], rtol=1e-5, atol=1e-5)
    for n in range(3):
        yn = ops.active_conv2d(x[n:n + 1], w, b, out_rows[n:n + 1], in_rows[n:n + 1], 1, 1,
                               out_count=out_count[n:n + 1], in_count=in_count[n:n + 1])
        torch.testing.assert_close(yn, y[n:n + 1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype, onednn", [(torch.float64, False), (torch.float32, True)],
                         ids=["float64", "float32-onednn"])
def test_samples_that_share_a_set_are_grouped_without_changing_results(monkeypatch, dtype, onednn):
    """The fallback runs one convolution per group of samples with equal sets; a batch whose samples share sets
    (here 2 distinct sets for 5 samples) equals each sample run alone (float32: groups of several samples in one
    padded oneDNN block)."""
    monkeypatch.setenv("TRITONSLIDE_CPU_SAMPLE_CONV", "groups")
    if onednn:
        monkeypatch.setattr(sc, "_ONEDNN_MIN_MACS", 0)
    shape = (5, 19, 11, 10, 21, 5, 5, (2, 2), (2, 2), (1, 1))
    x, w, b, out_rows, out_count, in_rows, in_count = make(shape, dtype, 13)
    pick = torch.tensor([0, 1, 0, 1, 1])
    out_rows, out_count, in_rows, in_count = out_rows[pick], out_count[pick], in_rows[pick], in_count[pick]
    y = torch_sample_conv2d(x, w, b, out_rows, out_count, in_rows, in_count, *shape[7:])
    tol = {} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    for n in range(5):
        alone = torch_sample_conv2d(x[n:n + 1], w, b, out_rows[n:n + 1], out_count[n:n + 1], in_rows[n:n + 1],
                                    in_count[n:n + 1], *shape[7:])
        torch.testing.assert_close(y[n:n + 1], alone, **tol)


def test_compiles_into_one_graph():
    shape = SHAPES[0]
    x, w, b, out_rows, out_count, in_rows, in_count = make(shape, torch.float32, 17)

    def f(x):
        return ops.active_conv2d(x, w, b, out_rows, in_rows, 1, 1, out_count=out_count, in_count=in_count)

    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), f(x))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"out_idx": torch.zeros(2, 3, dtype=torch.int64)}, ValueError, r"per-sample out_idx must have shape \(N=3"),
        ({"out_idx": torch.zeros(3, 8, dtype=torch.int64)}, ValueError, r"k <= 7"),
        ({"out_idx": torch.zeros(3, 2, dtype=torch.int32)}, TypeError, r"\(N, k\) int64"),
        ({"out_idx": torch.zeros(3, 2, dtype=torch.int64), "out_count": torch.tensor(1)}, TypeError,
         r"out_count must be an \(N=3,\) int64"),
        ({"in_idx": torch.zeros(3, 2, dtype=torch.int64), "compact_input": True}, ValueError,
         r"in_idx.shape\[1\]=2 \(the rows\) but x has 5"),
        ({"in_idx": torch.zeros(3, 2, dtype=torch.int64), "in_count": torch.tensor([1, 2])}, TypeError,
         r"in_count must be an \(N=3,\)"),
        ({"out_idx": torch.tensor([[0, 1], [1, 0], [0, 1]])}, ValueError, "sorted and unique"),
        ({"out_idx": torch.tensor([[0, 9], [0, 1], [0, 1]])}, ValueError, r"out_idx must lie in \[0, 7\)"),
        ({"out_idx": torch.zeros(3, 2, dtype=torch.int64), "out_count": torch.tensor([1, 3, 0])}, ValueError,
         r"out_count must lie in \[0, 2\]"),
    ],
)
def test_bad_per_sample_sets_name_the_op_and_what_was_expected(kwargs, error, match):
    x, w = torch.randn(3, 5, 6, 6), torch.randn(7, 5, 3, 3)
    with pytest.raises(error, match=match):
        ops.active_conv2d(x, w, None, stride=1, padding=1, **kwargs)


# ---------------------------------------------------------------------- hashing and selection per sample
@pytest.mark.parametrize("seed", range(3))
def test_per_sample_histograms_are_each_samples_own_histogram(seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 6, 11, 9, generator=gen)
    planes = torch.randn(3 * 4, 6, 3, 3, generator=gen)
    hist = ops.hash_histogram(x, planes, 4, 2, 1, per_sample=True)
    assert hist.shape == (4, 3, 16) and hist.dtype == torch.int64
    for n in range(4):
        torch.testing.assert_close(hist[n], ops.hash_histogram(x[n:n + 1], planes, 4, 2, 1))
    torch.testing.assert_close(hist.sum(0), ops.hash_histogram(x, planes, 4, 2, 1))


def test_per_sample_histogram_reads_each_samples_own_channels():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 6, 8, 8, generator=gen)
    planes = torch.randn(10, 6, 3, 3, generator=gen)
    rows, counts = random_rows(3, 6, gen, torch.tensor([2, 6, 0]))
    hist = ops.hash_histogram(x, planes, 5, 1, 1, in_idx=rows, in_count=counts, per_sample=True)
    for n in range(3):
        idx = rows[n, : counts[n]]
        torch.testing.assert_close(hist[n], ops.hash_histogram(x[n:n + 1], planes, 5, 1, 1, in_idx=idx))


def test_per_sample_selection_is_each_samples_batch_selection():
    gen = torch.Generator().manual_seed(9)
    hist = torch.randint(0, 5, (6, 3, 32), generator=gen)
    codes = torch.randint(0, 32, (41, 3), generator=gen)
    idx, count = ops.alsh_active_set(hist, codes, 5, 30)
    assert idx.shape == (6, 41) and count.shape == (6,)
    for n in range(6):
        i, c = ops.alsh_active_set(hist[n], codes, 5, 30)
        assert int(count[n]) == int(c) and torch.equal(idx[n], i)


def test_per_sample_sets_follow_each_samples_content():
    """Statistical check with fixed seeds: samples of two kinds (two base images plus a little noise each) get
    sets that agree within a kind and differ across kinds, and the batch's set of a mixed batch is not a kind's."""
    jac_within, jac_across, batch_gap = [], [], []
    for seed in range(5):
        gen = torch.Generator().manual_seed(seed)
        planes = torch.randn(3 * 5, 4, 3, 3, generator=gen)
        codes = torch.randint(0, 32, (60, 3), generator=gen)
        base = torch.randn(2, 4, 12, 12, generator=gen)
        x = base.repeat_interleave(4, 0) + 0.05 * torch.randn(8, 4, 12, 12, generator=gen)
        hist = ops.hash_histogram(x, planes, 5, 1, 1, per_sample=True)
        idx, count = ops.alsh_active_set(hist, codes, 2)
        sets = [set(idx[n, : count[n]].tolist()) for n in range(8)]

        def jaccard(a, b):
            return len(a & b) / max(len(a | b), 1)

        jac_within += [jaccard(sets[i], sets[j]) for k in (0, 4) for i in range(k, k + 4) for j in range(i + 1, k + 4)]
        jac_across += [jaccard(sets[i], sets[j]) for i in range(4) for j in range(4, 8)]
        b_idx, b_count = ops.alsh_active_set(hist.sum(0), codes, 2)
        batch = set(b_idx[:b_count].tolist())
        batch_gap.append(1 - max(jaccard(batch, sets[0]), jaccard(batch, sets[4])))
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    # measured with these seeds: 0.70 within, 0.15 across, 0.29 between the batch set and the closer kind
    assert mean(jac_within) > 0.5 > 0.3 > mean(jac_across)
    assert mean(batch_gap) > 0.15


def test_compact_rows_of_a_sample_that_reads_nothing_are_zero_without_bias(monkeypatch, path):
    """A sample with active filters but no read channel (and no bias) outputs zeros in its compact rows, and its
    compact dx is zero, although the op's fresh buffers start as NaN (uninitialized memory may hold anything)."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 4, 6, 5, generator=gen)
    w = torch.randn(5, 4, 3, 3, generator=gen)
    out_rows, out_count = random_rows(3, 5, gen, torch.tensor([5, 3, 2]))
    in_rows, in_count = random_rows(3, 4, gen, torch.tensor([4, 0, 2]))
    xc = to_compact(x, in_rows, in_count).requires_grad_()
    wg = w.clone().requires_grad_()
    fresh_buffers_hold_nan(monkeypatch)
    with use_backend("torch"):
        y = ops.active_conv2d(xc, wg, None, out_rows, in_rows, 1, 1, out_count=out_count, in_count=in_count,
                              compact_input=True, compact_output=True)
        grad_full = torch.randn(3, 5, 6, 5, generator=gen)
        dx, dw = torch.autograd.grad(y, (xc, wg), to_compact(grad_full, out_rows, out_count))
    ref = loop_reference(x, w, None, out_rows, out_count, in_rows, in_count, (1, 1), (1, 1), (1, 1), grad_full)
    assert torch.equal(y[1], torch.zeros_like(y[1])) and torch.equal(dx[1], torch.zeros_like(dx[1]))
    torch.testing.assert_close(y, to_compact(ref[0], out_rows, out_count).float())
    torch.testing.assert_close(dx, to_compact(ref[1], in_rows, in_count).float())
    torch.testing.assert_close(dw, ref[2].float())


def test_masked_and_group_forms_agree_across_batches(monkeypatch):
    """A sample computed inside a batch by one masked convolution equals the same sample computed alone by the group
    loop (the cost rule may choose differently for different batch sizes), forward and gradients."""
    shape = SHAPES[2]
    x, w, b, out_rows, out_count, in_rows, in_count = make(shape, torch.float32, 9)
    geom = shape[7:]
    grad_y = torch.randn(x.shape[0], w.shape[0], 6, 5, generator=torch.Generator().manual_seed(2))
    results = {}
    for mode in ("masked", "groups"):
        monkeypatch.setenv("TRITONSLIDE_CPU_SAMPLE_CONV", mode)
        y = torch_sample_conv2d(x, w, b, out_rows, out_count, in_rows, in_count, *geom)
        grads = torch_sample_conv2d_backward(grad_y, x, w, True, out_rows, out_count, in_rows, in_count, *geom,
                                             (True, True, True))
        alone = torch_sample_conv2d(x[1:2], w, b, out_rows[1:2], out_count[1:2], in_rows[1:2], in_count[1:2], *geom)
        results[mode] = (y, *grads, alone)
    for a, b_ in zip(results["masked"], results["groups"]):
        torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results["masked"][0][1:2], results["groups"][-1], rtol=1e-5, atol=1e-5)


def test_cost_rule_takes_the_masked_form_for_small_layers_and_the_loop_for_large(monkeypatch):
    """The rule's choices at the shapes and set fractions it was fitted to (batch 64, every set distinct):
    ResNet-56's 3x3 layers, the digits CNNs' linked 7x7 / 14x14 layers, ResNet-18's 512@7 and a 192@10 layer take
    one masked convolution; AlexNet's linked 13x13 layers, ResNet-18's 64@56 / 128@28, VGG's linked 512@14 and its
    3-channel first layer at 224 px (a 0.8 GB full-width output) the loop; and the forced forms and a bad value of
    the variable."""
    monkeypatch.delenv("TRITONSLIDE_CPU_SAMPLE_CONV", raising=False)
    gen = torch.Generator().manual_seed(0)

    def masks(n, size, frac):
        return torch.rand(n, size, generator=gen) < frac

    # (O, C, kh kw, input H W, output H' W', linked, set fraction)
    small = [(16, 16, 9, 32 * 32, 32 * 32, False, 0.4), (64, 64, 9, 8 * 8, 8 * 8, False, 0.4),
             (64, 64, 9, 14 * 14, 14 * 14, True, 0.5), (128, 128, 9, 7 * 7, 7 * 7, True, 0.35),
             (512, 512, 9, 7 * 7, 7 * 7, False, 0.4), (192, 192, 9, 10 * 10, 10 * 10, False, 0.4)]
    large = [(256, 384, 9, 13 * 13, 13 * 13, True, 0.4), (256, 256, 9, 13 * 13, 13 * 13, True, 0.4),
             (64, 64, 9, 56 * 56, 56 * 56, False, 0.4), (128, 128, 9, 28 * 28, 28 * 28, False, 0.4),
             (512, 512, 9, 14 * 14, 14 * 14, True, 0.4), (64, 3, 9, 224 * 224, 224 * 224, False, 0.6)]
    for (o, c, k, hw_in, hw_out, linked, frac), masked in [(s, True) for s in small] + [(s, False) for s in large]:
        in_mask = masks(64, c, frac) if linked else None
        assert sc._masked_pays(masks(64, o, frac), in_mask, c, 64, k, hw_in, hw_out) is masked, (o, c, hw_in)
    # few groups (samples sharing their sets) keep even a small layer in the loop
    assert not sc._masked_pays(masks(64, 64, 0.4), None, 64, 1, 9, 64, 64)
    monkeypatch.setenv("TRITONSLIDE_CPU_SAMPLE_CONV", "groups")
    assert not sc._masked_pays(masks(64, 16, 0.4), None, 16, 64, 9, 1024, 1024)
    monkeypatch.setenv("TRITONSLIDE_CPU_SAMPLE_CONV", "masked")
    assert sc._masked_pays(masks(64, 256, 0.4), masks(64, 384, 0.4), 384, 64, 9, 169, 169)
    monkeypatch.setenv("TRITONSLIDE_CPU_SAMPLE_CONV", "fast")
    with pytest.raises(ValueError, match="TRITONSLIDE_CPU_SAMPLE_CONV must be one of"):
        sc._masked_pays(masks(64, 16, 0.4), None, 16, 64, 9, 1, 1)


def test_masked_form_runs_one_convolution(monkeypatch):
    """Forced masked: the forward is a single ``F.conv2d`` call over the whole batch, not one per group."""
    monkeypatch.setenv("TRITONSLIDE_CPU_SAMPLE_CONV", "masked")
    shape = SHAPES[0]
    x, w, b, out_rows, out_count, in_rows, in_count = make(shape, torch.float32, 3)
    calls = []
    real = F.conv2d
    monkeypatch.setattr(sc.F, "conv2d", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    torch_sample_conv2d(x, w, b, out_rows, out_count, in_rows, in_count)
    assert calls == [x.shape]


@pytest.mark.parametrize("compact", ["", "in", "out", "in+out"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_masked_form_convolves_only_the_batchs_union_of_filters_and_channels(monkeypatch, channels_last, compact):
    """Filters no sample of the batch computes and channels no sample reads are left out of the masked form's one
    convolution (its weight holds the union of the sets), forward and every gradient equal to the loop reference in
    each form, and dW / dx / db are zero outside the union."""
    monkeypatch.setenv("TRITONSLIDE_CPU_SAMPLE_CONV", "masked")
    n, c, h, w_, o = 4, 23, 7, 6, 29
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(n, c, h, w_, generator=gen)
    w = torch.randn(o, c, 3, 3, generator=gen)
    b = torch.randn(o, generator=gen)
    # filters 0-20 and channels 0-15 belong to no sample's set: unions of 8 filters and 7 channels
    out_rows, out_count = random_rows(n, 8, gen, torch.tensor([8, 3, 5, 0]))
    in_rows, in_count = random_rows(n, 7, gen, torch.tensor([2, 7, 0, 4]))
    out_rows, in_rows = out_rows + 21, in_rows + 16
    out_count, in_count = out_count.clone(), in_count.clone()
    c_in, c_out = compact.startswith("in"), compact.endswith("out")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    xc = to_compact(x, in_rows, in_count) if c_in else x.clone()
    xg = xc.contiguous(memory_format=fmt).requires_grad_()
    wg, bg = w.clone().requires_grad_(), b.clone().requires_grad_()
    shapes = []
    real = F.conv2d
    monkeypatch.setattr(sc.F, "conv2d", lambda *a, **k: shapes.append((a[0].shape[1], a[1].shape[0])) or real(*a, **k))
    with use_backend("torch"):
        y = ops.active_conv2d(xg, wg, bg, out_rows, in_rows, (1, 1), (1, 1), (1, 1), out_count=out_count,
                              in_count=in_count, compact_input=c_in, compact_output=c_out)
        grad_full = torch.randn(n, o, h, w_, generator=torch.Generator().manual_seed(1))
        grad_y = to_compact(grad_full, out_rows, out_count) if c_out else grad_full
        dx, dw, db = torch.autograd.grad(y, (xg, wg, bg), grad_y)
    assert shapes == [(7, 8)]  # (channels read, filters computed) of the one convolution
    ref = loop_reference(x, w, b, out_rows, out_count, in_rows, in_count, (1, 1), (1, 1), (1, 1), grad_full)
    assert_close(y, to_compact(ref[0], out_rows, out_count) if c_out else ref[0], torch.float32, c * 9, "y")
    assert_close(dx, to_compact(ref[1], in_rows, in_count) if c_in else ref[1], torch.float32, o * 9, "dx")
    assert_close(dw, ref[2], torch.float32, n * h * w_, "dW")
    assert_close(db, ref[3], torch.float32, n * h * w_, "db")
    assert not dw[:21].any() and not dw[:, :16].any() and not db[:21].any()
    if not c_in:
        assert not dx[:, :16].any()
    assert y.is_contiguous(memory_format=fmt) and dx.is_contiguous(memory_format=fmt)


def test_union_is_rounded_up_with_unused_filters_and_dropped_when_too_large():
    """``_union``: the batch's union padded with the lowest unused indices to ``_rounded`` size, and every index (None)
    once the rounded union passes ``_UNION_FRACTION`` of the layer, leaves out fewer than ``_UNION_MIN_SAVED``
    indices, or is empty."""
    mask = torch.zeros(3, 40, dtype=torch.bool)
    mask[0, [3, 7, 30]] = True
    mask[1, [7, 12, 20, 33, 34, 35, 39]] = True  # a union of 9 filters, rounded to 16
    sel, pos = sc._union(mask)
    used = [3, 7, 12, 20, 30, 33, 34, 35, 39]
    assert sel.tolist() == sorted(used + [0, 1, 2, 4, 5, 6, 8])
    assert all(int(pos[i]) == sel.tolist().index(i) for i in sel.tolist())
    assert sc._union_size(mask) == 16
    mask[2, :31] = True  # 31 of 40, rounded to 32 > 0.75 * 40
    assert sc._union(mask) == (None, None) and sc._union_size(mask) == 40
    assert sc._union(torch.zeros(3, 40, dtype=torch.bool)) == (None, None)
    small = torch.zeros(2, 32, dtype=torch.bool)
    small[0, :17] = True  # 17 of 32, rounded to 24: leaves out less than a block of 16 filters
    assert sc._union(small) == (None, None)
    small[0, 16] = False  # 16 of 32 leaves out one block
    assert sc._union(small)[0].tolist() == list(range(16))


def test_rounded_sizes_are_multiples_of_16_or_8_and_exact_below_8():
    assert [sc._rounded(v) for v in (1, 7, 8, 9, 17, 39, 40, 41, 100, 129, 300)] == [
        1, 7, 8, 16, 24, 40, 48, 48, 112, 144, 304]
    for v in range(1, 2000):
        r = sc._rounded(v)
        assert v <= r < v + (16 if v >= 40 else 8)
    # a layer's blocks take few distinct shapes: 9 sizes for 72-200 channels
    assert len({sc._rounded(v) for v in range(72, 201)}) == 9


def test_group_convolutions_run_on_onednn_at_rounded_sizes(monkeypatch):
    """float32 groups call oneDNN on blocks padded to rounded sizes (zero filters, zero channels) and return the
    same result as the exact block through ``F.conv2d`` (oneDNN disabled); float64 never takes that path."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN")
    monkeypatch.setenv("TRITONSLIDE_CPU_SAMPLE_CONV", "groups")
    monkeypatch.setattr(sc, "_ONEDNN_MIN_MACS", 0)
    x, w, b, out_rows, out_count, in_rows, in_count = make(SHAPES[5], torch.float32, 5)
    shapes = []
    real = torch.mkldnn_convolution
    monkeypatch.setattr(torch, "mkldnn_convolution", lambda *a: shapes.append(tuple(a[1].shape[:2])) or real(*a))
    y = torch_sample_conv2d(x, w, b, out_rows, out_count, in_rows, in_count, (1, 1), (1, 1))
    expected = {(sc._rounded(int(o)), sc._rounded(int(c))) for o, c in zip(out_count, in_count) if o and c}
    assert set(shapes) == expected and any(o > 16 and o % 2 for o in out_count.tolist())
    # above the threshold only (the default): these small groups stay on F.conv2d
    monkeypatch.setattr(sc, "_ONEDNN_MIN_MACS", 6e6)
    shapes.clear()
    torch_sample_conv2d(x, w, b, out_rows, out_count, in_rows, in_count, (1, 1), (1, 1))
    assert shapes == []
    with torch.backends.mkldnn.flags(enabled=False):
        shapes.clear()
        exact = torch_sample_conv2d(x, w, b, out_rows, out_count, in_rows, in_count, (1, 1), (1, 1))
        assert shapes == []
    assert_close(y, exact, torch.float32, x.shape[1] * 9, "y")
    torch_sample_conv2d(x.double(), w.double(), b.double(), out_rows, out_count, in_rows, in_count, (1, 1), (1, 1))
    assert shapes == []


def test_padded_channels_are_zeros_not_copies_of_read_ones(monkeypatch):
    """An inf in a read channel meets only the real weights: the padded block's extra channels are zeros, so no
    inf * 0 = NaN appears where the exact convolution gives inf."""
    monkeypatch.setenv("TRITONSLIDE_CPU_SAMPLE_CONV", "groups")
    monkeypatch.setattr(sc, "_ONEDNN_MIN_MACS", 0)
    x, w, b, out_rows, out_count, in_rows, in_count = make(SHAPES[5], torch.float32, 6, with_in=False)
    x[:, 0, 2, 2] = float("inf")  # the first channel: what a padding by copies would repeat
    w = w.abs()  # every output that reads the inf is +inf, none NaN
    y = torch_sample_conv2d(x, w, None, out_rows, out_count, None, None, (1, 1), (1, 1))
    with torch.backends.mkldnn.flags(enabled=False):
        exact = torch_sample_conv2d(x, w, None, out_rows, out_count, None, None, (1, 1), (1, 1))
    assert torch.isinf(exact).any() and torch.equal(torch.isnan(y), torch.isnan(exact))
    assert torch.equal(torch.isinf(y), torch.isinf(exact))
