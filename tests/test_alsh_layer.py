"""ALSHConv2d against plain references: the P/Q transforms, the tables, the active set and the masked conv."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tritonslide
from tests.test_ops_hash_histogram import loop_reference
from tests.tolerances import assert_close
from tritonslide import ALSHConfig as _ALSHConfig
from tritonslide.nn import ALSHConv2d


def ALSHConfig(**kwargs):  # noqa: N802 - the config class with this module's default
    """These tests check the thesis' per-batch algorithm (Feeney 2019, Alg. 4-6) against batch-wide references, so
    their layers choose per batch; per-sample selection (the default since issue #15) is tested in
    tests/test_sample_selection.py and tests/test_ops_sample_conv2d.py."""
    return _ALSHConfig(**{"selection": "batch", **kwargs})

ALL_ACTIVE = ALSHConfig(bits=2, top_buckets=4)


def reference_filter_codes(layer):
    """Plain loops: scale by U / max ||w||, P(w) = [w, 1/2 - ||w||^2, 1/2 - ||w||^4, ...], sign per plane."""
    cfg = layer.config
    w = layer.weight.detach().double().flatten(1)
    w = w * cfg.norm_bound / max(float(row.norm()) for row in w)
    codes = torch.zeros(layer.out_channels, cfg.tables, dtype=torch.int64)
    for o in range(layer.out_channels):
        norm_sq = float(w[o] @ w[o])
        p = torch.cat([w[o], torch.tensor([0.5 - norm_sq ** (2**i) for i in range(cfg.m)], dtype=torch.float64)])
        for t in range(cfg.tables):
            for k in range(cfg.bits):
                a = torch.cat([layer.planes[t * cfg.bits + k].double().flatten(), layer.planes_extra[t * cfg.bits + k]
                               .double()])
                if float(a @ p) >= 0:
                    codes[o, t] += 1 << k
    return codes


def reference_active_set(layer, x):
    """Histogram by the loop reference, top buckets by plain sorting, union of the filters in them."""
    cfg = layer.config
    hist, _ = loop_reference(x, layer.planes, cfg.bits, layer.stride, layer.padding, layer.dilation)
    active = set()
    for t in range(cfg.tables):
        ranked = sorted(range(2**cfg.bits), key=lambda code: (-int(hist[t, code]), code))[: cfg.top_buckets]
        active |= {o for o in range(layer.out_channels) if int(layer.filter_codes[o, t]) in ranked}
    return torch.tensor(sorted(active), dtype=torch.int64)


def masked_conv(x, layer, active):
    mask = torch.zeros(layer.out_channels, dtype=x.dtype)
    mask[active] = 1
    y = F.conv2d(x, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation)
    return y * mask.view(1, -1, 1, 1)


GEOMETRIES = [  # (C, O, k, stride, padding, dilation, H, W)
    (7, 13, 3, 1, 1, 1, 11, 9),
    (3, 10, 11, 4, 2, 1, 31, 27),
    (6, 9, 5, 2, 2, 1, 13, 12),
    (5, 17, 3, 1, 2, 2, 10, 10),
]


@pytest.mark.parametrize("geom", GEOMETRIES, ids=lambda g: "x".join(map(str, g)))
def test_all_filters_active_equals_dense_conv(geom):
    c, o, k, s, p, d, h, w = geom
    conv = nn.Conv2d(c, o, k, s, p, d)
    layer = ALSHConv2d.from_dense(copy.deepcopy(conv), ALL_ACTIVE)
    x = torch.randn(3, c, h, w)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, y_ref = layer(x1), conv(x2)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    for a, b in ((x1.grad, x2.grad), (layer.weight.grad, conv.weight.grad), (layer.bias.grad, conv.bias.grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("geom", GEOMETRIES, ids=lambda g: "x".join(map(str, g)))
def test_tables_active_set_and_output_match_plain_reference(geom):
    c, o, k, s, p, d, h, w = geom
    layer = ALSHConv2d(c, o, k, s, p, d, config=ALSHConfig(tables=3, bits=4, top_buckets=3), seed=5)
    assert torch.equal(layer.filter_codes, reference_filter_codes(layer))
    x = torch.randn(2, c, h, w).requires_grad_()
    active = reference_active_set(layer, x.detach())
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    x_ref = x.detach().clone().requires_grad_()
    ref_layer = copy.deepcopy(layer)
    ref_layer.weight.grad = None
    ref_layer.bias.grad = None
    y_ref = masked_conv(x_ref, ref_layer, active)
    y_ref.backward(g)
    assert_close(y, y_ref.detach(), reduction=c * k * k)
    assert_close(x.grad, x_ref.grad, reduction=o * k * k)
    assert_close(layer.weight.grad, ref_layer.weight.grad, reduction=2 * y.shape[2] * y.shape[3])
    assert_close(layer.bias.grad, ref_layer.bias.grad, reduction=2 * y.shape[2] * y.shape[3])
    inactive = torch.ones(o, dtype=torch.bool)
    inactive[active] = False
    assert (layer.weight.grad[inactive] == 0).all()
    assert layer.stats().active_fraction == pytest.approx(len(active) / o)


def _mips_setup():
    gen = torch.Generator().manual_seed(11)
    c, o = 16, 48
    weight = torch.randn(o, c, 1, 1, generator=gen)
    weight *= torch.rand(o, 1, 1, 1, generator=gen) + 0.5  # varied norms: MIPS, not cosine similarity
    q = torch.randn(c, generator=gen)
    x = q.view(1, c, 1, 1).expand(2, c, 3, 3).contiguous()  # one query repeated over the image
    return c, o, weight, q, x


def test_collision_rate_matches_sign_alsh_theory():
    """With Gaussian hyperplanes, Q(q) and P(w) agree on a bit with probability 1 - angle(Q(q), P(w)) / pi
    exactly (thesis 3.2.5, 3.3.1), so on all K bits with that to the power K. Per filter, 400 fixed seeds;
    every filter's observed rate lies within 4.5 binomial sigmas of the theory."""
    c, o, weight, q, x = _mips_setup()
    bits, seeds = 2, 400
    hits = torch.zeros(o)
    for seed in range(seeds):
        layer = ALSHConv2d(c, o, 1, bias=False, config=ALSHConfig(tables=1, bits=bits, top_buckets=1), seed=seed)
        layer.weight.data.copy_(weight)
        layer.rebuild_tables()
        _, codes = tritonslide.ops.hash_histogram(x, layer.planes, bits, return_codes=True)
        hits += (layer.filter_codes[:, 0] == codes[0, 0, 0, 0]).float()
    w = weight.flatten(1).double()
    w = w * 0.75 / w.norm(dim=1).max()
    sq = (w * w).sum(1)
    p_w = torch.cat([w, (0.5 - sq).unsqueeze(1), (0.5 - sq**2).unsqueeze(1)], 1)
    q_q = torch.cat([q.double(), torch.zeros(2, dtype=torch.float64)])
    angle = torch.arccos((p_w @ q_q) / (p_w.norm(dim=1) * q_q.norm()))
    p = (1 - angle / math.pi) ** bits
    z = (hits / seeds - p) / torch.sqrt(p * (1 - p) / seeds)
    assert z.abs().max() < 4.5, z


def test_alsh_selects_filters_with_large_inner_products():
    """MIPS (thesis 4.2.2): with the mode bucket (top_buckets=1), the rate at which a filter is selected
    increases with its inner product with the query: rank correlation over 300 fixed seeds."""
    c, o, weight, q, x = _mips_setup()
    counts = torch.zeros(o)
    for seed in range(300):
        layer = ALSHConv2d(c, o, 1, bias=False, config=ALSHConfig(tables=1, bits=2, top_buckets=1), seed=seed)
        layer.weight.data.copy_(weight)
        layer.rebuild_tables()
        layer(x)
        counts[layer.select_active(tritonslide.ops.hash_histogram(x, layer.planes, 2))] += 1
    ip = weight.flatten(1) @ q
    ranks_ip, ranks_c = ip.argsort().argsort().double(), counts.argsort().argsort().double()
    spearman = torch.corrcoef(torch.stack([ranks_ip, ranks_c]))[0, 1]
    assert spearman > 0.6, float(spearman)
    order = ip.argsort()
    assert counts[order[-12:]].mean() > 1.2 * counts[order[:12]].mean()


def test_min_active_and_nan_inputs():
    layer = ALSHConv2d(4, 20, 3, padding=1, config=ALSHConfig(top_buckets=1, min_active=6))
    x = torch.full((2, 4, 5, 5), float("nan"))
    y = layer(x)
    assert y.shape == (2, 20, 5, 5)
    assert layer.stats().active_fraction >= 6 / 20
    x = torch.randn(2, 4, 5, 5)
    x[0, 0, 0, 0] = float("inf")
    layer(x)
    assert layer.stats().calls == 2


def test_min_active_fills_from_most_voted_buckets():
    layer = ALSHConv2d(4, 12, 1, config=ALSHConfig(tables=2, bits=3, top_buckets=1, min_active=5))
    hist = torch.zeros(2, 8, dtype=torch.int64)
    hist[0, 7], hist[1, 7] = 100, 100  # top bucket 7 in both tables
    layer.filter_codes.copy_(torch.tensor([[i % 7, (i + 3) % 7] for i in range(12)]))  # nobody in bucket 7
    hist[0, 2], hist[1, 5] = 50, 40
    active = layer.select_active(hist)
    assert active.numel() == 5
    votes = hist[0, layer.filter_codes[:, 0]] + hist[1, layer.filter_codes[:, 1]]
    assert active.tolist() == sorted(votes.argsort(descending=True, stable=True)[:5].tolist()) == [0, 1, 2, 3, 9]


def test_empty_batch_and_unbatched_input():
    layer = ALSHConv2d(3, 5, 3, padding=1)
    assert layer(torch.randn(0, 3, 7, 6)).shape == (0, 5, 7, 6)
    assert layer.stats().calls == 0
    conv = layer.to_dense()
    torch.testing.assert_close(
        layer(torch.randn(3, 7, 6)).shape, conv(torch.randn(3, 7, 6)).shape
    )


@pytest.mark.parametrize(
    "x, exc, match",
    [
        (torch.randn(2, 3, 7), ValueError, r"expected 4 input channels|shape \(N, 4, H, W\)"),
        (torch.randn(2, 5, 7, 7), ValueError, r"expected 4 input channels, i.e. shape \(N, 4, H, W\)"),
        (torch.randn(2, 3, 4, 7, 7), ValueError, r"shape \(N, 4, H, W\)"),
        (torch.randn(2, 4, 7, 7, dtype=torch.float64), TypeError, "expected a torch.float32 input"),
        (torch.randn(2, 4, 2, 7), ValueError, "smaller than the kernel extent"),
        (torch.randn(2, 4, 7, 7, device="meta"), ValueError, "input is on meta"),
    ],
)
def test_bad_input_names_the_layer(x, exc, match):
    model = tritonslide.patch(nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 6, 3)))
    with pytest.raises(exc, match=match) as info:
        model[1](x)
    assert "ALSHConv2d '1'" in str(info.value)


def test_buffers_move_with_to_and_are_saved():
    layer = ALSHConv2d(3, 5, 3)
    keys = set(layer.state_dict())
    assert {"weight", "bias", "planes", "planes_extra", "filter_codes", "steps", "_extra_state"} <= keys
    assert not any(k.startswith("stat_") for k in keys)
    layer = layer.to(torch.float64)
    assert layer.planes.dtype == torch.float64 and layer.filter_codes.dtype == torch.int64
    assert layer(torch.randn(2, 3, 6, 6, dtype=torch.float64)).dtype == torch.float64


def test_rebuild_every_rehashes_after_that_many_training_steps():
    layer = ALSHConv2d(3, 8, 3, config=ALSHConfig(rebuild_every=3))
    x = torch.randn(2, 3, 6, 6)
    before = layer.filter_codes.clone()
    with torch.no_grad():
        layer.weight.mul_(-1)  # flips every hyperplane side of the w part
    for _ in range(3):
        layer(x)
    assert torch.equal(layer.filter_codes, before)  # steps 0, 1, 2 used the old tables
    layer(x)  # step 3 rebuilds first
    assert torch.equal(layer.filter_codes, reference_filter_codes(layer))
    layer.eval()
    with torch.no_grad():
        layer.weight.mul_(-1)
    for _ in range(5):
        layer(x)  # eval forwards never rebuild
    assert int(layer.steps) == 4


def test_stats_match_manual_accounting():
    layer = ALSHConv2d(3, 16, 3, padding=1, config=ALSHConfig(bits=3))
    xs = [torch.randn(2, 3, 8, 8) for _ in range(3)]
    fracs, hists = [], []
    for x in xs:
        hists.append(tritonslide.ops.hash_histogram(x, layer.planes, 3, padding=1).double())
        fracs.append(layer.select_active(hists[-1].long()).numel() / 16)
        layer(x)
    st = layer.stats()
    mean_hist = torch.stack(hists).mean(0)
    assert st.calls == 3 and st.active_fraction == pytest.approx(sum(fracs) / 3)
    assert st.bucket_max == pytest.approx(float(mean_hist.max()))
    assert st.bucket_std == pytest.approx(float(mean_hist.std(1, unbiased=False).mean()))
    layer.reset_stats()
    assert layer.stats().calls == 0


def test_from_dense_reuses_parameters_and_handles_same_padding():
    conv = nn.Conv2d(4, 6, 3, padding="same", bias=False)
    layer = ALSHConv2d.from_dense(conv, ALL_ACTIVE)
    assert layer.weight is conv.weight and layer.bias is None and layer.padding == (1, 1)
    x = torch.randn(2, 4, 7, 5)
    torch.testing.assert_close(layer(x), conv(x), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="groups=2"):
        ALSHConv2d.from_dense(nn.Conv2d(4, 6, 3, groups=2))
    with pytest.raises(TypeError, match="ALSHConfig"):
        ALSHConv2d(3, 4, 3, config="alsh")


def test_planes_are_standard_normal():
    """The hyperplanes a ~ N(0, I) (thesis eq. 3.3): moments of 30k fixed-seed draws within 5 sigma."""
    layer = ALSHConv2d(64, 8, 5, config=ALSHConfig(tables=4, bits=4, m=2), seed=123)
    a = torch.cat([layer.planes.flatten(), layer.planes_extra.flatten()]).double()
    n = a.numel()
    assert abs(float(a.mean())) < 5 / math.sqrt(n)
    assert abs(float(a.var()) - 1) < 5 * math.sqrt(2 / n)
    other = ALSHConv2d(64, 8, 5, config=ALSHConfig(tables=4, bits=4, m=2), seed=124)
    assert not torch.equal(layer.planes, other.planes)


def test_steps_survive_a_state_dict_round_trip_and_drive_rebuilds():
    src = ALSHConv2d(3, 8, 3, config=ALSHConfig(rebuild_every=2))
    x = torch.randn(2, 3, 6, 6)
    for _ in range(3):
        src(x)
    dst = ALSHConv2d(3, 8, 3, config=ALSHConfig(rebuild_every=2))
    dst.load_state_dict(src.state_dict())
    with torch.no_grad():
        dst.weight.mul_(-1)
    dst(x)  # step 3: no rebuild
    assert not torch.equal(dst.filter_codes, reference_filter_codes(dst))
    dst(x)  # step 4: rebuild first
    assert torch.equal(dst.filter_codes, reference_filter_codes(dst)) and int(dst.steps) == 5


def test_stats_before_any_call_are_nan():
    assert math.isnan(ALSHConv2d(3, 4, 3).stats().active_fraction)


@pytest.mark.parametrize("selection", ["batch", "sample"])
def test_three_channel_input_keeps_its_memory_format(selection, monkeypatch):
    """A first layer (3 channels) on the CPU keeps its input's format: an NCHW input gives an NCHW output and a
    channels_last one a channels_last output, equal forward and in every gradient, per batch and per sample (the
    CPU hash projects a channels_last copy of a 3-channel input either way)."""
    layer = ALSHConv2d(3, 10, 5, 2, 2, config=_ALSHConfig(selection=selection, tables=3, bits=4, top_buckets=3),
                       seed=5)
    x = torch.randn(4, 3, 17, 15)
    seen = []
    hash_histogram = tritonslide.ops.hash_histogram

    def spy(x, *args, **kwargs):
        seen.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
        return hash_histogram(x, *args, **kwargs)

    monkeypatch.setattr(tritonslide.ops, "hash_histogram", spy)
    outs = []
    for inp in (x.clone(), x.contiguous(memory_format=torch.channels_last)):
        lay = copy.deepcopy(layer)
        inp.requires_grad_()
        y = lay(inp)
        y.backward(torch.linspace(-1, 1, y.numel()).view(y.shape))
        outs.append((y, inp.grad, lay.weight.grad, lay.bias.grad))
    (y, dx, dw, db), (y_cl, dx_cl, dw_cl, db_cl) = outs
    assert y.is_contiguous() and y_cl.is_contiguous(memory_format=torch.channels_last)
    assert dx.is_contiguous()
    for a, b in ((y, y_cl), (dx, dx_cl), (dw, dw_cl), (db, db_cl)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert seen == [False, True]  # the layer hashed each input as it came: no channels_last detour of its own
    assert (dw != 0).any(dim=(1, 2, 3)).sum() < 10  # some filters stayed inactive: the sets were exercised
