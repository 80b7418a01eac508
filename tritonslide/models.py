"""Standard CNN architectures with torchvision's layer shapes and module names (``weights=None`` only).

Each constructor builds the same module tree as the torchvision function of the same name, so a torchvision
``state_dict`` loads into it key for key (and the other way round); the layer definitions follow the papers
cited per model and torchvision's ``torchvision/models/{alexnet,vgg,resnet,mobilenetv2,densenet}.py``
(v0.13 and later, where MobileNetV2 uses ``Conv2dNormActivation``). Nothing is downloaded: torchvision is not
a dependency, and the weights are initialised the way torchvision initialises them.

Every constructor also takes ``in_channels`` (default 3), which changes only the first convolution's input
channels (1 for the bundled digits). ``resnet56`` is not in torchvision: it is the CIFAR network of He et al.
2016, sec. 4.2, written with the same module names as ``resnet18``.

The smallest square input each model accepts is in ``MIN_INPUT_SIZE`` (``min_input_size(name)``): pooling
stages that reach an empty feature map set it, and it is checked in ``tests/test_models.py``.
"""

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MIN_INPUT_SIZE",
    "MODELS",
    "AlexNet",
    "BasicBlock",
    "DenseNet",
    "InvertedResidual",
    "MobileNetV2",
    "ResNet",
    "VGG",
    "alexnet",
    "available_models",
    "densenet121",
    "get_model",
    "min_input_size",
    "mobilenet_v2",
    "resnet18",
    "resnet56",
    "vgg11",
    "vgg11_bn",
    "vgg16",
    "vgg16_bn",
]


# --------------------------------------------------------------------------------------------------- AlexNet


class AlexNet(nn.Module):
    """AlexNet in torchvision's single-tower form (Krizhevsky, "One weird trick...", arXiv:1404.5997).

    Five convolutions (64, 192, 384, 256, 256 filters) in ``features``, an adaptive average pool to 6x6, and a
    three-layer classifier with dropout before each of the first two Linear layers. torchvision applies no
    custom initialisation, so neither does this class (PyTorch's default Conv2d / Linear init).
    """

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, dropout: float = 0.5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 64, kernel_size=11, stride=4, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Linear(256 * 6 * 6, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def alexnet(num_classes: int = 1000, *, in_channels: int = 3, dropout: float = 0.5) -> AlexNet:
    """torchvision's ``alexnet(weights=None)``: 61,100,840 parameters at 1000 classes.

    Minimum input 63x63: the three unpadded 3x3/stride-2 max pools each need a map of at least 3x3, so the
    second pool's output must be 3x3, which takes an 11x11/stride-4 conv output of 15x15, i.e. an input of
    (15 - 1) * 4 + 7 = 63. Below that the last pool raises.
    """
    return AlexNet(num_classes=num_classes, in_channels=in_channels, dropout=dropout)


# ------------------------------------------------------------------------------------------------------- VGG

def _vgg_mobilenet_init(model: nn.Module) -> None:
    """torchvision's init of VGG and MobileNetV2: convs kaiming_normal (fan_out, gain sqrt(2): MobileNetV2's
    default ``leaky_relu`` with a = 0 is ReLU's gain), BatchNorm 1 / 0, Linear N(0, 0.01), biases 0."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, 0.01)
            nn.init.zeros_(module.bias)



# Simonyan & Zisserman, arXiv:1409.1556, Table 1: configuration A (VGG-11) and D (VGG-16); "M" is a 2x2 max pool.
_VGG_CONFIGS: dict[str, list[int | str]] = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


def _vgg_features(config: Sequence[int | str], batch_norm: bool, in_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = in_channels
    for item in config:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        width = int(item)
        layers.append(nn.Conv2d(channels, width, kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(width))
        layers.append(nn.ReLU(inplace=True))
        channels = width
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """VGG (Simonyan & Zisserman, arXiv:1409.1556, Table 1) with torchvision's 7x7 adaptive pool and classifier.

    Initialisation as torchvision: convolutions ``kaiming_normal_(mode="fan_out", nonlinearity="relu")`` with
    zero bias, BatchNorm weight 1 / bias 0, Linear weights N(0, 0.01^2) with zero bias.
    """

    def __init__(self, features: nn.Sequential, num_classes: int = 1000, dropout: float = 0.5) -> None:
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, num_classes),
        )
        _vgg_mobilenet_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def _vgg(config: str, batch_norm: bool, num_classes: int, in_channels: int, dropout: float) -> VGG:
    return VGG(_vgg_features(_VGG_CONFIGS[config], batch_norm, in_channels), num_classes=num_classes, dropout=dropout)


def vgg11(num_classes: int = 1000, *, in_channels: int = 3, dropout: float = 0.5) -> VGG:
    """torchvision's ``vgg11(weights=None)`` (configuration A): 132,863,336 parameters. Minimum input 32x32
    (five 2x2 max pools; the adaptive pool then upsamples the 1x1 map to 7x7)."""
    return _vgg("A", False, num_classes, in_channels, dropout)


def vgg11_bn(num_classes: int = 1000, *, in_channels: int = 3, dropout: float = 0.5) -> VGG:
    """torchvision's ``vgg11_bn(weights=None)``: configuration A with BatchNorm after each convolution,
    132,868,840 parameters. Minimum input 32x32."""
    return _vgg("A", True, num_classes, in_channels, dropout)


def vgg16(num_classes: int = 1000, *, in_channels: int = 3, dropout: float = 0.5) -> VGG:
    """torchvision's ``vgg16(weights=None)`` (configuration D): 138,357,544 parameters. Minimum input 32x32."""
    return _vgg("D", False, num_classes, in_channels, dropout)


def vgg16_bn(num_classes: int = 1000, *, in_channels: int = 3, dropout: float = 0.5) -> VGG:
    """torchvision's ``vgg16_bn(weights=None)``: configuration D with BatchNorm after each convolution,
    138,365,992 parameters. Minimum input 32x32."""
    return _vgg("D", True, num_classes, in_channels, dropout)


# ---------------------------------------------------------------------------------------------------- ResNet


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity or projection shortcut (He et al., arXiv:1512.03385, Fig. 2).

    The stride sits on ``conv1``; ``downsample`` is ``Sequential(conv1x1, BatchNorm2d)`` (the paper's option B
    projection, eq. 2) whenever the stride or the width changes, as in torchvision.
    """

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet from BasicBlocks with torchvision's module names: conv1, bn1, relu, maxpool, layer1..N, avgpool, fc.

    ``stem="imagenet"`` is torchvision's 7x7/stride-2 convolution and 3x3/stride-2 max pool (He et al. 2016,
    Table 1); ``stem="cifar"`` is the 3x3/stride-1 convolution of sec. 4.2 with no pooling (``maxpool`` is then
    an ``nn.Identity``, which holds no state, so the state_dict keys are the same in both). Stage ``i`` has
    ``blocks[i]`` blocks of width ``widths[i]``; every stage after the first halves the resolution.

    Init as torchvision: convolutions ``kaiming_normal_(mode="fan_out", nonlinearity="relu")``, BatchNorm 1 / 0,
    and with ``zero_init_residual`` each block's last BatchNorm weight is 0, so every block starts as the identity
    (Goyal et al., arXiv:1706.02677, sec. 5.1).
    """

    def __init__(
        self,
        blocks: Sequence[int],
        widths: Sequence[int],
        num_classes: int = 1000,
        in_channels: int = 3,
        stem: str = "imagenet",
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if len(blocks) != len(widths) or not blocks:
            raise ValueError(f"blocks and widths must be non-empty and of equal length, got {blocks} and {widths}")
        if stem not in ("imagenet", "cifar"):
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {stem!r}")
        self.inplanes = widths[0]
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, self.inplanes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool: nn.Module
        if stem == "imagenet":
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.maxpool = nn.Identity()
        self._stage_names: list[str] = []
        for i, (count, width) in enumerate(zip(blocks, widths)):
            name = f"layer{i + 1}"
            self.add_module(name, self._make_stage(width, count, stride=1 if i == 0 else 2))
            self._stage_names.append(name)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[-1] * BasicBlock.expansion, num_classes)

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if zero_init_residual:
            for module in self.modules():
                if isinstance(module, BasicBlock):
                    nn.init.zeros_(module.bn2.weight)

    def _make_stage(self, planes: int, count: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * BasicBlock.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * BasicBlock.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * BasicBlock.expansion),
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * BasicBlock.expansion
        layers.extend(BasicBlock(self.inplanes, planes) for _ in range(1, count))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for name in self._stage_names:
            x = getattr(self, name)(x)
        x = self.avgpool(x)
        return self.fc(torch.flatten(x, 1))


def resnet18(num_classes: int = 1000, *, in_channels: int = 3, zero_init_residual: bool = False) -> ResNet:
    """torchvision's ``resnet18(weights=None)`` (He et al., arXiv:1512.03385, Table 1, 18-layer column):
    11,689,512 parameters. Any input of at least 1x1 runs (every stage pads); 32x32 reaches layer4 at 1x1."""
    return ResNet([2, 2, 2, 2], [64, 128, 256, 512], num_classes, in_channels, "imagenet", zero_init_residual)


def resnet56(num_classes: int = 10, *, in_channels: int = 3, zero_init_residual: bool = False) -> ResNet:
    """The CIFAR-10 ResNet-56 of He et al. (arXiv:1512.03385, sec. 4.2): a 3x3 conv 3->16, three stages of
    n = 9 BasicBlocks at 16/32/64 channels (6n + 2 = 56 layers), global average pool, and ``fc``.

    Shortcuts that change shape use the 1x1 conv + BatchNorm projection (option B), not the paper's
    parameter-free option A (zero-padded stride-2 identity), so that one ``BasicBlock`` serves resnet18 and
    resnet56. The two projections (layer2.0 and layer3.0) add 2,752 parameters: 855,770 at 10 classes instead of
    option A's 853,018 (the paper's "0.85M"). Any input of at least 1x1 runs; the paper's is 32x32.
    """
    return ResNet([9, 9, 9], [16, 32, 64], num_classes, in_channels, "cifar", zero_init_residual)


# ----------------------------------------------------------------------------------------------- MobileNetV2


def _make_divisible(value: float, divisor: int, min_value: int | None = None) -> int:
    """Round a channel count to a multiple of ``divisor`` without dropping more than 10% (MobileNet's rule)."""
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def _conv_bn_relu6(
    in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, groups: int = 1
) -> nn.Sequential:
    # A plain Sequential(conv, bn, act) has the same state_dict keys (0.*, 1.*) as torchvision's
    # Conv2dNormActivation, which subclasses Sequential.
    return nn.Sequential(
        nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=(kernel_size - 1) // 2,
            groups=groups,
            bias=False,
        ),
        nn.BatchNorm2d(out_channels),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """MobileNetV2's bottleneck (Sandler et al., arXiv:1801.04381, Table 1): 1x1 expansion (omitted when the
    expansion factor is 1), 3x3 depthwise conv carrying the stride, linear 1x1 projection with BatchNorm; the input
    is added back when stride is 1 and the widths match."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        self.stride = stride
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(_conv_bn_relu6(inp, hidden, kernel_size=1))
        layers.extend(
            [
                _conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),
                nn.Conv2d(hidden, oup, kernel_size=1, bias=False),
                nn.BatchNorm2d(oup),
            ]
        )
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_res_connect else out


class MobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al., arXiv:1801.04381, Table 2) with torchvision's names: ``features`` (stem
    ConvBNReLU6, 17 InvertedResidual blocks, last 1x1 ConvBNReLU6 to 1280) and ``classifier`` (Dropout, Linear).

    Init as torchvision: convolutions ``kaiming_normal_(mode="fan_out")`` with zero bias, BatchNorm 1 / 0,
    Linear N(0, 0.01^2) with zero bias.
    """

    # (expansion t, output channels c, repeats n, first stride s), Table 2 of the paper
    _SETTING: tuple[tuple[int, int, int, int], ...] = (
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    )

    def __init__(
        self,
        num_classes: int = 1000,
        in_channels: int = 3,
        width_mult: float = 1.0,
        round_nearest: int = 8,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        channels = _make_divisible(32 * width_mult, round_nearest)
        # the last layer is never narrowed below 1280 (torchvision, and the paper's sec. 5.1)
        self.last_channel = _make_divisible(1280 * max(1.0, width_mult), round_nearest)
        layers: list[nn.Module] = [_conv_bn_relu6(in_channels, channels, stride=2)]
        for t, c, n, s in self._SETTING:
            out = _make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                layers.append(InvertedResidual(channels, out, s if i == 0 else 1, expand_ratio=t))
                channels = out
        layers.append(_conv_bn_relu6(channels, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(self.last_channel, num_classes))

        _vgg_mobilenet_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v2(
    num_classes: int = 1000,
    *,
    in_channels: int = 3,
    width_mult: float = 1.0,
    round_nearest: int = 8,
    dropout: float = 0.2,
) -> MobileNetV2:
    """torchvision's ``mobilenet_v2(weights=None)``: 3,504,872 parameters at width 1.0. Any input of at least
    1x1 runs (every conv pads); 32x32 reaches the last stage at 1x1."""
    return MobileNetV2(num_classes, in_channels, width_mult, round_nearest, dropout)


# -------------------------------------------------------------------------------------------------- DenseNet


class _DenseLayer(nn.Module):
    """BN-ReLU-Conv(1x1, bn_size * k) - BN-ReLU-Conv(3x3, k): the DenseNet-B layer (Huang et al.,
    arXiv:1608.06993, sec. 3, "Bottleneck layers"), applied to the concatenation of all earlier outputs."""

    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int, drop_rate: float) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, kernel_size=1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, padding=1, bias=False)
        self.drop_rate = float(drop_rate)

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(inputs, 1)
        x = self.conv1(self.relu1(self.norm1(x)))
        x = self.conv2(self.relu2(self.norm2(x)))
        if self.drop_rate > 0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x


class _DenseBlock(nn.ModuleDict):
    """``num_layers`` dense layers named denselayer1..N; each sees every earlier feature map (eq. 2)."""

    def __init__(
        self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int, drop_rate: float
    ) -> None:
        super().__init__()
        for i in range(num_layers):
            layer = _DenseLayer(num_input_features + i * growth_rate, growth_rate, bn_size, drop_rate)
            self.add_module(f"denselayer{i + 1}", layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class _Transition(nn.Sequential):
    """BN-ReLU-Conv(1x1) halving the channels (compression 0.5, DenseNet-C) and a 2x2 average pool."""

    def __init__(self, num_input_features: int, num_output_features: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, kernel_size=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class DenseNet(nn.Module):
    """DenseNet-BC (Huang et al., arXiv:1608.06993, Table 1) with torchvision's names: ``features`` (conv0, norm0,
    relu0, pool0, denseblock1..4, transition1..3, norm5) and ``classifier``. Plain forward: torchvision's
    ``memory_efficient`` checkpointing is not implemented.

    Init as torchvision: convolutions ``kaiming_normal_`` with its defaults (fan_in), BatchNorm 1 / 0, Linear
    bias 0 with PyTorch's default weight init.
    """

    def __init__(
        self,
        growth_rate: int = 32,
        block_config: Sequence[int] = (6, 12, 24, 16),
        num_init_features: int = 64,
        bn_size: int = 4,
        drop_rate: float = 0.0,
        num_classes: int = 1000,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        stem = [
            ("conv0", nn.Conv2d(in_channels, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)),
            ("norm0", nn.BatchNorm2d(num_init_features)),
            ("relu0", nn.ReLU(inplace=True)),
            ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
        ]
        self.features = nn.Sequential(OrderedDict(stem))
        channels = num_init_features
        for i, num_layers in enumerate(block_config):
            self.features.add_module(
                f"denseblock{i + 1}", _DenseBlock(num_layers, channels, bn_size, growth_rate, drop_rate)
            )
            channels += num_layers * growth_rate
            if i != len(block_config) - 1:
                self.features.add_module(f"transition{i + 1}", _Transition(channels, channels // 2))
                channels //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(channels))
        self.classifier = nn.Linear(channels, num_classes)

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.features(x), inplace=True)
        x = F.adaptive_avg_pool2d(x, (1, 1))
        return self.classifier(torch.flatten(x, 1))


def densenet121(num_classes: int = 1000, *, in_channels: int = 3, drop_rate: float = 0.0) -> DenseNet:
    """torchvision's ``densenet121(weights=None)``: k = 32, blocks of 6/12/24/16 layers, 64 initial features,
    7,978,856 parameters. Minimum input 29x29: the stem divides by 4 (29 -> 15 -> 8) and the 2x2 average pool of
    transition3 needs a 2x2 map, which two halvings leave only from 8x8."""
    return DenseNet(32, (6, 12, 24, 16), 64, 4, drop_rate, num_classes, in_channels)


# -------------------------------------------------------------------------------------------------- registry

MODELS: dict[str, Callable[..., nn.Module]] = {
    "alexnet": alexnet,
    "vgg11": vgg11,
    "vgg11_bn": vgg11_bn,
    "vgg16": vgg16,
    "vgg16_bn": vgg16_bn,
    "resnet18": resnet18,
    "resnet56": resnet56,
    "mobilenet_v2": mobilenet_v2,
    "densenet121": densenet121,
}

# Smallest square input (H = W) each model's forward accepts; derived in each constructor's docstring. Where the
# last feature map is then 1x1, training-mode BatchNorm also needs a batch of at least 2 (one value per channel
# gives no variance).
MIN_INPUT_SIZE: dict[str, int] = {
    "alexnet": 63,
    "vgg11": 32,
    "vgg11_bn": 32,
    "vgg16": 32,
    "vgg16_bn": 32,
    "resnet18": 1,
    "resnet56": 1,
    "mobilenet_v2": 1,
    "densenet121": 29,
}


def available_models() -> list[str]:
    """Names accepted by ``get_model``, sorted."""
    return sorted(MODELS)


def _check_name(name: str) -> None:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(available_models())}")


def get_model(name: str, **kwargs: object) -> nn.Module:
    """Build the model registered as ``name`` (randomly initialised); ``kwargs`` go to its constructor."""
    _check_name(name)
    return MODELS[name](**kwargs)


def min_input_size(name: str) -> int:
    """Smallest square input side the model ``name`` accepts (see ``MIN_INPUT_SIZE``)."""
    _check_name(name)
    return MIN_INPUT_SIZE[name]
