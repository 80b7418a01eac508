"""tritonslide.models: torchvision's parameter counts, state_dict names and shapes, init, and forward wiring.

torchvision cannot be installed beside the CPU torch here, so the references are written out by hand: the
parameter counts torchvision reports for ``weights=None`` models, state_dict keys with their shapes, and plain
functional forwards (F.conv2d / F.batch_norm over the state_dict) for the residual, inverted-residual and dense
wirings. Counts, names and shape propagation run on the meta device, so the 130M-parameter VGGs cost no memory
or init time; real forwards run on small inputs.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tritonslide import models

# Parameter counts of torchvision's constructors with weights=None and default num_classes; resnet56 (not in
# torchvision) is the CIFAR network with option-B projections: 853,018 (option A, He et al. 2016) + 2,752.
PARAM_COUNTS = {
    "alexnet": 61_100_840,
    "vgg11": 132_863_336,
    "vgg11_bn": 132_868_840,
    "vgg16": 138_357_544,
    "vgg16_bn": 138_365_992,
    "resnet18": 11_689_512,
    "resnet56": 855_770,
    "mobilenet_v2": 3_504_872,
    "densenet121": 7_978_856,
}

# A few torchvision state_dict keys per model with their shapes (default num_classes, 3 input channels).
KNOWN_KEYS = {
    "alexnet": {
        "features.0.weight": (64, 3, 11, 11),
        "features.3.weight": (192, 64, 5, 5),
        "features.10.weight": (256, 256, 3, 3),
        "classifier.1.weight": (4096, 9216),
        "classifier.4.weight": (4096, 4096),
        "classifier.6.weight": (1000, 4096),
    },
    "vgg11": {
        "features.0.weight": (64, 3, 3, 3),
        "features.18.weight": (512, 512, 3, 3),
        "classifier.0.weight": (4096, 25088),
        "classifier.3.weight": (4096, 4096),
        "classifier.6.bias": (1000,),
    },
    "vgg11_bn": {
        "features.1.running_mean": (64,),
        "features.25.weight": (512, 512, 3, 3),
        "features.26.num_batches_tracked": (),
        "classifier.6.weight": (1000, 4096),
    },
    "vgg16": {
        "features.2.weight": (64, 64, 3, 3),
        "features.28.weight": (512, 512, 3, 3),
        "classifier.0.weight": (4096, 25088),
    },
    "vgg16_bn": {
        "features.40.weight": (512, 512, 3, 3),
        "features.41.running_var": (512,),
        "classifier.6.weight": (1000, 4096),
    },
    "resnet18": {
        "conv1.weight": (64, 3, 7, 7),
        "bn1.running_mean": (64,),
        "layer1.0.conv1.weight": (64, 64, 3, 3),
        "layer2.0.downsample.0.weight": (128, 64, 1, 1),
        "layer2.0.downsample.1.running_var": (128,),
        "layer4.1.bn2.weight": (512,),
        "fc.weight": (1000, 512),
    },
    "resnet56": {
        "conv1.weight": (16, 3, 3, 3),
        "layer1.8.conv2.weight": (16, 16, 3, 3),
        "layer2.0.downsample.0.weight": (32, 16, 1, 1),
        "layer3.0.downsample.1.weight": (64,),
        "layer3.8.bn2.weight": (64,),
        "fc.weight": (10, 64),
    },
    "mobilenet_v2": {
        "features.0.0.weight": (32, 3, 3, 3),
        "features.0.1.weight": (32,),
        "features.1.conv.0.0.weight": (32, 1, 3, 3),
        "features.1.conv.1.weight": (16, 32, 1, 1),
        "features.1.conv.2.running_mean": (16,),
        "features.2.conv.0.0.weight": (96, 16, 1, 1),
        "features.2.conv.1.0.weight": (96, 1, 3, 3),
        "features.17.conv.2.weight": (320, 960, 1, 1),
        "features.17.conv.3.weight": (320,),
        "features.18.0.weight": (1280, 320, 1, 1),
        "classifier.1.weight": (1000, 1280),
    },
    "densenet121": {
        "features.conv0.weight": (64, 3, 7, 7),
        "features.norm0.running_mean": (64,),
        "features.denseblock1.denselayer1.conv1.weight": (128, 64, 1, 1),
        "features.denseblock1.denselayer1.conv2.weight": (32, 128, 3, 3),
        "features.denseblock1.denselayer6.norm1.weight": (224,),
        "features.transition1.conv.weight": (128, 256, 1, 1),
        "features.transition3.conv.weight": (512, 1024, 1, 1),
        "features.denseblock4.denselayer16.conv2.weight": (32, 128, 3, 3),
        "features.norm5.weight": (1024,),
        "classifier.weight": (1000, 1024),
    },
}

# Keys torchvision's models do not have: resnet56 has no shortcut projection in layer1 and no fourth stage.
ABSENT_KEYS = {
    "resnet56": ["layer1.0.downsample.0.weight", "layer4.0.conv1.weight"],
    "resnet18": ["layer1.0.downsample.0.weight"],
    "mobilenet_v2": ["features.1.conv.3.weight", "features.19.0.weight"],
    "densenet121": ["features.transition4.conv.weight", "features.denseblock1.denselayer7.conv1.weight"],
}

FIRST_CONV = {
    "alexnet": "features.0.weight",
    "vgg11": "features.0.weight",
    "vgg11_bn": "features.0.weight",
    "vgg16": "features.0.weight",
    "vgg16_bn": "features.0.weight",
    "resnet18": "conv1.weight",
    "resnet56": "conv1.weight",
    "mobilenet_v2": "features.0.0.weight",
    "densenet121": "features.conv0.weight",
}

ALL = sorted(PARAM_COUNTS)


def _meta(name: str, **kwargs) -> nn.Module:
    """The model with meta tensors: names, shapes and shape propagation without allocating or initialising."""
    with torch.device("meta"):
        return models.get_model(name, **kwargs)


def test_registry_lists_every_model():
    assert models.available_models() == ALL
    assert sorted(models.MODELS) == ALL
    assert sorted(models.MIN_INPUT_SIZE) == ALL


@pytest.mark.parametrize("name", ALL)
def test_parameter_count_matches_torchvision(name):
    assert sum(p.numel() for p in _meta(name).parameters()) == PARAM_COUNTS[name]


@pytest.mark.parametrize("name", ALL)
def test_known_state_dict_keys_and_shapes(name):
    state = _meta(name).state_dict()
    for key, shape in KNOWN_KEYS[name].items():
        assert key in state, key
        assert tuple(state[key].shape) == shape, key
    for key in ABSENT_KEYS.get(name, []):
        assert key not in state, key


@pytest.mark.parametrize("name", ALL)
def test_in_channels_changes_only_the_first_conv(name):
    rgb = {k: tuple(v.shape) for k, v in _meta(name).state_dict().items()}
    gray = {k: tuple(v.shape) for k, v in _meta(name, in_channels=1).state_dict().items()}
    assert rgb.keys() == gray.keys()
    changed = [k for k in rgb if rgb[k] != gray[k]]
    assert changed == [FIRST_CONV[name]]
    assert gray[FIRST_CONV[name]][1] == 1


@pytest.mark.parametrize("name", ALL)
def test_min_input_size_is_tight(name):
    # also checks that num_classes sets the output width
    size = models.min_input_size(name)
    model = _meta(name, num_classes=4)
    assert tuple(model(torch.empty(2, 3, size, size, device="meta")).shape) == (2, 4)
    with pytest.raises(RuntimeError):
        model(torch.empty(2, 3, size - 1, size - 1, device="meta"))


@pytest.fixture(scope="module")
def vgg11_bn():
    # built once: the 4096 x 25088 classifier makes a real VGG cost ~3 s of init on 2 cores
    return models.vgg11_bn(num_classes=10)


# Real forwards: one model per family, smallest input the model allows (AlexNet needs 63x63, see its docstring).
@pytest.mark.parametrize(
    "name, size",
    [("alexnet", 63), ("vgg11_bn", 32), ("resnet18", 64), ("resnet56", 32), ("mobilenet_v2", 64), ("densenet121", 64)],
)
def test_forward_is_finite(name, size, request):
    model = request.getfixturevalue("vgg11_bn") if name == "vgg11_bn" else models.get_model(name, num_classes=10)
    for mode in (model.train, model.eval):
        mode()
        with torch.no_grad():
            out = model(torch.randn(2, 3, size, size))
        assert out.shape == (2, 10)
        assert torch.isfinite(out).all()


def test_vgg_init_follows_torchvision(vgg11_bn):
    model = vgg11_bn
    conv = model.features[15]  # 256 -> 512, fan_out = 512 * 9
    assert isinstance(conv, nn.Conv2d)
    # kaiming_normal_(fan_out, relu): std = sqrt(2 / fan_out); 1.2M samples put the estimate within 1%.
    assert conv.weight.std().item() == pytest.approx((2 / (512 * 9)) ** 0.5, rel=0.02)
    assert torch.count_nonzero(conv.bias) == 0
    bn = model.features[16]
    assert isinstance(bn, nn.BatchNorm2d)
    assert torch.all(bn.weight == 1) and torch.count_nonzero(bn.bias) == 0
    fc = model.classifier[0]
    assert fc.weight.std().item() == pytest.approx(0.01, rel=0.01)
    assert torch.count_nonzero(fc.bias) == 0


def test_zero_init_residual_makes_blocks_start_as_identity():
    plain = models.resnet18(num_classes=10)
    assert all(torch.count_nonzero(m.bn2.weight) > 0 for m in plain.modules() if isinstance(m, models.BasicBlock))
    model = models.resnet56(zero_init_residual=True).eval()
    blocks = [m for m in model.modules() if isinstance(m, models.BasicBlock)]
    assert len(blocks) == 27
    assert all(torch.count_nonzero(b.bn2.weight) == 0 for b in blocks)
    x = torch.randn(2, 16, 8, 8).relu()
    with torch.no_grad():
        assert torch.equal(blocks[1](x), x)  # identity shortcut, residual branch silenced


def test_one_channel_digits_train_step():
    model = models.resnet56(in_channels=1)
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 3, 7, 9])
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.conv1.weight.grad.abs().sum() > 0


def test_get_model_errors_and_kwargs():
    with pytest.raises(ValueError, match="available: alexnet, densenet121"):
        models.get_model("resnet50")
    with pytest.raises(ValueError, match="unknown model"):
        models.min_input_size("vgg19")
    with pytest.raises(TypeError):
        models.get_model("resnet56", zero_init_residual=True, width_mult=2.0)
    assert _meta("resnet18", num_classes=3).fc.out_features == 3


# ---------------------------------------------------------------- plain functional references over the state_dict


def _randomize_batchnorm(model: nn.Module) -> None:
    """Non-trivial affine and running statistics, so an eval-mode forward exercises every BatchNorm tensor."""
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.weight.data = torch.rand(c, generator=gen) + 0.5
            m.bias.data = torch.randn(c, generator=gen) * 0.1
            m.running_mean = torch.randn(c, generator=gen) * 0.1
            m.running_var = torch.rand(c, generator=gen) + 0.5


def _bn(x, s, prefix):
    return F.batch_norm(
        x,
        s[f"{prefix}.running_mean"],
        s[f"{prefix}.running_var"],
        s[f"{prefix}.weight"],
        s[f"{prefix}.bias"],
        training=False,
        eps=1e-5,
    )


def _resnet_reference(s, x, cifar):
    """He et al. 2016, Fig. 2 / Table 1: out = relu(bn2(conv2(relu(bn1(conv1 x)))) + shortcut(x))."""
    if cifar:
        x = F.relu(_bn(F.conv2d(x, s["conv1.weight"], padding=1), s, "bn1"))
    else:
        x = F.relu(_bn(F.conv2d(x, s["conv1.weight"], stride=2, padding=3), s, "bn1"))
        x = F.max_pool2d(x, 3, 2, 1)
    stage = 1
    while f"layer{stage}.0.conv1.weight" in s:
        block = 0
        while f"layer{stage}.{block}.conv1.weight" in s:
            p = f"layer{stage}.{block}"
            stride = 2 if (stage > 1 and block == 0) else 1
            out = F.relu(_bn(F.conv2d(x, s[f"{p}.conv1.weight"], stride=stride, padding=1), s, f"{p}.bn1"))
            out = _bn(F.conv2d(out, s[f"{p}.conv2.weight"], padding=1), s, f"{p}.bn2")
            if f"{p}.downsample.0.weight" in s:
                x = _bn(F.conv2d(x, s[f"{p}.downsample.0.weight"], stride=stride), s, f"{p}.downsample.1")
            x = F.relu(out + x)
            block += 1
        stage += 1
    return F.linear(x.mean((2, 3)), s["fc.weight"], s["fc.bias"])


def _mobilenet_v2_reference(s, x):
    """Sandler et al. 2018, Table 1-2: expand (1x1) -> depthwise 3x3 (stride) -> linear 1x1, residual when shapes
    match; the strides of Table 2's 17 bottlenecks are written out here."""
    x = F.relu6(_bn(F.conv2d(x, s["features.0.0.weight"], stride=2, padding=1), s, "features.0.1"))
    strides = [1, 2, 1, 2, 1, 1, 2, 1, 1, 1, 1, 1, 1, 2, 1, 1, 1]
    for i, stride in enumerate(strides, start=1):
        p = f"features.{i}.conv"
        h, j = x, 0
        if s[f"{p}.0.0.weight"].shape[2] == 1:  # expansion present
            h = F.relu6(_bn(F.conv2d(h, s[f"{p}.0.0.weight"]), s, f"{p}.0.1"))
            j = 1
        w = s[f"{p}.{j}.0.weight"]
        h = F.relu6(_bn(F.conv2d(h, w, stride=stride, padding=1, groups=w.shape[0]), s, f"{p}.{j}.1"))
        h = _bn(F.conv2d(h, s[f"{p}.{j + 1}.weight"]), s, f"{p}.{j + 2}")
        x = x + h if (stride == 1 and h.shape == x.shape) else h
    x = F.relu6(_bn(F.conv2d(x, s["features.18.0.weight"]), s, "features.18.1"))
    return F.linear(x.mean((2, 3)), s["classifier.1.weight"], s["classifier.1.bias"])


def _densenet_reference(s, x):
    """Huang et al. 2017, eq. 2 and Table 1: x_l = H_l([x_0, ..., x_{l-1}]), transitions BN-ReLU-conv-avgpool."""
    x = F.relu(_bn(F.conv2d(x, s["features.conv0.weight"], stride=2, padding=3), s, "features.norm0"))
    x = F.max_pool2d(x, 3, 2, 1)
    for b, layers in enumerate((6, 12, 24, 16), start=1):
        feats = [x]
        for n in range(1, layers + 1):
            p = f"features.denseblock{b}.denselayer{n}"
            h = torch.cat(feats, 1)
            h = F.conv2d(F.relu(_bn(h, s, f"{p}.norm1")), s[f"{p}.conv1.weight"])
            h = F.conv2d(F.relu(_bn(h, s, f"{p}.norm2")), s[f"{p}.conv2.weight"], padding=1)
            feats.append(h)
        x = torch.cat(feats, 1)
        if b < 4:
            p = f"features.transition{b}"
            x = F.avg_pool2d(F.conv2d(F.relu(_bn(x, s, f"{p}.norm")), s[f"{p}.conv.weight"]), 2)
    x = F.relu(_bn(x, s, "features.norm5"))
    return F.linear(x.mean((2, 3)), s["classifier.weight"], s["classifier.bias"])


@pytest.mark.parametrize(
    "name, size, reference",
    [
        ("resnet18", 40, lambda s, x: _resnet_reference(s, x, cifar=False)),
        ("resnet56", 20, lambda s, x: _resnet_reference(s, x, cifar=True)),
        ("mobilenet_v2", 40, _mobilenet_v2_reference),
        ("densenet121", 40, _densenet_reference),
    ],
)
def test_eval_forward_matches_plain_reference(name, size, reference):
    model = models.get_model(name, num_classes=5).eval()
    _randomize_batchnorm(model)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = reference(model.state_dict(), x)
        got = model(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
