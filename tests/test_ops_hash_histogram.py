"""tritonslide.ops.hash_histogram against a plain loop over patches, and its statistics."""

import math

import pytest
import torch
import torch.nn.functional as F

from tritonslide import ops


def loop_reference(x, planes, bits, stride, padding, dilation, in_idx=None):
    """Deliberately plain: pad, walk every output position, dot every patch with every plane, pack, count."""
    x = x.double()
    planes = planes.double()
    if in_idx is not None:
        mask = torch.zeros(x.shape[1], dtype=torch.float64)
        mask[in_idx] = 1
        x = x * mask.view(1, -1, 1, 1)
    n, c, h, w = x.shape
    kh, kw = planes.shape[2:]
    xp = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    n_tables = planes.shape[0] // bits
    codes = torch.zeros(n, n_tables, ho, wo, dtype=torch.int64)
    hist = torch.zeros(n_tables, 2**bits, dtype=torch.int64)
    for b in range(n):
        for i in range(ho):
            for j in range(wo):
                r0, c0 = i * stride[0], j * stride[1]
                patch = xp[b, :, r0 : r0 + dilation[0] * (kh - 1) + 1 : dilation[0],
                           c0 : c0 + dilation[1] * (kw - 1) + 1 : dilation[1]]
                for t in range(n_tables):
                    code = 0
                    for k in range(bits):
                        if float((planes[t * bits + k] * patch).sum()) >= 0:
                            code += 1 << k
                    codes[b, t, i, j] = code
                    hist[t, code] += 1
    return hist, codes


CASES = [
    # (N, C, H, W, L, bits, kh, kw, stride, padding, dilation)
    (2, 3, 9, 7, 3, 5, 3, 3, (1, 1), (1, 1), (1, 1)),
    (1, 3, 23, 21, 2, 4, 11, 11, (4, 4), (2, 2), (1, 1)),
    (2, 5, 10, 11, 3, 3, 5, 5, (2, 2), (2, 2), (1, 1)),
    (3, 6, 6, 5, 4, 2, 1, 1, (1, 1), (0, 0), (1, 1)),
    (1, 4, 12, 9, 2, 6, 3, 2, (2, 1), (1, 0), (2, 1)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:8])))
@pytest.mark.parametrize("use_in_idx", [False, True])
def test_codes_and_histogram_match_loop(case, use_in_idx):
    n, c, h, w, n_tables, bits, kh, kw, stride, padding, dilation = case
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64)
    planes = torch.randn(n_tables * bits, c, kh, kw, generator=gen, dtype=torch.float64)
    in_idx = torch.arange(0, c, 2) if use_in_idx else None
    hist, codes = ops.hash_histogram(x, planes, bits, stride, padding, dilation, in_idx=in_idx, return_codes=True)
    ref_hist, ref_codes = loop_reference(x, planes, bits, stride, padding, dilation, in_idx)
    assert hist.dtype == torch.int64 and codes.dtype == torch.int64
    assert torch.equal(codes, ref_codes)
    assert torch.equal(hist, ref_hist)
    assert int(hist.sum()) == n_tables * codes[:, 0].numel()
    assert torch.equal(ops.hash_histogram(x, planes, bits, stride, padding, dilation, in_idx=in_idx), hist)


@pytest.mark.parametrize("chunk_bytes", [1, 5000], ids=["one-sample-chunks", "uneven-chunks"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["batch", "sample"])
def test_the_cpu_hash_in_chunks_of_samples_equals_the_loop(monkeypatch, chunk_bytes, per_sample):
    """The CPU hash runs large batches in chunks of samples (``hash_chunk``): histograms summed (per batch) or
    stacked (per sample) and codes stacked must equal the whole batch's, here against the loop; 5000 bytes give
    chunks of 2 on this 5-sample batch (2280 bytes per sample; the last chunk shorter)."""
    from tritonslide.cpu_fallback import hash_histogram as cpu_hash
    monkeypatch.setattr(cpu_hash, "CHUNK_BYTES", chunk_bytes)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(5, 4, 5, 6, generator=gen, dtype=torch.float64)
    planes = torch.randn(8, 4, 3, 3, generator=gen, dtype=torch.float64)
    in_idx = torch.tensor([0, 2, 3])
    assert cpu_hash.hash_chunk(x, 3, planes, (1, 1), (1, 1), (1, 1)) == (1 if chunk_bytes == 1 else 2)
    hist, codes = ops.hash_histogram(x, planes, 4, 1, 1, in_idx=in_idx, return_codes=True, per_sample=per_sample)
    ref_hist, ref_codes = loop_reference(x, planes, 4, (1, 1), (1, 1), (1, 1), in_idx)
    assert torch.equal(codes, ref_codes)
    if per_sample:
        ref_hist = torch.stack([loop_reference(x[i:i + 1], planes, 4, (1, 1), (1, 1), (1, 1), in_idx)[0]
                                for i in range(5)])
    assert torch.equal(hist, ref_hist)


def test_hash_chunks_keep_a_chunk_within_its_byte_budget():
    """VGG's first layer at batch 64 (3 channels at 224 px, 15 planes padded to 16): 3.8 MB of float32 input and
    projections per sample, so one sample per 6 MB chunk; AlexNet's conv4 input (384 channels at 13 px): 23 samples
    per chunk; a batch that fits: one chunk."""
    from tritonslide.cpu_fallback.hash_histogram import CHUNK_BYTES, hash_chunk
    planes3, planes384 = torch.empty(15, 3, 3, 3), torch.empty(15, 384, 3, 3)
    vgg = hash_chunk(torch.empty(64, 3, 224, 224), 3, planes3, (1, 1), (1, 1), (1, 1))
    assert vgg == CHUNK_BYTES // (4 * (3 + 16) * 224 * 224) == 1
    assert hash_chunk(torch.empty(64, 384, 13, 13), 384, planes384, (1, 1), (1, 1), (1, 1)) == 23
    assert hash_chunk(torch.empty(16, 384, 13, 13), 384, planes384, (1, 1), (1, 1), (1, 1)) == 16
    # the projections' size follows the stride (AlexNet's conv1: 11x11, stride 4, 55 px out)
    conv1 = hash_chunk(torch.empty(64, 3, 224, 224), 3, torch.empty(15, 3, 11, 11), (4, 4), (2, 2), (1, 1))
    assert conv1 == CHUNK_BYTES // (4 * (3 * 224 * 224 + 16 * 55 * 55))
    assert hash_chunk(torch.empty(0, 3, 8, 8), 3, planes3, (1, 1), (1, 1), (1, 1)) == 1


def test_in_idx_equals_zeroing_the_other_channels():
    x = torch.randn(2, 8, 9, 9)
    planes = torch.randn(10, 8, 3, 3)
    in_idx = torch.tensor([0, 3, 4, 7])
    zeroed = x.clone()
    zeroed[:, [1, 2, 5, 6]] = 0
    a = ops.hash_histogram(x, planes, 5, padding=1, in_idx=in_idx, return_codes=True)
    b = ops.hash_histogram(zeroed, planes, 5, padding=1, return_codes=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_inputs_hash_in_float32(dtype):
    """Rule: codes agree with the float64 loop except for projections within rounding of zero, which the
    test excludes by construction (it compares only patches whose smallest |projection| exceeds 1e-2)."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 8, 8, generator=gen).to(dtype)
    planes = torch.randn(6, 4, 3, 3, generator=gen).to(dtype)
    _, codes = ops.hash_histogram(x, planes, 3, padding=1, return_codes=True)
    _, ref = loop_reference(x, planes, 3, (1, 1), (1, 1), (1, 1))
    proj = F.conv2d(x.double(), planes.double(), padding=1).view(2, 2, 3, 8, 8).abs().amin(2)
    safe = proj > 1e-2
    assert safe.float().mean() > 0.9
    assert torch.equal(codes[safe], ref[safe])


def test_simhash_collision_probability():
    """Hyperplane LSH (Charikar 2002; thesis 3.2.5): a random plane separates u and v with probability
    angle(u, v) / pi. 4800 fixed-seed planes: the observed rate must lie within 4.5 binomial sigmas."""
    gen = torch.Generator().manual_seed(7)
    d = 24
    u = torch.randn(d, generator=gen, dtype=torch.float64)
    r = torch.randn(d, generator=gen, dtype=torch.float64)
    for angle in (0.3, 1.0, 2.0):
        r_perp = r - (r @ u) / (u @ u) * u
        v = math.cos(angle) * u / u.norm() + math.sin(angle) * r_perp / r_perp.norm()
        x = torch.stack([u, v], 1).view(1, d, 1, 2)  # two 1x1 patches
        bits = 16
        planes = torch.randn(300 * bits, d, 1, 1, generator=gen, dtype=torch.float64)
        _, codes = ops.hash_histogram(x, planes, bits, return_codes=True)
        differ = codes[0, :, 0, 0] ^ codes[0, :, 0, 1]
        n_diff = sum(int(bin(int(c)).count("1")) for c in differ)
        p = angle / math.pi
        n = 300 * bits
        assert abs(n_diff / n - p) < 4.5 * math.sqrt(p * (1 - p) / n), (angle, n_diff / n, p)


def test_nan_and_inf_inputs_do_not_crash():
    x = torch.randn(2, 3, 6, 6)
    x[0, 0, 2, 2] = float("nan")
    x[1, 2, 0, 0] = float("inf")
    hist = ops.hash_histogram(x, torch.randn(10, 3, 3, 3), 5, padding=1)
    assert int(hist.sum()) == 2 * 2 * 36


def test_empty_batch_gives_zero_histogram():
    hist, codes = ops.hash_histogram(torch.randn(0, 3, 6, 6), torch.randn(6, 3, 3, 3), 3, return_codes=True)
    assert hist.shape == (2, 8) and int(hist.sum()) == 0 and codes.shape == (0, 2, 4, 4)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"bits": 4}, ValueError, "multiple of bits"),
        ({"bits": 0}, ValueError, "bits must be an int"),
        ({"planes": torch.randn(10, 4, 3, 3)}, ValueError, "planes have 4 input channels"),
        ({"planes": torch.randn(10, 3, 3)}, ValueError, "planes of shape"),
        ({"x": torch.randn(3, 6, 6)}, ValueError, r"shape \(N, C, H, W\)"),
        ({"in_idx": torch.tensor([5])}, ValueError, "in_idx must lie"),
        ({"padding": -1}, ValueError, "padding"),
    ],
)
def test_bad_input(kwargs, exc, match):
    args = {"x": torch.randn(2, 3, 6, 6), "planes": torch.randn(10, 3, 3, 3), "bits": 5}
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        ops.hash_histogram(**args)


def test_empty_in_idx_reads_nothing():
    """No channel read: every projection is 0, so every bit is set (0 >= 0), as the loop reference says."""
    x = torch.randn(2, 3, 6, 5)
    planes = torch.randn(8, 3, 3, 3)
    empty = torch.empty(0, dtype=torch.int64)
    hist, codes = ops.hash_histogram(x, planes, 4, 1, 1, in_idx=empty, return_codes=True)
    ref_hist, ref_codes = loop_reference(x, planes, 4, (1, 1), (1, 1), (1, 1), in_idx=empty)
    assert torch.equal(codes, ref_codes) and torch.equal(hist, ref_hist)
    assert int(hist[:, 15].sum()) == 2 * 2 * 6 * 5


def test_unfused_benchmark_baseline_equals_the_fallback():
    """bench/test_hash_histogram_gpu.py times this torch pipeline as the kernel's baseline: it must compute the
    same histogram."""
    from bench.test_hash_histogram_gpu import unfused

    x = torch.randn(2, 5, 11, 9)
    planes = torch.randn(15, 5, 3, 3)
    assert torch.equal(unfused(x, planes, 5, (2, 2), (1, 1), (1, 1)), ops.hash_histogram(x, planes, 5, 2, 1))


def compact_case(n, c, k, h, w, seed, dtype=torch.float64, second_count=0):
    """Per-sample compact input: rows of k sorted channels of c (padding entries repeat the last active one), counts
    from 0 to k (the first k, the second ``second_count``), NaN past each count (never read), and the same input
    at full size with zeros elsewhere."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(c, generator=gen)[:k].sort().values for _ in range(n)])
    count = torch.randint(0, k + 1, (n,), generator=gen)
    count[0] = k
    if n > 1:
        count[1] = second_count
    past = torch.arange(k)[None, :] >= count[:, None]
    idx = torch.where(past, idx.gather(1, (count[:, None] - 1).clamp(min=0)), idx)
    xc = torch.randn(n, k, h, w, generator=gen, dtype=dtype)
    full = torch.zeros(n, c, h, w, dtype=dtype)
    for i in range(n):
        full[i, idx[i, :count[i]]] = xc[i, :count[i]]
    xc[past] = float("nan")
    return xc, idx, count, full


# (N, C, k, H, W, L, bits, kh, kw, stride, padding, dilation): by taps (stride 1, <= 9 taps) and by expanding
COMPACT_CASES = [
    (3, 11, 7, 9, 7, 3, 4, 3, 3, (1, 1), (1, 1), (1, 1)),
    (2, 9, 5, 8, 9, 2, 3, 3, 2, (1, 1), (1, 0), (2, 1)),
    (3, 7, 6, 5, 6, 3, 3, 1, 1, (1, 1), (0, 0), (1, 1)),
    (2, 8, 5, 7, 6, 2, 4, 3, 3, (1, 1), (0, 2), (1, 1)),
    (2, 10, 6, 9, 7, 2, 3, 5, 5, (1, 1), (2, 2), (1, 1)),
    (3, 9, 4, 11, 9, 2, 4, 3, 3, (2, 2), (1, 1), (1, 1)),
]


@pytest.mark.parametrize("case", COMPACT_CASES, ids=lambda c: "x".join(map(str, c[:9])))
@pytest.mark.parametrize("chunk_bytes", [None, 1], ids=["whole", "one-sample-chunks"])
def test_compact_rows_hash_as_each_samples_full_size_input(monkeypatch, case, chunk_bytes):
    """``compact_input``: x holds each sample's own channels (in_idx rows, NaN past a count, rows of count 0 and k);
    codes and per-sample histograms equal the loop over each sample's full-size input, zero outside its channels,
    whole or in one-sample chunks; summed without ``per_sample``."""
    from tritonslide.cpu_fallback import hash_histogram as cpu_hash
    if chunk_bytes is not None:
        monkeypatch.setattr(cpu_hash, "CHUNK_BYTES", chunk_bytes)
    n, c, k, h, w, n_tables, bits, kh, kw, stride, padding, dilation = case
    xc, idx, count, full = compact_case(n, c, k, h, w, seed=sum(case[:5]))
    planes = torch.randn(n_tables * bits, c, kh, kw, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    hist, codes = ops.hash_histogram(xc, planes, bits, stride, padding, dilation, in_idx=idx, in_count=count,
                                     return_codes=True, per_sample=True, compact_input=True)
    refs = [loop_reference(full[i:i + 1], planes, bits, stride, padding, dilation) for i in range(n)]
    assert torch.equal(codes, torch.cat([r[1] for r in refs]))
    assert torch.equal(hist, torch.stack([r[0] for r in refs]))
    summed = ops.hash_histogram(xc, planes, bits, stride, padding, dilation, in_idx=idx, in_count=count,
                                compact_input=True)
    assert torch.equal(summed, hist.sum(0))


def test_compact_rows_hash_bitwise_alike_alone_and_in_a_batch():
    """A sample's projections by taps do not depend on how wide its batch's rows are (the widest count): alone, in
    rows padded past its count, and in a batch whose rows are wider than one channel block (more than 128 channels,
    where one matmul over all of them rounded differently), its codes are bitwise the same, also at a near-zero
    projection: the float32 codes are compared bitwise, not against a float64 reference."""
    from tritonslide.cpu_fallback.hash_histogram import TAP_CHANNEL_BLOCK
    n, c, k = 4, 331, 300
    assert k > 2 * TAP_CHANNEL_BLOCK
    xc, idx, count, _ = compact_case(n, c, k, 5, 6, seed=3, dtype=torch.float32, second_count=131)
    planes = torch.randn(12, c, 3, 3, generator=torch.Generator().manual_seed(4))

    def codes(x, rows, counts):
        return ops.hash_histogram(x, planes, 4, 1, 1, in_idx=rows, in_count=counts, return_codes=True,
                                  per_sample=True, compact_input=True)[1]

    batch = codes(xc, idx, count)
    for i in range(n):
        for width in {int(count[i]), min(k, int(count[i]) + 7)}:
            width = max(width, 1)
            alone = codes(xc[i:i + 1, :width], idx[i:i + 1, :width], count[i:i + 1])
            assert torch.equal(alone, batch[i:i + 1]), (i, width)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compact_rows_of_low_precision_hash_in_float32(dtype):
    """As the full-size hash: a half-precision compact input projects in float32 (here equal to the full-size
    hash of the same values, which also runs in float32, except within rounding of zero, excluded by
    construction)."""
    xc, idx, count, full = compact_case(3, 10, 6, 7, 6, seed=7, dtype=torch.float32, second_count=4)
    planes = torch.randn(6, 10, 3, 3, generator=torch.Generator().manual_seed(8))
    _, codes = ops.hash_histogram(xc.to(dtype), planes.to(dtype), 3, 1, 1, in_idx=idx, in_count=count,
                                  return_codes=True, per_sample=True, compact_input=True)
    _, ref = ops.hash_histogram(full.to(dtype), planes.to(dtype), 3, 1, 1, return_codes=True, per_sample=True)
    proj = F.conv2d(full.to(dtype).double(), planes.to(dtype).double(), padding=1).view(3, 2, 3, 7, 6).abs().amin(2)
    safe = proj > 1e-2
    assert safe.float().mean() > 0.8
    assert torch.equal(codes[safe], ref[safe])


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"in_idx": None}, ValueError, "needs per-sample in_idx rows"),
        ({"in_idx": torch.tensor([0, 2])}, ValueError, "needs per-sample in_idx rows"),
        ({"in_idx": torch.tensor([[0, 2, 4], [1, 2, 3]])}, ValueError, "in_idx.shape\\[1\\]=3 channels, got 2"),
        ({"in_idx": torch.tensor([[0, 9], [1, 2]])}, ValueError, "in_idx must lie in \\[0, 5\\)"),
        ({"in_idx": torch.tensor([[2, 1], [1, 2]])}, ValueError, "sorted and unique"),
        ({"in_count": torch.tensor([3, 1])}, ValueError, "in_count must lie in \\[0, 2\\]"),
        ({"compact_input": 1}, TypeError, "compact_input must be"),
    ],
)
def test_compact_input_bad_input(kwargs, exc, match):
    args = {"x": torch.randn(2, 2, 6, 6), "planes": torch.randn(6, 5, 3, 3), "bits": 3, "padding": 1,
            "in_idx": torch.tensor([[0, 3], [1, 4]]), "in_count": torch.tensor([2, 1]), "per_sample": True,
            "compact_input": True}
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        ops.hash_histogram(**args)


def test_compact_input_of_an_empty_batch():
    hist, codes = ops.hash_histogram(torch.randn(0, 2, 6, 6), torch.randn(6, 5, 3, 3), 3, padding=1,
                                     in_idx=torch.empty(0, 2, dtype=torch.int64), return_codes=True,
                                     per_sample=True, compact_input=True)
    assert hist.shape == (0, 2, 8) and codes.shape == (0, 2, 6, 6)
