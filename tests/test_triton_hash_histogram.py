"""The Triton hash + histogram kernel (kernels/hash_histogram.py) against a plain loop and float64 projections.

Runs on CUDA when present (marker ``gpu``), else on CPU in Triton's interpreter (tests/triton_utils.py).

Rule for the codes (the issue asks for it to be written down): the kernel accumulates the projections in fp32, so
a bit may legitimately differ from the exact sign only where the exact projection lies within the fp32 rounding
bound of zero, ``|<a, p>| <= (D + 2) * 2**-24 * <|a|, |p|>`` (the standard a-priori bound of a D-term fp32 dot
product with rounded products). Codes of every table without such a bit must equal the reference exactly; the
histogram must equal the bincount of the kernel's own codes, and the reference histogram exactly when no bit of
the batch is ambiguous (on these random shapes none is: the test checks that too).
"""

import pytest
import torch
import torch.nn.functional as F
from test_ops_hash_histogram import CASES as FALLBACK_CASES
from test_ops_hash_histogram import loop_reference
from triton_utils import DEVICES, ON_INTERPRETER, requires_triton

import tritonslide
from tritonslide import ops

pytestmark = requires_triton

# The fallback's cases (not powers of two, 1x1 / 3x3 / 5x5 / 11x11 stride 4, padding, dilation, non-square strides)
# and a stride-4 3x3.
CASES = FALLBACK_CASES + [(2, 7, 13, 10, 3, 5, 3, 3, (4, 4), (1, 1), (1, 1))]


def case_id(case):
    n, c, h, w, n_tables, bits, kh, kw, stride, padding, dilation = case
    return f"{n}x{c}x{h}x{w}-L{n_tables}K{bits}-k{kh}x{kw}-s{stride[0]}{stride[1]}-d{dilation[0]}{dilation[1]}"


def make(case, device, dtype, seed=1):
    n, c, h, w, n_tables, bits, kh, kw, *_ = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=gen).to(device=device, dtype=dtype)
    planes = torch.randn(n_tables * bits, c, kh, kw, generator=gen).to(device=device, dtype=dtype)
    return x, planes


def ambiguous(x, planes, bits, stride, padding, dilation, in_idx=None):
    """(N, L, H', W') bool: tables with a bit whose exact projection is within fp32 rounding of zero."""
    x, planes = x.detach().double().cpu(), planes.detach().double().cpu()
    if in_idx is not None:
        mask = torch.zeros(x.shape[1], dtype=torch.float64)
        mask[in_idx.cpu()] = 1
        x = x * mask.view(1, -1, 1, 1)
    proj = F.conv2d(x, planes, None, stride, padding, dilation)
    mag = F.conv2d(x.abs(), planes.abs(), None, stride, padding, dilation)
    reduction = planes[0].numel()
    close = proj.abs() <= (reduction + 2) * 2.0**-24 * mag
    n, _, ho, wo = proj.shape
    return close.view(n, -1, bits, ho, wo).any(2)


def run_triton(x, planes, bits, stride, padding, dilation, in_idx=None):
    with tritonslide.use_backend("triton"):
        hist, codes = ops.hash_histogram(x, planes, bits, stride, padding, dilation, in_idx=in_idx,
                                         return_codes=True)
        hist_only = ops.hash_histogram(x, planes, bits, stride, padding, dilation, in_idx=in_idx)
    assert hist.dtype == torch.int64 and codes.dtype == torch.int64 and hist.device == x.device
    assert torch.equal(hist_only, hist), "the histogram must not depend on whether the codes are written"
    return hist.cpu(), codes.cpu()


def check_against(hist, codes, ref_hist, ref_codes, amb, bits):
    agree = (codes == ref_codes) | amb
    assert bool(agree.all()), f"{int((~agree).sum())} codes differ away from any rounding ambiguity"
    n_tables = codes.shape[1]
    own = torch.stack([torch.bincount(codes[:, t].flatten(), minlength=1 << bits) for t in range(n_tables)])
    assert torch.equal(hist, own), "the histogram must count the kernel's own codes"
    assert not bool(amb.any()), "random test data should not hit the rounding rule"
    assert torch.equal(codes, ref_codes) and torch.equal(hist, ref_hist)


def check_kernel_against_loop(x, planes, bits, stride, padding, dilation, in_idx):
    """The kernel's histogram and codes against the loop reference, under the rounding rule of ``ambiguous``."""
    hist, codes = run_triton(x, planes, bits, stride, padding, dilation, in_idx)
    ref_hist, ref_codes = loop_reference(x.cpu(), planes.cpu(), bits, stride, padding, dilation,
                                         None if in_idx is None else in_idx.cpu())
    check_against(hist, codes, ref_hist, ref_codes, ambiguous(x, planes, bits, stride, padding, dilation, in_idx), bits)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("use_in_idx", [False, True], ids=["all_channels", "in_idx"])
def test_fp32_matches_loop_reference(device, case, use_in_idx):
    n, c, h, w, n_tables, bits, kh, kw, stride, padding, dilation = case
    x, planes = make(case, device, torch.float32)
    in_idx = torch.arange(0, c, 2, device=device) if use_in_idx else None
    check_kernel_against_loop(x, planes, bits, stride, padding, dilation, in_idx)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES[:3] + CASES[5:], ids=case_id)
def test_channels_last_equals_nchw(device, case):
    *_, bits, kh, kw, stride, padding, dilation = case
    x, planes = make(case, device, torch.float32, seed=2)
    in_idx = torch.tensor([0, 2], device=device)
    nchw = run_triton(x, planes, bits, stride, padding, dilation, in_idx)
    cl = run_triton(x.to(memory_format=torch.channels_last), planes, bits, stride, padding, dilation, in_idx)
    amb = ambiguous(x, planes, bits, stride, padding, dilation, in_idx)
    ref_hist, ref_codes = loop_reference(x.cpu(), planes.cpu(), bits, stride, padding, dilation, in_idx.cpu())
    check_against(*nchw, ref_hist, ref_codes, amb, bits)
    check_against(*cl, ref_hist, ref_codes, amb, bits)


HALF = [torch.float16] if ON_INTERPRETER else [torch.float16, torch.bfloat16]  # no bf16 tl.dot in the interpreter


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[4]], ids=case_id)
def test_half_precision_inputs_accumulate_in_fp32(device, dtype, case):
    """fp16 / bf16 inputs: products are exact in fp32, so the fp32-accumulation rule above applies to the values
    the kernel reads (the inputs and the planes rounded to the input dtype)."""
    *_, bits, kh, kw, stride, padding, dilation = case
    x, planes = make(case, device, dtype, seed=3)
    hist, codes = run_triton(x, planes, bits, stride, padding, dilation)
    ref_hist, ref_codes = loop_reference(x.cpu().double(), planes.cpu().double(), bits, stride, padding, dilation)
    check_against(hist, codes, ref_hist, ref_codes, ambiguous(x, planes, bits, stride, padding, dilation), bits)


@pytest.mark.parametrize("device", DEVICES)
def test_planes_are_rounded_to_the_input_dtype(device):
    case = CASES[0]
    *_, bits, kh, kw, stride, padding, dilation = case
    x, planes = make(case, device, torch.float16, seed=4)
    planes32 = planes.float() + 1e-4 * torch.randn(planes.shape, generator=torch.Generator().manual_seed(0)).to(device)
    a = run_triton(x, planes32, bits, stride, padding, dilation)
    b = run_triton(x, planes32.half(), bits, stride, padding, dilation)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [10, 11], ids=["per_program_histogram", "atomic_per_position"])
def test_both_histogram_strategies(device, bits):
    """2**10 buckets use the per-program tl.histogram, 2**11 one atomic add per position (LOCAL_HIST_MAX_BUCKETS)."""
    from tritonslide.kernels.hash_histogram import LOCAL_HIST_MAX_BUCKETS

    assert (1 << 10) <= LOCAL_HIST_MAX_BUCKETS < (1 << 11)
    case = (2, 3, 11, 9, 2, bits, 3, 3, (1, 1), (1, 1), (1, 1))
    x, planes = make(case, device, torch.float32, seed=5)
    hist, codes = run_triton(x, planes, bits, (1, 1), (1, 1), (1, 1))
    ref_hist, ref_codes = loop_reference(x.cpu(), planes.cpu(), bits, (1, 1), (1, 1), (1, 1))
    check_against(hist, codes, ref_hist, ref_codes, ambiguous(x, planes, bits, (1, 1), (1, 1), (1, 1)), bits)


@pytest.mark.parametrize("device", DEVICES)
def test_many_positions_span_several_programs(device):
    """More positions than one block, with a ragged last block: the histogram still counts each patch once."""
    case = (3, 4, 17, 19, 3, 5, 3, 3, (1, 1), (1, 1), (1, 1))
    x, planes = make(case, device, torch.float32, seed=6)
    hist, codes = run_triton(x, planes, 5, (1, 1), (1, 1), (1, 1))
    with tritonslide.use_backend("torch"):
        ref_hist, ref_codes = ops.hash_histogram(x.cpu(), planes.cpu(), 5, 1, 1, 1, return_codes=True)
    check_against(hist, codes, ref_hist, ref_codes, ambiguous(x, planes, 5, (1, 1), (1, 1), (1, 1)), 5)
    assert int(hist.sum()) == 3 * 3 * 17 * 19


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch_and_empty_in_idx(device):
    x, planes = make(CASES[0], device, torch.float32)
    hist, codes = run_triton(x[:0], planes, 5, (1, 1), (1, 1), (1, 1))
    assert hist.shape == (3, 32) and int(hist.sum()) == 0 and codes.shape == (0, 3, 9, 7)
    empty = torch.empty(0, dtype=torch.int64, device=device)
    hist, codes = run_triton(x, planes, 5, (1, 1), (1, 1), (1, 1), in_idx=empty)
    ref_hist, ref_codes = ops.hash_histogram(x.cpu(), planes.cpu(), 5, 1, 1, 1, in_idx=empty.cpu(), return_codes=True)
    assert torch.equal(hist, ref_hist) and torch.equal(codes, ref_codes)  # every projection 0: all bits set


@pytest.mark.parametrize("device", DEVICES)
def test_alsh_layer_selects_the_same_filters_with_the_kernel(device):
    """End to end: the ALSH layer's per-batch active set is the same whichever backend hashes the batch."""
    layer = tritonslide.nn.ALSHConv2d(5, 11, 3, padding=1, config=tritonslide.ALSHConfig(tables=3, bits=4)).to(device)
    x = torch.randn(2, 5, 9, 8, generator=torch.Generator().manual_seed(7)).to(device)
    cfg = layer.alsh_config
    with torch.no_grad():
        with tritonslide.use_backend("triton"):
            hist_k = ops.hash_histogram(x, layer.planes, cfg.bits, layer.stride, layer.padding, layer.dilation)
        with tritonslide.use_backend("torch"):
            hist_t = ops.hash_histogram(x.cpu(), layer.planes.cpu(), cfg.bits, layer.stride, layer.padding,
                                        layer.dilation)
    assert torch.equal(hist_k.cpu(), hist_t)
    assert torch.equal(layer.select_active(hist_k).cpu(), layer.cpu().select_active(hist_t))


def test_float64_is_refused_by_the_forced_triton_backend():
    x, planes = make(CASES[0], "cpu", torch.float64)
    with tritonslide.use_backend("triton"), pytest.raises(TypeError, match=r"hash_histogram.*float64"):
        ops.hash_histogram(x, planes, 5, 1, 1)


# Shapes that reach each reduction order of the kernel (kernels/hash_histogram.py): ROWS (C < 16 and undilated
# columns: a zero-padded NHWC copy), tap-major with C as a constant (C >= 16; a partial last chunk when kh*kw*C is not
# a multiple of BLOCK_D), tap-major with a carried (tap, c0) state (more than 32 taps, or in_idx).
ORDER_CASES = [
    (2, 20, 9, 7, 3, 5, 3, 3, (1, 1), (1, 1), (1, 1)),  # C >= 16, kh*kw*C = 180: a partial last chunk
    (1, 16, 11, 10, 2, 4, 3, 3, (2, 2), (1, 1), (1, 1)),  # C = 16, stride 2
    (1, 17, 10, 9, 2, 3, 7, 7, (1, 1), (3, 3), (1, 1)),  # 49 taps: no tap bitmask
    (2, 3, 12, 11, 3, 5, 3, 3, (1, 1), (2, 2), (1, 2)),  # dilated columns: C = 3 read tap-major
    (2, 1, 10, 9, 2, 4, 3, 3, (1, 1), (1, 1), (1, 1)),  # C = 1, padded to 4 channels (ROWS)
    (1, 9, 13, 12, 2, 5, 5, 5, (3, 2), (2, 1), (2, 1)),  # C = 9 padded to 16, dilated rows, unequal strides
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ORDER_CASES, ids=case_id)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("use_in_idx", [False, True], ids=["all_channels", "in_idx"])
def test_every_reduction_order_matches_loop_reference(device, case, layout, use_in_idx):
    """NCHW input (converted by the launcher) and channels_last input (read in place, or copied with padding for
    C < 16) give the loop reference's codes and histogram, in every reduction order the launcher can pick."""
    n, c, h, w, n_tables, bits, kh, kw, stride, padding, dilation = case
    x, planes = make(case, device, torch.float32, seed=12)  # a seed whose data hits no rounding ambiguity
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    in_idx = torch.arange(0, c, 3, device=device) if use_in_idx else None
    check_kernel_against_loop(x, planes, bits, stride, padding, dilation, in_idx)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [ORDER_CASES[0], CASES[1], ORDER_CASES[3]], ids=case_id)
def test_a_non_finite_pixel_changes_only_the_patches_that_hold_it(device, case):
    """The kernel reads past a patch (the ROWS order's zero-padded copy, the last partial chunk) only under a mask:
    a NaN pixel turns the codes of the patches containing it to 0 (NaN >= 0 is false), as in the reference, and
    leaves every other patch's code as it was."""
    n, c, h, w, n_tables, bits, kh, kw, stride, padding, dilation = case
    x, planes = make(case, device, torch.float32, seed=9)
    x[0, c - 1, h // 2, w // 2] = float("nan")
    hist, codes = run_triton(x, planes, bits, stride, padding, dilation)
    ref_hist, ref_codes = loop_reference(x.cpu(), planes.cpu(), bits, stride, padding, dilation)
    assert (ref_codes == 0).any(), "the NaN pixel must fall in at least one patch"
    assert torch.equal(codes, ref_codes) and torch.equal(hist, ref_hist)


@pytest.mark.parametrize("device", DEVICES)
def test_more_than_32_planes(device):
    """L*K = 35 planes (BLOCK_P = 64): the codes come from one reduction per table, not from one 32-bit word."""
    case = (1, 5, 8, 7, 7, 5, 3, 3, (1, 1), (1, 1), (1, 1))
    x, planes = make(case, device, torch.float32, seed=13)
    hist, codes = run_triton(x, planes, 5, (1, 1), (1, 1), (1, 1))
    ref_hist, ref_codes = loop_reference(x.cpu(), planes.cpu(), 5, (1, 1), (1, 1), (1, 1))
    check_against(hist, codes, ref_hist, ref_codes, ambiguous(x, planes, 5, (1, 1), (1, 1), (1, 1)), 5)


@pytest.mark.parametrize("device", DEVICES)
def test_compact_rows_with_the_kernel_equal_the_loop(device):
    """``compact_input`` on the Triton backend (each sample's compact channels expanded to full size for the
    kernel): per-sample codes and histograms equal the loop over each sample's full-size input."""
    from test_ops_hash_histogram import compact_case
    xc, idx, count, full = compact_case(3, 11, 7, 9, 7, seed=2, dtype=torch.float32, second_count=5)
    planes = torch.randn(12, 11, 3, 3, generator=torch.Generator().manual_seed(3))
    with tritonslide.use_backend("triton"):
        hist, codes = ops.hash_histogram(xc.to(device), planes.to(device), 4, 1, 1, in_idx=idx.to(device),
                                         in_count=count.to(device), return_codes=True, per_sample=True,
                                         compact_input=True)
    refs = [loop_reference(full[i:i + 1], planes, 4, (1, 1), (1, 1), (1, 1)) for i in range(3)]
    assert not bool(ambiguous(full, planes, 4, (1, 1), (1, 1), (1, 1)).any())
    assert torch.equal(codes.cpu(), torch.cat([r[1] for r in refs]))
    assert torch.equal(hist.cpu(), torch.stack([r[0] for r in refs]))
