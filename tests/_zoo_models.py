"""One tiny model per torchvision family: the real torchvision classes at small widths where the
constructor allows it, else torchvision's own blocks (Fire, Inception, BasicBlock, ...) in a minimal net."""
from __future__ import annotations

import importlib
from typing import Callable

import torch
from torch import nn

from untangle_ext.zoo import check_data, import_torchvision

SIZE = 16  # every tiny model takes 3 x 16 x 16 inputs
N_ESTIMATE = 16  # images the tests estimate the 2 classes on


def _head(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10))


def _stem(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True))


def vgg() -> nn.Module:
    """VGG/AlexNet structure: torchvision's make_layers (conv, BN, ReLU, max-pool) + dropout MLP head."""
    tv = import_torchvision()
    features = tv.models.vgg.make_layers([8, "M", 16, "M"], batch_norm=True)
    return nn.Sequential(features, nn.Flatten(), nn.Dropout(), nn.Linear(16 * 4 * 4, 16), nn.ReLU(True), nn.Linear(16, 10))


def resnet() -> nn.Module:
    """ResNet/ResNeXt structure: torchvision's BasicBlock and a grouped Bottleneck with a strided downsample."""
    r = import_torchvision().models.resnet
    down = nn.Sequential(r.conv1x1(8, 16, stride=2), nn.BatchNorm2d(16))
    return nn.Sequential(_stem(8), r.BasicBlock(8, 8), r.Bottleneck(8, 4, stride=2, downsample=down, groups=2,
                                                                    base_width=64), _head(16))


def regnet() -> nn.Module:
    """RegNetY: torchvision's RegNet at width 8 (grouped convs, squeeze-excitation with Sigmoid)."""
    r = import_torchvision().models.regnet
    params = r.BlockParams.from_init_params(depth=2, w_0=8, w_a=8.0, w_m=2.0, group_width=8, se_ratio=0.25)
    return r.RegNet(params, num_classes=10, stem_width=8)


def densenet() -> nn.Module:
    """DenseNet: torchvision's class at growth rate 4 (concatenation, BatchNorm before conv)."""
    return import_torchvision().models.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2,
                                                num_classes=10)


def googlenet() -> nn.Module:
    """GoogLeNet: torchvision's Inception block (four branches, ceil-mode max-pool, cat) between stem and head."""
    import_torchvision()
    g = importlib.import_module("torchvision.models.googlenet")  # the package attribute is the builder
    return nn.Sequential(_stem(8), g.Inception(8, 4, 4, 4, 2, 4, 4), _head(16))


def inception() -> nn.Module:
    """Inception-v3: max-pool, then torchvision's InceptionA (1x1, 5x5, double 3x3 and avg-pool branches, cat)."""
    i = import_torchvision().models.inception
    return nn.Sequential(_stem(8), nn.MaxPool2d(2), i.InceptionA(8, pool_features=4), _head(64 + 64 + 96 + 4))


def shufflenet() -> nn.Module:
    """ShuffleNetV2: torchvision's class at widths 8..64 (channel split, cat, shuffle via view/transpose)."""
    return import_torchvision().models.ShuffleNetV2([1, 1, 1], [8, 8, 16, 32, 64], num_classes=10)


def squeezenet() -> nn.Module:
    """SqueezeNet: torchvision's Fire modules (squeeze, two expands, cat) and its conv classifier."""
    s = import_torchvision().models.squeezenet
    return nn.Sequential(_stem(8), nn.MaxPool2d(3, 2, ceil_mode=True), s.Fire(8, 4, 8, 8), s.Fire(16, 4, 8, 8),
                         nn.Dropout(0.5), nn.Conv2d(16, 10, 1), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten())


def mobilenet_v2() -> nn.Module:
    """MobileNetV2: torchvision's class at width 0.25 (ReLU6, depthwise convs, inverted residuals)."""
    return import_torchvision().models.MobileNetV2(num_classes=10, width_mult=0.25,
                                                   inverted_residual_setting=[[1, 8, 1, 1], [6, 8, 2, 2]])


def mobilenet_v3() -> nn.Module:
    """MobileNetV3: torchvision's class with two blocks (Hardswish, squeeze-excitation with Hardsigmoid)."""
    m = import_torchvision().models.mobilenetv3
    cfg = [m.InvertedResidualConfig(8, 3, 16, 8, True, "RE", 2, 1, 1.0),
           m.InvertedResidualConfig(8, 3, 24, 16, True, "HS", 1, 1, 1.0)]
    return m.MobileNetV3(cfg, last_channel=32, num_classes=10)


def efficientnet() -> nn.Module:
    """EfficientNet v1/v2: torchvision's class with a FusedMBConv and MBConv stage (SiLU, SE, stochastic depth)."""
    e = import_torchvision().models.efficientnet
    cfg = [e.FusedMBConvConfig(1, 3, 1, 8, 8, 1), e.MBConvConfig(4, 3, 2, 8, 16, 2)]
    return e.EfficientNet(cfg, dropout=0.2, stochastic_depth_prob=0.2, num_classes=10, last_channel=32)


class _SpatialMean(nn.Module):
    """MNASNet's head reduction, ``x.mean([2, 3])``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean([2, 3])


def mnasnet() -> nn.Module:
    """MNASNet: torchvision's _InvertedResidual blocks (3x3 and strided 5x5 depthwise) and ``.mean([2, 3])``."""
    import_torchvision()
    m = importlib.import_module("torchvision.models.mnasnet")
    return nn.Sequential(_stem(8), m._InvertedResidual(8, 8, 3, 1, 3, 0.1), m._InvertedResidual(8, 16, 5, 2, 3, 0.1),
                         _SpatialMean(), nn.Linear(16, 10))


def convnext() -> nn.Module:
    """ConvNeXt: torchvision's class at width 8 (permute, LayerNorm, GELU, layer scale, stochastic depth)."""
    c = import_torchvision().models.convnext
    return c.ConvNeXt([c.CNBlockConfig(8, 16, 1), c.CNBlockConfig(16, None, 1)], stochastic_depth_prob=0.1,
                      num_classes=10)


def swin() -> nn.Module:
    """Swin: torchvision's class at embed dim 8 (window partition permutes, shifted-window attention)."""
    return import_torchvision().models.SwinTransformer([4, 4], 8, [2, 1], [1, 2], [2, 2], stochastic_depth_prob=0.1,
                                                       num_classes=10)


def swin_v2() -> nn.Module:
    """Swin V2: torchvision's class with its V2 block and patch merging (cosine attention, CPB MLP)."""
    s = import_torchvision().models.swin_transformer
    return s.SwinTransformer([4, 4], 8, [2, 1], [1, 2], [2, 2], num_classes=10, block=s.SwinTransformerBlockV2,
                             downsample_layer=s.PatchMergingV2)


def vit() -> nn.Module:
    """ViT: torchvision's VisionTransformer at hidden dim 16 (class token, MultiheadAttention, LayerNorm, GELU).

    torchvision initialises the head's weight to zero, which makes W ⊙ A (PatternAttribution) exactly zero:
    a random head stands in for a trained one."""
    model = import_torchvision().models.VisionTransformer(image_size=SIZE, patch_size=4, num_layers=1, num_heads=2,
                                                          hidden_dim=16, mlp_dim=32, num_classes=10)
    nn.init.normal_(model.heads.head.weight, std=0.5)
    return model


def maxvit() -> nn.Module:
    """MaxViT: torchvision's class at width 8, partition 2 (MBConv + SE, block and grid attention)."""
    return import_torchvision().models.MaxVit((SIZE, SIZE), stem_channels=8, partition_size=2, block_channels=[8],
                                              block_layers=[1], head_dim=4, stochastic_depth_prob=0.1,
                                              num_classes=10)


FAMILIES: dict[str, Callable[[], nn.Module]] = {f.__name__: f for f in (
    vgg, resnet, regnet, densenet, googlenet, inception, shufflenet, squeezenet, mobilenet_v2, mobilenet_v3,
    efficientnet, mnasnet, convnext, swin, swin_v2, vit, maxvit)}


def _head_bias(model: nn.Module) -> torch.Tensor:
    """The bias of the (last registered) layer with 10 outputs, the classifier; added where it has none (MaxViT)."""
    head = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and m.weight.shape[0] == 10][-1]
    if head.bias is None:
        head.bias = nn.Parameter(torch.zeros(10))
    return head.bias


def build(family: str, seed: int = 0) -> nn.Module:
    """The tiny model of ``family``, seeded, in eval mode, its last bias shifted so that every logit of the
    zoo check's inputs is ≥ 1 (a negative logit closes the last layer's gate: its pattern maps are 0)."""
    torch.manual_seed(seed)
    model = FAMILIES[family]().eval()
    loader, x_attr, _ = check_data((3, SIZE, SIZE), n_estimate=N_ESTIMATE)
    with torch.no_grad():
        low = min(float(model(x).min()) for x in (x_attr, *(batch[0] for batch in loader)))
        _head_bias(model).add_(1.0 - low)
    return model
