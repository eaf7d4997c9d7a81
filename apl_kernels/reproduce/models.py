"""The networks of the APL paper's experiments, with the published initialization.

* :class:`CNN8` (CIFAR-10) and :class:`CNN4` (MNIST), as docs/reproduction.md lists them;
* :func:`resnet34` (CIFAR-100): ResNet-34 with the CIFAR stem (3x3 stride-1 first convolution,
  no max-pool); :func:`resnet50`, the bottleneck ResNet-50 with the same stem, is the released
  configs' CIFAR-100 model (``--settings released``);
* :class:`DigitsCNN`: a small CNN for scikit-learn's 8x8 ``digits`` (the quick preset).

Initialization (:func:`init_published`): every convolution ``kaiming_uniform_(fan_in, relu)``, every
linear layer ``xavier_uniform_``; biases zero (the spec does not say; batch norm follows every
convolution, so a convolution bias has no effect on the output anyway), batch norm weight 1 and
bias 0 (PyTorch's default).
"""

from __future__ import annotations

from torch import Tensor, nn


def init_published(model: nn.Module) -> nn.Module:
    """Apply the published initialization to every convolution and linear layer of ``model``."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_uniform_(module.weight, mode="fan_in", nonlinearity="relu")
        elif isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
        else:
            continue
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    return model


def conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


def classifier(in_features: int, hidden: int, num_classes: int) -> nn.Sequential:
    """FC ``in_features -> hidden`` - BN1d - ReLU - FC ``hidden -> num_classes``."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, num_classes),
    )


class CNN8(nn.Sequential):
    """CIFAR-10: [conv3x3(64)-BN-ReLU]x2, pool, [..(128)]x2, pool, [..(196)]x2, pool, FC 3136-256-10."""

    input_shape = (3, 32, 32)

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__(
            *conv_bn_relu(3, 64), *conv_bn_relu(64, 64), nn.MaxPool2d(2),
            *conv_bn_relu(64, 128), *conv_bn_relu(128, 128), nn.MaxPool2d(2),
            *conv_bn_relu(128, 196), *conv_bn_relu(196, 196), nn.MaxPool2d(2),
            classifier(196 * 4 * 4, 256, num_classes),
        )
        init_published(self)


class CNN4(nn.Sequential):
    """MNIST: conv(32)-BN-ReLU, pool, conv(64)-BN-ReLU, pool, FC 3136-128-BN1d-ReLU, FC-10."""

    input_shape = (1, 28, 28)

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__(
            *conv_bn_relu(1, 32), nn.MaxPool2d(2),
            *conv_bn_relu(32, 64), nn.MaxPool2d(2),
            classifier(64 * 7 * 7, 128, num_classes),
        )
        init_published(self)


class DigitsCNN(nn.Sequential):
    """scikit-learn digits (1x8x8), CNN4 scaled down: conv(16)-BN-ReLU, pool, conv(32)-BN-ReLU, pool,
    FC 128-128-BN1d-ReLU, FC-10."""

    input_shape = (1, 8, 8)

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__(
            *conv_bn_relu(1, 16), nn.MaxPool2d(2),
            *conv_bn_relu(16, 32), nn.MaxPool2d(2),
            classifier(32 * 2 * 2, 128, num_classes),
        )
        init_published(self)


def shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """Identity, or a 1x1 projection with batch norm where the shape changes."""
    if stride == 1 and in_channels == out_channels:
        return nn.Sequential()
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                         nn.BatchNorm2d(out_channels))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and an identity (or 1x1 projection) shortcut."""

    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = shortcut(in_channels, width, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 (width), 3x3 (width, the stride), 1x1 (4 x width), each with batch norm, and a shortcut."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = shortcut(in_channels, out_channels, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A CIFAR ResNet: 3x3 stride-1 stem (no max-pool), four stages of ``block``, global pool, FC."""

    input_shape = (3, 32, 32)

    def __init__(self, blocks_per_stage: tuple[int, ...], num_classes: int,
                 block: type[BasicBlock] | type[Bottleneck] = BasicBlock) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True)
        )
        stages, in_channels = [], 64
        for index, count in enumerate(blocks_per_stage):
            width = 64 * 2**index
            for position in range(count):
                stride = 2 if index > 0 and position == 0 else 1
                stages.append(block(in_channels, width, stride))
                in_channels = width * block.expansion
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        init_published(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.stages(self.stem(x))).flatten(1))


def resnet34(num_classes: int = 100) -> ResNet:
    """ResNet-34 (3, 4, 6, 3 basic blocks) with the CIFAR stem."""
    return ResNet((3, 4, 6, 3), num_classes)


def resnet50(num_classes: int = 100) -> ResNet:
    """ResNet-50 (3, 4, 6, 3 bottleneck blocks, 2048 features) with the CIFAR stem."""
    return ResNet((3, 4, 6, 3), num_classes, Bottleneck)


MODELS = {"cnn8": CNN8, "cnn4": CNN4, "resnet34": resnet34, "resnet50": resnet50, "digits_cnn": DigitsCNN}


def build_model(name: str, num_classes: int) -> nn.Module:
    """The network ``name`` (one of :data:`MODELS`) for ``num_classes`` classes."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(MODELS)}")
    return MODELS[name](num_classes=num_classes)
