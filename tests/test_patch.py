"""patch / unpatch, last-active-set sharing, rebuild_tables, stats, TrainAndReplace."""

import copy
import io
import warnings

import pytest
import torch
from torch import nn

import tritonslide
from tritonslide import ALSHConfig
from tritonslide.nn import ALSHConv2d


def small_cnn(bn: bool = False) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 12, 3, padding=1), nn.ReLU(),
        nn.Conv2d(12, 20, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(20, 18, 3, padding=1), nn.BatchNorm2d(18) if bn else nn.Identity(), nn.ReLU(),
        nn.Conv2d(18, 14, 3, padding=1), nn.Dropout2d(0.0), nn.LeakyReLU(),
        nn.Flatten(), nn.LazyLinear(5),
    )


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.ModuleDict({"block": nn.Sequential(nn.Conv2d(8, 10, 3, padding=1), nn.ReLU(),
                                                          nn.Conv2d(10, 9, 3, padding=1))})
        self.head = nn.Conv2d(9, 4, 1)

    def forward(self, x):
        return self.head(torch.relu(self.body["block"](self.stem(x))))


def test_default_patch_keeps_first_conv_dense_and_returns_model():
    model = small_cnn()
    patched = tritonslide.patch(model)
    assert patched is model
    assert type(model[0]) is nn.Conv2d
    assert [type(model[i]) for i in (2, 5, 8)] == [ALSHConv2d] * 3
    assert model[2].weight.shape == (20, 12, 3, 3)


def test_patch_twice_changes_nothing():
    model = tritonslide.patch(small_cnn())
    model(torch.randn(2, 3, 8, 8))
    before_modules = dict(model.named_modules())
    before_state = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    links_before = tritonslide.link_active_sets(model)
    tritonslide.patch(model)
    assert dict(model.named_modules()) == before_modules
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before_state.items())
    assert tritonslide.link_active_sets(model) == links_before
    hooks = [h for h in model._forward_pre_hooks.values()]
    assert len(hooks) == 1


def test_filter_fn_nested_models_and_names():
    model = Nested()
    seen = []
    tritonslide.patch(model, "alsh", filter_fn=lambda m, fqn: seen.append(fqn) or fqn != "head")
    assert seen == ["stem", "body.block.0", "body.block.2", "head"]
    assert isinstance(model.stem, ALSHConv2d) and type(model.head) is nn.Conv2d
    assert isinstance(model.body["block"][2], ALSHConv2d)
    assert model.body["block"][2]._name == "body.block.2"
    assert tritonslide.link_active_sets(model) == [("body.block.0", "body.block.2")]
    assert model(torch.randn(2, 3, 6, 6)).shape == (2, 4, 6, 6)
    default = tritonslide.patch(Nested())
    assert type(default.stem) is nn.Conv2d and isinstance(default.head, ALSHConv2d)


def test_unconvertible_layers_listed_in_one_warning():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
        nn.ConvTranspose2d(4, 4, 3), nn.Conv2d(4, 6, 3),
    )
    with pytest.warns(UserWarning) as record:
        tritonslide.patch(model)
    assert len(record) == 1
    message = str(record[0].message)
    assert "3 layer(s) left dense" in message and "groups=2" in message and "reflect" in message
    assert "transposed" in message
    assert [type(m).__name__ for m in model] == ["Conv2d", "Conv2d", "Conv2d", "ConvTranspose2d", "ALSHConv2d"]


def test_bad_config_arguments():
    with pytest.raises(ValueError, match="unknown method 'slide'"):
        tritonslide.patch(small_cnn(), "slide")
    with pytest.raises(TypeError, match="config must be"):
        tritonslide.patch(small_cnn(), {"bits": 3})


def test_model_that_is_a_conv():
    conv = nn.Conv2d(3, 5, 3)
    layer = tritonslide.patch(conv, filter_fn=lambda m, n: True)
    assert isinstance(layer, ALSHConv2d) and layer.weight is conv.weight
    assert tritonslide.unpatch(layer).weight is conv.weight


def test_sharing_links_only_across_zero_preserving_modules():
    model = tritonslide.patch(small_cnn(bn=True))
    assert tritonslide.link_active_sets(model) == [("2", "5")]  # BatchNorm breaks 5 -> 8; 8 -> 12 ends in Linear
    model = tritonslide.patch(small_cnn(bn=False))
    assert tritonslide.link_active_sets(model) == [("2", "5"), ("5", "8")]
    no_share = tritonslide.patch(small_cnn(), ALSHConfig(share_active_set=False))
    assert tritonslide.link_active_sets(no_share) == []


def test_sharing_is_exact_and_reads_fewer_channels(monkeypatch):
    """Sharing only skips channels that are zero, so the linked model equals the unlinked one, forward and
    every gradient (Alg. 4 and 6 'compute the same thing'), while the consumers read fewer input channels."""
    torch.manual_seed(1)
    base = small_cnn()
    base(torch.randn(1, 3, 8, 8))  # materialize the LazyLinear
    # per batch here (the per-sample hand-off, each sample's own channels: tests/test_sample_selection.py)
    linked = tritonslide.patch(copy.deepcopy(base), ALSHConfig(selection="batch"))
    unlinked = tritonslide.patch(copy.deepcopy(base), ALSHConfig(share_active_set=False, selection="batch"))
    for m in (linked, unlinked):
        m[9].p = 0.0
    calls = []
    real = tritonslide.ops.active_conv2d

    def spy(x, weight, bias=None, out_idx=None, in_idx=None, *args, **kwargs):
        calls.append(None if in_idx is None else in_idx.numel())
        modes.append((kwargs.get("compact_input", False), kwargs.get("compact_output", False), x.shape[1]))
        return real(x, weight, bias, out_idx, in_idx, *args, **kwargs)

    modes = []

    monkeypatch.setattr(tritonslide.ops, "active_conv2d", spy)
    x = torch.randn(4, 3, 8, 8)
    y1, y2 = linked(x), unlinked(x)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-6)
    assert calls[0] is None and calls[1] is not None and calls[1] < 20 and calls[3:] == [None, None, None]
    # Alg. 6 inside the Sequential: 2 -> 5 -> 8 hand over compact activations; the unlinked model never does
    assert [m[:2] for m in modes[:3]] == [(False, True), (True, True), (True, False)]
    assert modes[1][2] == calls[1] and all(m[:2] == (False, False) for m in modes[3:])
    y1.square().sum().backward()
    y2.square().sum().backward()
    for (name, p1), p2 in zip(linked.named_parameters(), unlinked.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_stale_active_sets_are_never_read():
    model = tritonslide.patch(small_cnn())
    model(torch.randn(1, 3, 8, 8))
    x_other = torch.randn(2, 12, 8, 8).relu()
    model[2](x_other)  # publishes an active set that no consumer reads in this call
    x = torch.randn(3, 3, 8, 8)
    unlinked = copy.deepcopy(model)
    for m in unlinked.modules():
        if isinstance(m, ALSHConv2d):
            object.__setattr__(m, "_share_source", None)
            m._publish = False
    torch.testing.assert_close(model(x), unlinked(x), rtol=1e-5, atol=1e-6)
    # called on their own (outside the Sequential), linked layers return full-size outputs
    assert model[2](x_other).shape == (2, 20, 8, 8) and model[5](torch.randn(2, 20, 8, 8)).shape == (2, 18, 8, 8)


def test_unpatch_restores_dense_layers_with_the_same_parameters():
    model = small_cnn()
    model(torch.randn(1, 3, 8, 8))
    weights = [m.weight for m in model if isinstance(m, nn.Conv2d)]
    tritonslide.patch(model, ALSHConfig(bits=2, top_buckets=4))
    x = torch.randn(2, 3, 8, 8)
    y_patched = model.eval()(x)
    tritonslide.unpatch(model)
    assert all(type(m) is not ALSHConv2d for m in model.modules())
    assert [m.weight for m in model if isinstance(m, nn.Conv2d)] == weights
    assert not model._forward_pre_hooks
    torch.testing.assert_close(model(x), y_patched, rtol=0, atol=1e-5)


def test_state_dict_round_trip_into_a_fresh_patched_copy():
    torch.manual_seed(2)
    model = small_cnn()
    model(torch.randn(1, 3, 8, 8))
    tritonslide.patch(model, ALSHConfig(seed=4))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(torch.randn(8, 3, 8, 8)).sum().backward()
    opt.step()
    tritonslide.rebuild_tables(model)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    fresh = small_cnn()
    fresh(torch.randn(1, 3, 8, 8))
    tritonslide.patch(fresh, ALSHConfig(seed=4))
    assert not torch.equal(fresh[2].weight, model[2].weight)  # the load must bring weights and tables
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf))
    x = torch.randn(5, 3, 8, 8)
    model.eval()
    fresh.eval()
    assert torch.equal(model(x), fresh(x))
    saved, loaded = model.state_dict(), fresh.state_dict()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved if isinstance(saved[k], torch.Tensor))


def test_state_dict_from_a_different_config_is_rejected():
    model = tritonslide.patch(small_cnn(), ALSHConfig(top_buckets=3))
    state = model.state_dict()
    other = tritonslide.patch(small_cnn(), ALSHConfig(top_buckets=4))
    with pytest.raises(ValueError, match=r"ALSHConv2d '2'.*saved with config.*top_buckets"):
        other.load_state_dict(state, strict=False)
    other_bits = tritonslide.patch(small_cnn(), ALSHConfig(bits=4))
    with pytest.raises((ValueError, RuntimeError)):
        other_bits.load_state_dict(state)
    dense = small_cnn()
    dense(torch.randn(1, 3, 8, 8))
    with pytest.raises(RuntimeError, match="Missing key"):  # a dense checkpoint lacks the tables
        tritonslide.patch(small_cnn()).load_state_dict(dense.state_dict())


def test_deepcopy_keeps_links_inside_the_copy():
    model = tritonslide.patch(small_cnn())
    clone = copy.deepcopy(model)
    assert clone[5]._share_source is clone[2]
    assert tritonslide.link_active_sets(clone) == [("2", "5"), ("5", "8")]


def test_rebuild_tables_and_stats():
    model = tritonslide.patch(small_cnn())
    assert tritonslide.rebuild_tables(model) == 3
    model(torch.randn(2, 3, 8, 8))
    st = tritonslide.stats(model)
    assert set(st) == {"2", "5", "8"}
    for s in st.values():
        assert s.calls == 1 and 0 < s.active_fraction <= 1 and s.bucket_max >= 0 and s.bucket_std >= 0
        assert s.mean_bucket_sizes.shape == (3, 32)
    tritonslide.reset_stats(model)
    assert all(s.calls == 0 for s in tritonslide.stats(model).values())


def test_train_and_replace_deepest_first_every_gap_epochs():
    model = small_cnn()
    model(torch.randn(1, 3, 8, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = tritonslide.TrainAndReplace(model, ALSHConfig(), gap=2)
    assert schedule.remaining() == ["8", "5", "2"]
    replaced = []
    for epoch in range(1, 8):
        replaced.append(schedule.step())
        model(torch.randn(4, 3, 8, 8)).sum().backward()
        opt.step()  # the optimizer still holds the (reused) Parameters
        opt.zero_grad()
    assert replaced == [None, "8", None, "5", None, "2", None]
    assert type(model[0]) is nn.Conv2d and all(isinstance(model[i], ALSHConv2d) for i in (2, 5, 8))
    assert tritonslide.link_active_sets(model) == [("2", "5"), ("5", "8")]
    with pytest.raises(ValueError, match="gap"):
        tritonslide.TrainAndReplace(model, gap=0)


def test_training_updates_only_active_filters():
    model = tritonslide.patch(small_cnn())
    model(torch.randn(1, 3, 8, 8))
    before = model[5].weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(torch.randn(4, 3, 8, 8)).sum().backward()
    active = model[5]._published_active
    changed = (model[5].weight.grad.flatten(1).abs().sum(1) > 0)
    opt.step()
    assert changed.sum() < 20 and torch.equal(model[5].weight[~changed], before[~changed])
    assert active is None  # consumed by layer 8 during the forward
