"""The networks: output shapes, parameter counts from their specification, the published init."""

import math

import pytest
import torch
from torch import nn

from apl_kernels.reproduce import models


def conv_bn(cin: int, cout: int) -> int:
    """Parameters of conv3x3 (with bias) + batch norm."""
    return cin * 9 * cout + cout + 2 * cout


def fc_bn(fin: int, fout: int) -> int:
    return fin * fout + fout + 2 * fout


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_cnn8_is_the_spec_architecture():
    model = models.CNN8()
    expected = (conv_bn(3, 64) + conv_bn(64, 64) + conv_bn(64, 128) + conv_bn(128, 128)
                + conv_bn(128, 196) + conv_bn(196, 196) + fc_bn(3136, 256) + 256 * 10 + 10)
    assert count(model) == expected
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(3136, 256), (256, 10)]
    assert [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)] == [64, 64, 128, 128, 196, 196]


def test_cnn4_is_the_spec_architecture():
    model = models.CNN4()
    assert count(model) == conv_bn(1, 32) + conv_bn(32, 64) + fc_bn(3136, 128) + 128 * 10 + 10
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_digits_cnn_shape():
    model = models.DigitsCNN()
    assert count(model) == conv_bn(1, 16) + conv_bn(16, 32) + fc_bn(128, 128) + 128 * 10 + 10
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)


def resnet34_count(num_classes: int) -> int:
    """ResNet-34, CIFAR stem: conv3x3(64)+BN, basic blocks (3, 4, 6, 3), 1x1 projections, FC."""
    total = 3 * 9 * 64 + 2 * 64
    cin = 64
    for stage, blocks in enumerate((3, 4, 6, 3)):
        cout = 64 * 2**stage
        for block in range(blocks):
            total += cin * 9 * cout + 2 * cout + cout * 9 * cout + 2 * cout
            if cin != cout:
                total += cin * cout + 2 * cout
            cin = cout
    return total + 512 * num_classes + num_classes


def test_resnet34_cifar_stem():
    model = models.resnet34(num_classes=100)
    assert count(model) == resnet34_count(100) == 21_328_292  # the usual CIFAR ResNet-34 size
    stem = model.stem[0]
    assert (stem.kernel_size, stem.stride) == ((3, 3), (1, 1))
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def resnet50_count(num_classes: int) -> int:
    """Bottleneck ResNet-50, CIFAR stem: 1x1 (w), 3x3 (w), 1x1 (4w) per block, (3, 4, 6, 3) blocks,
    1x1 projections where the shape changes, FC from 2048."""
    total = 3 * 9 * 64 + 2 * 64
    cin = 64
    for stage, blocks in enumerate((3, 4, 6, 3)):
        width = 64 * 2**stage
        for block in range(blocks):
            total += cin * width + 2 * width + width * 9 * width + 2 * width + width * 4 * width + 2 * 4 * width
            if block == 0:  # stride 2 or 64 -> 256 channels
                total += cin * 4 * width + 2 * 4 * width
            cin = 4 * width
    return total + 2048 * num_classes + num_classes


def test_resnet50_bottleneck_cifar_stem():
    model = models.build_model("resnet50", 100)
    # the usual CIFAR ResNet-50 (23,520,842 parameters with 10 classes)
    assert count(model) == resnet50_count(100) == 23_520_842 - 2048 * 10 - 10 + 2048 * 100 + 100
    assert sum(isinstance(m, models.Bottleneck) for m in model.modules()) == 16
    stem = model.stem[0]
    assert (stem.kernel_size, stem.stride) == ((3, 3), (1, 1))
    assert model.fc.in_features == 2048
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)


@pytest.mark.parametrize("name", list(models.MODELS))
def test_published_initialization(name, seed):
    torch.manual_seed(seed)
    model = models.build_model(name, 10)
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            fan_in = module.weight[0].numel()
            bound = math.sqrt(6.0 / fan_in)  # kaiming_uniform_(mode="fan_in", nonlinearity="relu")
        elif isinstance(module, nn.Linear):
            bound = math.sqrt(6.0 / (module.in_features + module.out_features))  # xavier_uniform_
        else:
            continue
        weight = module.weight.detach()
        assert weight.abs().max() <= bound
        if weight.numel() >= 2000:  # uniform on [-b, b] has std b / sqrt(3); PyTorch's default is far smaller
            assert weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
        if module.bias is not None:
            assert torch.count_nonzero(module.bias) == 0


def test_same_seed_same_weights(seed):
    torch.manual_seed(seed)
    first = models.CNN8().state_dict()
    torch.manual_seed(seed)
    second = models.CNN8().state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_unknown_model():
    with pytest.raises(ValueError, match="unknown model 'vgg'; available: cnn8"):
        models.build_model("vgg", 10)
