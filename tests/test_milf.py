"""MILFConv2d (CNN-SLIDE sec. 4.3): ALSH selection over the reconstructed sketch filters, then the sketch chain on
the active output channels only. References: the sketch layer (the same factors: orthonormal bases of the stacked
random matrices' row spaces, scale g = 1/sqrt(m), every init), an ALSH layer holding the reconstructed weight and
the same hyperplanes, and eq. 1 written out (tests/test_sketch_layers.py) times the active-set mask."""

import copy
import dataclasses
import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tritonslide
from tests.test_sketch_layers import eq1_reference, one_thread, run_with_grads  # noqa: F401 (autouse fixture)
from tests.tolerances import assert_close
from tritonslide.configs import ALSHConfig as _ALSHConfig
from tritonslide.configs import MILFConfig, SketchConfig
from tritonslide.nn import ALSHConv2d, MILFConv2d, SketchConv2d


def ALSHConfig(**kwargs):  # noqa: N802 - the config class with this module's default
    """These tests check the thesis' per-batch algorithm (Feeney 2019, Alg. 4-6) against batch-wide references, so
    their layers choose per batch; per-sample selection (the default since issue #15) is tested in
    tests/test_sample_selection.py and tests/test_ops_sample_conv2d.py."""
    return _ALSHConfig(**{"selection": "batch", **kwargs})

ALL_ACTIVE = ALSHConfig(bits=2, top_buckets=4)
PARTIAL = ALSHConfig(tables=3, bits=4, top_buckets=2)
SKETCHES = [SketchConfig(k=16, pairs=1, mode="output", distribution="uniform"),  # MILFConfig's default at k=16
            SketchConfig(k=3, pairs=2, mode="both", distribution="sign")]


def _run(layer, x, g):
    return run_with_grads(layer, x, lambda m, t: m(t), g)


@pytest.mark.parametrize("init", ["fit", "unbiased", "scratch"])
@pytest.mark.parametrize("sketch", SKETCHES, ids=lambda c: c.mode)
def test_all_active_equals_the_sketch_layer_with_the_same_sketches(sketch, init):
    """Every init sets MILF's factors as SketchConv2d's (scratch: the same global RNG state, the same draws)."""
    conv = nn.Conv2d(7, 13, 3, padding=1)
    sketch = dataclasses.replace(sketch, init=init)
    torch.manual_seed(3)
    milf = MILFConv2d.from_dense(conv, MILFConfig(sketch=sketch, alsh=ALL_ACTIVE), name="blk.1")
    torch.manual_seed(3)
    sk = SketchConv2d.from_dense(conv, sketch, name="blk.1")
    assert milf.bias is conv.bias and sk.bias is conv.bias
    for name in ("u1", "u2", "s1", "s2"):
        a, b = getattr(milf, name), getattr(sk, name)
        assert (a is None and b is None) or torch.equal(a, b), name
    x, g = torch.randn(3, 7, 9, 8), torch.randn(3, 13, 9, 8)
    y, dx, grads = _run(milf, x, g)
    y_ref, dx_ref, grads_ref = _run(sk, x, g)
    assert torch.equal(y, y_ref) and torch.equal(dx, dx_ref)
    assert grads.keys() == grads_ref.keys() and all(torch.equal(grads[n], grads_ref[n]) for n in grads)
    assert milf.stats().active_fraction == 1.0 and milf.param_count() == sk.param_count()


def _alsh_twin(milf: MILFConv2d) -> ALSHConv2d:
    """An ALSH layer with weight = the reconstructed weight and MILF's hyperplanes."""
    alsh = ALSHConv2d(milf.in_channels, milf.out_channels, milf.kernel_size, milf.stride, milf.padding,
                      milf.dilation, config=milf.config.alsh)
    with torch.no_grad():
        alsh.weight.copy_(milf.reconstructed_weight())
        alsh.planes.copy_(milf.planes)
        alsh.planes_extra.copy_(milf.planes_extra)
    alsh.rebuild_tables()
    return alsh


@pytest.mark.parametrize("sketch", SKETCHES, ids=lambda c: c.mode)
def test_active_set_output_and_gradients_match_masked_eq1(sketch):
    c, o, pairs = 6, 23, sketch.pairs
    conv = nn.Conv2d(c, o, (3, 2), stride=(1, 2), padding=1)
    milf = MILFConv2d.from_dense(conv, MILFConfig(sketch=sketch, alsh=PARTIAL), name="m")
    alsh = _alsh_twin(milf)
    assert torch.equal(milf.filter_codes, alsh.filter_codes)
    x = torch.randn(2, c, 9, 11)
    milf._publish = True  # keep the forward's active set for the check (what patch does for a linked producer)
    g = torch.randn(milf.output_shape(2, 9, 11))
    y, dx, grads = _run(milf, x, g)
    active = milf._published_active[0]  # (exact set, count, padded, compact)
    expected = alsh.select_active(tritonslide.ops.hash_histogram(x, alsh.planes, PARTIAL.bits, alsh.stride,
                                                                 alsh.padding, alsh.dilation))
    assert torch.equal(active, expected) and 0 < active.numel() < o
    mask = torch.zeros(o, dtype=torch.float64)
    mask[active] = 1
    ref = copy.deepcopy(milf).double()
    y_ref, dx_ref, grads_ref = _run_ref(ref, x.double(), g.double(), mask)
    assert_close(y, y_ref, torch.float32, reduction=c * 6 * milf._sketch_rank())
    assert_close(dx, dx_ref, torch.float32, reduction=o * 6 * milf._sketch_rank())
    for name in grads:
        assert_close(grads[name], grads_ref[name], torch.float32, reduction=2 * y.numel(), msg=name)
    inactive = mask == 0
    assert (y[:, inactive] == 0).all() and (grads["bias"][inactive] == 0).all()
    if milf.s2 is not None:  # the trainable B part: only active rows
        assert (grads["s2"][:, inactive] == 0).all() and (grads["s2"][:, ~inactive] != 0).any()
    # S1 (trainable A part) collects from all active outputs: dmat_4(S1_i) = g I_in^T G_act U1_i[:, act]^T, with
    # U1_i the block i of the orthonormal basis of the stacked U1's row space and g = 1/sqrt(m)
    scale = 1 / math.sqrt(2 if sketch.mode == "both" else 1)
    i_in = F.unfold(x.double(), (3, 2), padding=1, stride=(1, 2)).transpose(1, 2).reshape(-1, c * 6)
    g_act = (g.double() * mask.view(1, -1, 1, 1)).flatten(2).transpose(1, 2).reshape(-1, o)
    for i in range(pairs):
        formula = scale * i_in.T @ g_act @ milf.u1[i].double().T  # (d2 h w, k)
        assert_close(grads["s1"][i].T, formula, torch.float32, reduction=g_act.shape[0] * o)


def _run_ref(layer, x, g, mask):
    """Eq. 1 written out (dense convs on the explicit kernels) times the 0/1 mask of the active set."""
    return run_with_grads(layer, x, lambda m, t: eq1_reference(m, t) * mask.view(1, -1, 1, 1), g)


def test_rebuild_tables_follows_trained_sketches():
    conv = nn.Conv2d(5, 20, 3, padding=1)
    milf = MILFConv2d.from_dense(conv, MILFConfig(alsh=ALSHConfig(tables=2, bits=3, rebuild_every=2)))
    before = milf.filter_codes.clone()
    with torch.no_grad():
        milf.s1.mul_(-1)  # negates every reconstructed filter: each bit of the w part flips
    assert torch.equal(milf.filter_codes, before)
    x = torch.randn(2, 5, 6, 6)
    milf(x)
    milf(x)
    assert torch.equal(milf.filter_codes, before)  # steps 0 and 1 used the old tables
    milf(x)  # step 2 rebuilds first
    assert torch.equal(milf.filter_codes, _alsh_twin(milf).filter_codes)
    assert not torch.equal(milf.filter_codes, before)
    with torch.no_grad():
        milf.s1.mul_(3)
    assert tritonslide.rebuild_tables(nn.Sequential(milf)) == 1
    assert torch.equal(milf.filter_codes, _alsh_twin(milf).filter_codes)


def test_construction_from_scratch_macs_and_empty_batches():
    milf = MILFConv2d(4, 30, 3, padding=1, config=MILFConfig(sketch=SketchConfig(k=5, mode="both")), seed=3)
    assert torch.equal(milf.filter_codes, _alsh_twin(milf).filter_codes)  # __init__ hashed the initial sketches
    assert milf.param_count() == 5 * 9 * (4 + 30) + 30
    assert milf(torch.randn(0, 4, 5, 5)).shape == (0, 30, 5, 5) and milf.stats().calls == 0
    x = torch.randn(4, 5, 5)
    y = milf(x)
    assert y.shape == (30, 5, 5)
    o_act, c_read = milf.last_active_counts
    r = 5 * (1 + 9)
    assert milf.macs(5, 5) == (3 * 5 * c_read * 9 + r * 4 * 9 + o_act * r) * 25
    assert milf.dense_macs(5, 5) == 30 * 4 * 9 * 25
    m64 = copy.deepcopy(milf).to(torch.float64)
    assert m64.s1.dtype == m64.u2.dtype == m64.planes.dtype == torch.float64
    assert m64(torch.randn(2, 4, 5, 5, dtype=torch.float64)).dtype == torch.float64
    with pytest.raises(TypeError, match="MILFConfig"):
        MILFConv2d(4, 30, 3, config=SketchConfig())
    with pytest.raises(ValueError, match="groups=2"):
        MILFConv2d.from_dense(nn.Conv2d(4, 30, 3, groups=2))


def bn_model():
    """MILF layers separated by BatchNorm (not zero-preserving): patch links none of them. Every converted conv has
    more outputs (40, 48) than MILFConfig's default sketch width (k = 32), so that its sketch is smaller."""
    return nn.Sequential(
        nn.Conv2d(3, 24, 3, padding=1), nn.ReLU(),
        nn.Sequential(nn.Conv2d(24, 40, 3, padding=1), nn.BatchNorm2d(40), nn.ReLU(),
                      nn.Conv2d(40, 48, 3, padding=1), nn.BatchNorm2d(48), nn.ReLU()),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(48, 10),
    )


CFG = MILFConfig(sketch=SketchConfig(k=6, pairs=1, mode="output", distribution="uniform", seed=1),
                 alsh=ALSHConfig(tables=2, bits=3, top_buckets=3, seed=2))


def test_patch_unpatch_state_dict_and_bad_input():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is left dense, nothing is kept
        net = tritonslide.patch(bn_model(), "milf")
    assert type(net[0]) is nn.Conv2d and type(net[5]) is nn.Linear  # first conv and linears stay dense
    assert isinstance(net[2][0], MILFConv2d) and isinstance(net[2][3], MILFConv2d) and net[2][3]._name == "2.3"
    assert tritonslide.link_active_sets(net) == []
    net = tritonslide.patch(bn_model(), CFG)
    before = dict(net.named_modules())
    tritonslide.patch(net, CFG)
    assert dict(net.named_modules()) == before
    x = torch.randn(3, 3, 8, 8)
    net.eval()
    y = net(x)
    assert set(tritonslide.stats(net)) == {"2.0", "2.3"}
    # state_dict round trip into a freshly patched copy (different dense weights before the load)
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    fresh = tritonslide.patch(bn_model(), CFG).eval()
    assert not torch.equal(fresh[2][0].s1, net[2][0].s1)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf))
    assert torch.equal(fresh(x), y)
    other = tritonslide.patch(bn_model(), MILFConfig(sketch=CFG.sketch, alsh=ALSHConfig(tables=2, bits=3, seed=2)))
    with pytest.raises(ValueError, match=r"MILFConv2d '2.0'.*saved with config.*top_buckets"):
        other.load_state_dict(net.state_dict(), strict=False)
    with pytest.raises(ValueError, match=r"MILFConv2d '2.3': expected 40 input channels"):
        net[2][3](torch.randn(1, 24, 5, 5))
    with pytest.raises(TypeError, match=r"MILFConv2d '2.3': expected a torch.float32 input"):
        net[2][3](torch.randn(1, 40, 5, 5, dtype=torch.float64))
    # unpatch: dense convs with the reconstructed weights (outputs compared in the all-active test below)
    recon = net[2][0].reconstructed_weight().detach()
    tritonslide.unpatch(net)
    assert not any(isinstance(m, MILFConv2d) for m in net.modules()) and not tritonslide.stats(net)
    torch.testing.assert_close(net[2][0].weight.detach(), recon)


def test_unpatch_of_all_active_model_reproduces_its_outputs():
    net = tritonslide.patch(bn_model(), MILFConfig(sketch=CFG.sketch, alsh=ALL_ACTIVE)).eval()
    x = torch.randn(2, 3, 8, 8)
    y = net(x)
    tritonslide.unpatch(net)
    torch.testing.assert_close(net(x), y, rtol=1e-4, atol=1e-5)


def relu_model():
    return nn.Sequential(
        nn.Conv2d(3, 24, 3, padding=1), nn.ReLU(),
        nn.Conv2d(24, 40, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(40, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 28, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.LazyLinear(5),
    )


def test_patch_links_consecutive_milf_layers_and_sharing_is_exact():
    """Last-active-set sharing (ALSH Alg. 6) between MILF layers: the linked model equals the unlinked one,
    forward and every gradient, and the consumers hash fewer input channels."""
    base = relu_model()
    base(torch.randn(1, 3, 8, 8))
    # a fresh model: init="auto" resolves to "scratch", whose sketches are drawn from the global RNG; the two copies
    # are compared, so both patches start from the same RNG state
    torch.manual_seed(7)
    linked = tritonslide.patch(copy.deepcopy(base), CFG)
    no_share = MILFConfig(sketch=CFG.sketch, alsh=ALSHConfig(tables=2, bits=3, top_buckets=3, seed=2,
                                                            share_active_set=False))
    torch.manual_seed(7)
    unlinked = tritonslide.patch(copy.deepcopy(base), no_share)
    assert linked[2].config.sketch.init == unlinked[2].config.sketch.init == "scratch"
    assert tritonslide.link_active_sets(linked) == [("2", "5"), ("5", "7")]
    assert tritonslide.link_active_sets(unlinked) == []
    assert all(torch.equal(linked[i].s1, unlinked[i].s1) and torch.equal(linked[i].planes, unlinked[i].planes)
               for i in (2, 5, 7))  # same names and seeds: the same sketches and hyperplanes
    x = torch.randn(4, 3, 8, 8)
    y1, y2 = linked(x), unlinked(x)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-6)
    assert linked[5].last_active_counts[1] < 40 and unlinked[5].last_active_counts[1] == 40
    y1.square().sum().backward()
    y2.square().sum().backward()
    for (name, p1), p2 in zip(linked.named_parameters(), unlinked.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_channels_last_and_state_dict_across_inits():
    """``to(memory_format=torch.channels_last)`` leaves the factors alone and a channels_last input gives a
    channels_last output equal to the NCHW one (same active set, same gradients); a state_dict of a fit layer
    loads into a scratch one (``init`` is not part of the saved config check) and gives the same outputs."""
    conv = nn.Conv2d(6, 23, 3, padding=1)
    cfg = MILFConfig(sketch=dataclasses.replace(SKETCHES[1], init="fit"), alsh=PARTIAL)
    milf = MILFConv2d.from_dense(conv, cfg, name="m")
    milf._publish = True  # keep each forward's active set for the check
    x, g = torch.randn(2, 6, 9, 11), torch.randn(2, 23, 9, 11)
    y, dx, grads = _run(milf, x, g)
    active = milf._published_active[0]  # (exact set, count, padded, compact)
    before = {n: t.clone() for n, t in milf.state_dict().items() if isinstance(t, torch.Tensor)}
    assert milf.to(memory_format=torch.channels_last) is milf
    assert all(torch.equal(t, milf.state_dict()[n]) for n, t in before.items())
    cl = torch.channels_last
    y_cl, dx_cl, grads_cl = _run(milf, x.to(memory_format=cl), g.to(memory_format=cl))
    assert torch.equal(milf._published_active[0], active) and 0 < active.numel() < 23
    assert y_cl.is_contiguous(memory_format=cl)
    torch.testing.assert_close(y_cl, y, rtol=1e-6, atol=1e-6)
    assert_close(dx_cl, dx, torch.float32, reduction=23 * 9 * milf._sketch_rank())
    for name in grads:
        assert_close(grads_cl[name], grads[name], torch.float32, reduction=2 * y.numel(), msg=name)
    scratch_cfg = MILFConfig(sketch=dataclasses.replace(cfg.sketch, init="scratch"), alsh=PARTIAL)
    scratch = MILFConv2d.from_dense(nn.Conv2d(6, 23, 3, padding=1), scratch_cfg, name="m")
    assert not torch.equal(scratch.s1, milf.s1)
    scratch.load_state_dict(milf.state_dict())
    with torch.no_grad():
        assert torch.equal(scratch(x), milf(x))
        assert torch.equal(scratch.filter_codes, milf.filter_codes)
