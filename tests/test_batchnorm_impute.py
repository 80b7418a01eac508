"""ImputedBatchNorm2d: BatchNorm after an ALSH / MILF layer imputes the channels the layer did not compute (planes
that are zero everywhere) by their mean: statistics over the computed planes only, ``beta`` on the others.

The reference is a plain loop over channels in float64: each channel's computed values gathered into one vector,
its mean and (biased) variance, the running statistics updated by PyTorch's rule; autograd through the loop gives
the reference gradients.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tritonslide
from tests.tolerances import assert_close
from tritonslide import ALSHConfig
from tritonslide.nn import ALSHConv2d, ImputedBatchNorm2d, ImputedSyncBatchNorm


def loop_reference(x, weight, bias, running_mean, running_var, eps, momentum, training, sample_fraction=0.5):
    """(y, new_running_mean, new_running_var) by a loop over channels; not-computed planes (all zero) give bias. A
    channel computed in fewer than ``sample_fraction`` of the samples is normalized with the running statistics,
    which its values still update."""
    n, c = x.shape[:2]
    ys = []
    new_mean = None if running_mean is None else running_mean.clone()
    new_var = None if running_var is None else running_var.clone()
    for ch in range(c):
        computed = [i for i in range(n) if bool((x[i, ch] != 0).any())]
        vals = torch.cat([x[i, ch].reshape(-1) for i in computed]) if computed else x.new_zeros(0)
        if training and running_mean is not None and vals.numel() >= 2:
            new_mean[ch] = (1 - momentum) * running_mean[ch] + momentum * vals.detach().mean()
            new_var[ch] = (1 - momentum) * running_var[ch] + momentum * vals.detach().var(unbiased=True)
        if running_mean is None or (training and vals.numel() >= 2 and len(computed) >= sample_fraction * n):
            mean = vals.mean()
            var = ((vals - mean) ** 2).mean()
        else:  # eval, or too few computed values or samples in training: the running statistics
            mean, var = running_mean[ch], running_var[ch]
        planes = []
        for i in range(n):
            if i in computed:
                planes.append((x[i, ch] - mean) / torch.sqrt(var + eps) * weight[ch] + bias[ch])
            else:
                planes.append(bias[ch].expand_as(x[i, ch]))
        ys.append(torch.stack(planes))
    return torch.stack(ys, 1), new_mean, new_var


def sparse_input(shape, seed, dtype=torch.float64):
    """Random values with whole planes zeroed: per channel a different number of computed samples (0, 1, 2, some,
    all), as after per-sample ALSH sets."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    n, c = shape[:2]
    keep = torch.rand(n, c, generator=g) < 0.5
    keep[:, 0] = False  # a channel no sample computed
    keep[:, 1] = True  # a channel every sample computed
    keep[:, 2] = False
    keep[1, 2] = True  # one computed sample
    keep[:, 3] = False
    keep[0, 3] = keep[2, 3] = True  # two: a channel under half of the batch, with 2 values even on 1x1 planes
    return (x * keep[:, :, None, None]).to(dtype)


def imputed(c, seed=0, momentum=0.1):
    torch.manual_seed(seed)
    bn = nn.BatchNorm2d(c, momentum=momentum).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
    return ImputedBatchNorm2d.from_batchnorm(bn, "test.bn")


@pytest.mark.parametrize("shape", [(5, 7, 6, 5), (9, 6, 1, 1), (4, 5, 3, 7)])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("fraction", [0.5, 0.0, 0.9])
def test_matches_loop_reference_forward_and_gradients(shape, training, fraction):
    mod = imputed(shape[1], seed=1)
    mod.train(training)
    mod.min_sample_fraction = fraction
    x = sparse_input(shape, seed=2)
    samples = (x != 0).flatten(2).any(2).sum(0)
    rare = (samples >= 1) & (samples * shape[2] * shape[3] >= 2) & (samples < fraction * shape[0])
    assert bool(rare.any()) == (fraction > 0), samples  # channels that update the running statistics only
    mean0, var0 = mod.running_mean.clone(), mod.running_var.clone()
    xr = x.clone().requires_grad_(True)
    w, b = mod.weight.detach().clone().requires_grad_(True), mod.bias.detach().clone().requires_grad_(True)
    ref, ref_mean, ref_var = loop_reference(xr, w, b, mean0, var0, mod.eps, mod.momentum, training, fraction)
    xi = x.clone().requires_grad_(True)
    y = mod(xi)
    assert_close(y, ref)
    assert_close(mod.running_mean, ref_mean)
    assert_close(mod.running_var, ref_var)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (y * g).sum().backward()
    (ref * g).sum().backward()
    assert_close(xi.grad, xr.grad, reduction=shape[0] * shape[2] * shape[3])
    assert_close(mod.weight.grad, w.grad, reduction=shape[0] * shape[2] * shape[3])
    assert_close(mod.bias.grad, b.grad, reduction=shape[0] * shape[2] * shape[3])
    assert int(mod.num_batches_tracked) == (1 if training else 0)


@pytest.mark.parametrize("affine,track", [(False, True), (True, False), (False, False)])
def test_without_affine_or_running_statistics(affine, track):
    torch.manual_seed(4)
    bn = nn.BatchNorm2d(6, affine=affine, track_running_stats=track).double()
    mod = ImputedBatchNorm2d.from_batchnorm(bn, "plain")
    x = sparse_input((5, 6, 4, 3), seed=5)
    one, zero = torch.ones(6, dtype=torch.float64), torch.zeros(6, dtype=torch.float64)
    rm = None if not track else mod.running_mean.clone()
    rv = None if not track else mod.running_var.clone()
    xr, xi = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ref, _, _ = loop_reference(xr, one, zero, rm, rv, mod.eps, mod.momentum, True)
    y = mod(xi)
    assert_close(y, ref)
    g = torch.randn_like(x)
    (y * g).sum().backward()
    (ref * g).sum().backward()
    assert_close(xi.grad, xr.grad, reduction=60)
    mod.eval()
    assert torch.isfinite(mod(x)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equals_batchnorm_when_every_plane_is_computed(dtype):
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(11).to(dtype)
    mod = ImputedBatchNorm2d.from_batchnorm(copy.deepcopy(bn))
    x = torch.randn(6, 11, 5, 3, dtype=dtype) + 0.5
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    for _ in range(3):  # three training steps: the running statistics follow the same path
        ya, yb = bn(xa), mod(xb)
        assert_close(yb, ya, reduction=90)
    g = torch.randn_like(x)
    (ya * g).sum().backward()
    (yb * g).sum().backward()
    assert_close(xb.grad, xa.grad, reduction=90)
    assert_close(mod.weight.grad, bn.weight.grad, reduction=90)
    assert_close(mod.bias.grad, bn.bias.grad, reduction=90)
    assert_close(mod.running_mean, bn.running_mean)
    assert_close(mod.running_var, bn.running_var)
    assert int(mod.num_batches_tracked) == int(bn.num_batches_tracked) == 3
    bn.eval()
    mod.eval()
    assert_close(mod(x), bn(x), reduction=90)  # eval, from running statistics equal up to rounding


def test_batch_inactive_channel_leaves_running_statistics():
    """The bug it fixes: a channel that a per-batch set left out of a whole batch is all zeros; plain BatchNorm
    pulls its running variance towards 0 (then divides the channel, active in eval, by too small a deviation)."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3)
    mod = ImputedBatchNorm2d.from_batchnorm(copy.deepcopy(bn))
    x = torch.randn(8, 3, 4, 4) * 3 + 1
    x[:, 1] = 0
    for _ in range(20):
        bn(x)
        mod(x)
    assert float(bn.running_var[1]) < 0.2  # plain: 0.9 ** 20 of the initial 1
    assert float(mod.running_var[1]) == 1.0 and float(mod.running_mean[1]) == 0.0
    assert abs(float(mod.running_var[0]) - float(bn.running_var[0])) < 1e-4  # computed channels as plain


def test_eval_imputes_beta_and_is_per_sample():
    mod = imputed(6, seed=3).eval()
    x = sparse_input((5, 6, 4, 4), seed=4)
    y = mod(x)
    zero = ~torch.any(x != 0, dim=(2, 3))
    assert torch.equal(y[zero], mod.bias.detach()[None, :, None, None].expand_as(y)[zero])
    plain = F.batch_norm(x, mod.running_mean, mod.running_var, mod.weight, mod.bias, False, 0.0, mod.eps)
    assert_close(y[~zero], plain[~zero])
    alone = torch.cat([mod(x[i:i + 1]) for i in range(5)])
    torch.testing.assert_close(alone, y, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_statistics_in_float32(dtype):
    mod = imputed(7, seed=5).float()
    x = sparse_input((6, 7, 5, 5), seed=6, dtype=torch.float32)
    ref = copy.deepcopy(mod)(x)
    y = mod.to(dtype)(x.to(dtype)) if dtype == torch.float16 else copy.deepcopy(mod)(x.to(dtype))
    assert y.dtype == dtype
    assert_close(y.float(), ref, dtype=dtype, reduction=150)


def test_channels_last_device_moves_and_state_dict():
    mod = imputed(6, seed=7).float()
    x = sparse_input((4, 6, 5, 5), seed=8, dtype=torch.float32)
    y = mod(x.contiguous(memory_format=torch.channels_last))
    assert y.is_contiguous(memory_format=torch.channels_last)
    keys = set(nn.BatchNorm2d(6).state_dict())
    assert set(mod.state_dict()) == keys
    moved = copy.deepcopy(mod).to(torch.float64)
    assert moved.running_var.dtype == torch.float64 and moved.weight.dtype == torch.float64


def test_bad_input_names_the_layer():
    mod = imputed(6)
    with pytest.raises(ValueError, match=r"ImputedBatchNorm2d test\.bn: expected an input of shape \(N, 6, H, W\)"):
        mod(torch.randn(2, 6, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="test.bn"):
        mod(torch.randn(2, 5, 3, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating-point"):
        mod(torch.ones(2, 6, 3, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="nn.BatchNorm2d"):
        ImputedBatchNorm2d.from_batchnorm(nn.BatchNorm1d(3))


def bn_cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 10, 3, padding=1), nn.BatchNorm2d(10), nn.ReLU(),
        nn.Conv2d(10, 14, 3, padding=1, bias=False), nn.BatchNorm2d(14), nn.ReLU(),
        nn.Conv2d(14, 9, 3, padding=1, bias=False), nn.BatchNorm2d(9), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(9, 4),
    )


def test_patch_pairs_shares_parameters_and_unpatch_restores():
    dense = bn_cnn()
    model = tritonslide.patch(copy.deepcopy(dense), ALSHConfig(bits=4, top_buckets=2))
    kinds = [type(m) for m in model]
    assert kinds[0] is nn.Conv2d and kinds[1] is nn.BatchNorm2d  # the first conv stays dense, so does its norm
    assert kinds[3] is ALSHConv2d and kinds[4] is ImputedBatchNorm2d and kinds[7] is ImputedBatchNorm2d
    assert model[4].layer_name == "4"
    assert set(model.state_dict()) >= set(dense.state_dict())
    model.load_state_dict(dense.state_dict(), strict=False)  # a dense checkpoint's norms load as they are
    weight = model[4].weight
    assert tritonslide.impute_batchnorms(model) == []  # patching twice changes nothing
    tritonslide.unpatch(model)
    assert type(model[4]) is nn.BatchNorm2d and model[4].weight is weight
    kept = tritonslide.patch(copy.deepcopy(dense), ALSHConfig(bits=4, top_buckets=2), batchnorm="keep")
    assert not any(isinstance(m, ImputedBatchNorm2d) for m in kept.modules())
    with pytest.raises(ValueError, match="batchnorm must be one of"):
        tritonslide.patch(copy.deepcopy(dense), batchnorm="drop")


def test_patched_model_trains_and_predicts_per_sample():
    """A per-batch training step, then eval per sample: the prediction of a sample alone equals its prediction
    inside the batch (BatchNorm in eval is per sample, and imputation reads only the sample's own planes)."""
    model = tritonslide.patch(bn_cnn(), ALSHConfig(bits=4, top_buckets=2, seed=1))
    g = torch.Generator().manual_seed(0)
    x, target = torch.randn(12, 3, 9, 11, generator=g), torch.randint(0, 4, (12,), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), target).backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        full = model(x)
        alone = torch.cat([model(x[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(alone, full[:4], rtol=1e-5, atol=1e-5)


def test_compiles_without_graph_break():
    mod = imputed(6).float()
    x = sparse_input((4, 6, 5, 5), seed=9, dtype=torch.float32)
    ref = copy.deepcopy(mod)(x)
    compiled = torch.compile(mod, backend="aot_eager", fullgraph=True)
    assert_close(compiled(x), ref, reduction=100)


def test_milf_layers_pair_too():
    from tritonslide import MILFConfig, SketchConfig
    from tritonslide.nn import MILFConv2d

    model = tritonslide.patch(bn_cnn(), MILFConfig(sketch=SketchConfig(k=4), alsh=ALSHConfig(bits=4, top_buckets=2)),
                              filter_fn=lambda module, name: name in ("3", "6"))
    assert isinstance(model[3], MILFConv2d) and isinstance(model[6], MILFConv2d)
    assert isinstance(model[4], ImputedBatchNorm2d) and isinstance(model[7], ImputedBatchNorm2d)
    x = torch.randn(6, 3, 8, 9)
    model(x).sum().backward()  # a training step through the imputing norms
    model.eval()
    with torch.no_grad():
        full, alone = model(x), torch.cat([model(x[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(alone, full[:3], rtol=1e-5, atol=1e-5)


def test_empty_batch():
    mod = imputed(5)
    empty = torch.zeros(0, 5, 4, 3, dtype=torch.float64)
    assert mod.eval()(empty).shape == empty.shape
    before = mod.running_var.clone()
    assert mod.train()(empty).shape == empty.shape  # no computed value: the running statistics stay
    torch.testing.assert_close(mod.running_var, before)


@pytest.mark.parametrize("training", [True, False])
def test_sync_form_in_one_process_is_the_plain_form(training):
    """Without a process group (or with one rank) ImputedSyncBatchNorm computes what ImputedBatchNorm2d does; its
    collectives are tested on two ranks in tests/test_distributed.py."""
    plain = imputed(7, seed=3).train(training)
    sync = ImputedSyncBatchNorm.from_batchnorm(nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(plain)
                                                                                       .to_batchnorm()), "s")
    sync.train(training)
    x = sparse_input((6, 7, 4, 5), seed=4)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    outs = [m(xi) for m, xi in zip((plain, sync), xs)]
    gy = torch.randn_like(x)
    for out in outs:
        (out * gy).sum().backward()
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=0, atol=0)
    torch.testing.assert_close(sync.weight.grad, plain.weight.grad, rtol=0, atol=0)
    torch.testing.assert_close(sync.running_var, plain.running_var, rtol=0, atol=0)
    assert set(sync.state_dict()) == set(nn.SyncBatchNorm(7).state_dict())
    with pytest.raises(TypeError, match="expected an nn.SyncBatchNorm, got BatchNorm2d"):
        ImputedSyncBatchNorm.from_batchnorm(nn.BatchNorm2d(3))
    with pytest.raises(ValueError, match=r"ImputedSyncBatchNorm s: expected an input of shape \(N, 7, H, W\)"):
        sync(torch.randn(2, 7, 5, dtype=torch.float64))


def test_patch_pairs_sync_batchnorm_and_convert_keeps_imputation():
    """A model converted to SyncBatchNorm before patch gets ImputedSyncBatchNorm after its ALSH layers;
    tritonslide.convert_sync_batchnorm after patch turns each ImputedBatchNorm2d into one (torch's function alone
    gives a plain SyncBatchNorm there) and every other BatchNorm into a plain SyncBatchNorm, the same Parameters and
    buffers; unpatch gives plain SyncBatchNorms back."""
    group = object()  # stands for a process group: only carried along, never used in one process
    config = ALSHConfig(bits=4, top_buckets=2)
    before = tritonslide.patch(nn.SyncBatchNorm.convert_sync_batchnorm(bn_cnn()), config)
    assert [type(before[i]) for i in (1, 4, 7)] == [nn.SyncBatchNorm, ImputedSyncBatchNorm, ImputedSyncBatchNorm]

    model = tritonslide.patch(bn_cnn(), config)
    weights = [model[i].weight for i in (1, 4, 7)]
    means = [model[i].running_mean for i in (1, 4, 7)]
    converted = tritonslide.convert_sync_batchnorm(model, group)
    assert [type(converted[i]) for i in (1, 4, 7)] == [nn.SyncBatchNorm, ImputedSyncBatchNorm, ImputedSyncBatchNorm]
    assert all(converted[i].weight is w and converted[i].running_mean is m
               for i, w, m in zip((1, 4, 7), weights, means))
    assert all(converted[i].process_group is group for i in (1, 4, 7))
    assert converted[4].layer_name == "4"
    kept = tritonslide.convert_sync_batchnorm(tritonslide.patch(bn_cnn(), config, batchnorm="keep"))
    assert [type(kept[i]) for i in (1, 4, 7)] == [nn.SyncBatchNorm] * 3  # "keep" stays kept
    single = tritonslide.convert_sync_batchnorm(ImputedBatchNorm2d.from_batchnorm(nn.BatchNorm2d(3)))
    assert type(single) is ImputedSyncBatchNorm

    tritonslide.unpatch(converted)
    assert [type(converted[i]) for i in (1, 4, 7)] == [nn.SyncBatchNorm] * 3
    assert converted[4].weight is weights[1] and converted[4].process_group is group


def test_channel_in_few_samples_is_normalized_by_running_statistics():
    """Per-sample sets: channel 0 computed in 2 of 8 samples on 1x1 planes (MobileNetV2's last layers at 16 px),
    with close values. Its batch variance (2.5e-9) would give gradients of hundreds; under min_sample_fraction
    (half) it is normalized with the running statistics, so its gradient is gy * gamma / sqrt(running_var + eps),
    while its batch statistics still update the running ones. Channel 1, computed in 4 of 8, uses its batch's."""
    x = torch.zeros(8, 2, 1, 1, dtype=torch.float64)
    x[0, 0], x[5, 0] = 1.0, 1.0001
    x[:4, 1, 0, 0] = torch.tensor([0.5, -1.0, 2.0, 0.3], dtype=torch.float64)
    gy = torch.linspace(-1, 1, 16, dtype=torch.float64).reshape(8, 2, 1, 1)
    grads = {}
    for fraction in (0.5, 0.0):
        mod = imputed(2, seed=5)
        mod.min_sample_fraction = fraction
        rm, rv = mod.running_mean.clone(), mod.running_var.clone()
        xi = x.clone().requires_grad_(True)
        (mod(xi) * gy).sum().backward()
        grads[fraction] = xi.grad
        torch.testing.assert_close(mod.running_mean[0], 0.9 * rm[0] + 0.1 * 1.00005)  # updated either way
        torch.testing.assert_close(mod.running_var[0], 0.9 * rv[0] + 0.1 * 5e-9)
    mod = imputed(2, seed=5)
    expected = gy[[0, 5], 0] * mod.weight[0].detach() / torch.sqrt(mod.running_var[0] + mod.eps)
    torch.testing.assert_close(grads[0.5][[0, 5], 0], expected)
    assert grads[0.0][[0, 5], 0].abs().max() > 100 * grads[0.5][[0, 5], 0].abs().max()
    torch.testing.assert_close(grads[0.5][:, 1], grads[0.0][:, 1])  # 4 of 8: batch statistics in both


class CatNet(nn.Module):
    """A dense stem and an ALSH conv whose output is concatenated with the stem's (DenseNet's pattern), then one
    BatchNorm over both, registered before the conv (so registration order cannot pair it)."""

    def __init__(self, branch_on_data=False):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8 + 12)
        self.conv = nn.Conv2d(8, 12, 3, padding=1)
        self.branch_on_data = branch_on_data

    def forward(self, x):
        h = F.relu(self.stem(x))
        if self.branch_on_data and x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            h = h * 1.0
        return self.norm(torch.cat([h, F.max_pool2d(F.relu(self.conv(h)), 3, 1, 1)], 1))


def test_data_flow_pairs_a_batchnorm_after_a_concatenation():
    config = ALSHConfig(bits=4, top_buckets=1, selection="batch")
    convert = {"filter_fn": lambda module, name: name == "conv"}
    model = tritonslide.patch(CatNet(), config, **convert)
    assert isinstance(model.conv, ALSHConv2d) and isinstance(model.norm, ImputedBatchNorm2d)
    assert model.norm.layer_name == "norm"
    assert tritonslide.impute_batchnorms(model) == []
    untraced = tritonslide.patch(CatNet(), config, **convert, batchnorm="keep")
    assert tritonslide.impute_batchnorms(untraced, trace=False) == []
    assert tritonslide.impute_batchnorms(untraced) == [("conv", "norm")]
    # the bug it avoids: a channel of the ALSH conv that the batch's set left out keeps its running statistics
    model.train()
    before = model.norm.running_var.clone()
    model(torch.randn(6, 3, 9, 10, generator=torch.Generator().manual_seed(0)))
    out, _ = model.conv.last_active_counts
    assert out < 12, "every filter active: the case shows nothing"
    moved = (model.norm.running_var != before)[8:]
    assert int(moved.sum()) == out  # the active ones only
    assert bool((model.norm.running_var != before)[:8].all())  # the stem's channels are always computed


def test_densenet_norms_after_concatenations_are_imputed():
    model = tritonslide.patch(tritonslide.models.densenet121(num_classes=10), ALSHConfig())
    norms = {name: m for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    plain = sorted(name for name, m in norms.items() if not isinstance(m, ImputedBatchNorm2d))
    # the stem's norm and the first layer's norm1 read the dense stem's output only
    assert plain == ["features.denseblock1.denselayer1.norm1", "features.norm0"], plain
    assert len(norms) == 121


def test_untraceable_model_is_paired_by_registration_order_with_a_warning():
    convert = {"filter_fn": lambda module, name: name == "conv"}
    with pytest.warns(UserWarning, match=r"torch.fx could not trace CatNet .*registration order only; 1 stay plain"):
        model = tritonslide.patch(CatNet(branch_on_data=True), ALSHConfig(bits=4, top_buckets=1), **convert)
    assert type(model.norm) is nn.BatchNorm2d
    model(torch.randn(2, 3, 8, 8))  # the model itself still runs
