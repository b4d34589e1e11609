"""Pre-activation ResNets: the paper's "ResNet34v2" and a compact variant for 48x48 faces.

ResNet34v2 is qubvel's ``classification_models`` ResNet-34 (MXNet's pre-activation ResNet converted
with MMdnn), which LHC-Net was built on (``docs/lhc-spec.md`` §3): a ``bn_data`` BatchNorm without
scale normalises the raw 0-255 RGB input; every unit is BN-ReLU-conv-BN-ReLU-conv plus shortcut,
where the first unit of every stage (stage 1 included) takes a 1x1 conv shortcut from the
*activated* input; a final BN-ReLU precedes pooling. BatchNorm uses eps 2e-5 and Keras momentum
0.99 (PyTorch momentum 0.01). The classifier head is the authors': GAP -> 4096 ReLU -> Dropout 0.4
-> 1024 ReLU -> Dropout 0.4 -> classes (logits).

Module names follow the Keras layer names where possible (``bn_data``, ``conv0``, ``bn0``,
``stage{s}.unit{u}.bn1``...), which keeps the h5 converter a table lookup. The places where LHC
blocks go are the children ``stem``, ``stage1`` ... ``stage4``: an LHC block "after stage s" sees
the output of that stage's last residual add.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["BatchNormNoScale", "PreActUnit", "PreActResNet", "resnet34v2", "resnet18v2_48"]

BN_EPS = 2e-5
BN_MOMENTUM = 0.01  # Keras momentum 0.99


def batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class BatchNormNoScale(nn.BatchNorm2d):
    """Keras ``BatchNormalization(scale=False)``: running statistics and a shift (beta), no gamma."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, eps=BN_EPS, momentum=BN_MOMENTUM, affine=False)
        # F.batch_norm takes weight and bias separately: weight None (no scale), this bias is added
        # once by BatchNorm2d.forward itself (adding it again in a forward override doubled it).
        self.bias = nn.Parameter(torch.zeros(channels))


class PreActUnit(nn.Module):
    """One pre-activation basic unit (qubvel ``residual_conv_block``)."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1, conv_shortcut: bool = False) -> None:
        super().__init__()
        self.bn1 = batch_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn2 = batch_norm(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.sc = nn.Conv2d(in_channels, channels, 1, stride, bias=False) if conv_shortcut else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu(self.bn1(x))
        shortcut = x if self.sc is None else self.sc(act)  # 'post' cut: from the activated input
        out = self.conv1(act)
        out = self.conv2(self.relu(self.bn2(out)))
        return out + shortcut


class Stem(nn.Sequential):
    """``bn_data`` -> conv -> BN -> ReLU -> max-pool 3x3/2 (ImageNet: conv 7x7/2; compact: 3x3/1)."""

    def __init__(self, channels: int, kernel_size: int, stride: int) -> None:
        super().__init__()
        self.bn_data = BatchNormNoScale(3)
        self.conv0 = nn.Conv2d(3, channels, kernel_size, stride, kernel_size // 2, bias=False)
        self.bn0 = batch_norm(channels)
        self.relu0 = nn.ReLU(inplace=True)
        # Keras: ZeroPad(1) + MaxPool 'valid' after a ReLU == PyTorch's -inf padding.
        self.pooling0 = nn.MaxPool2d(3, 2, 1)


class ClassifierHead(nn.Sequential):
    """GAP -> [Linear -> ReLU -> Dropout] per hidden size -> Linear to logits."""

    def __init__(self, in_features: int, hidden: Sequence[int], num_classes: int, dropout: float) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        width = in_features
        for i, size in enumerate(hidden, start=1):
            self.add_module(f"fc{i}", nn.Linear(width, size))
            self.add_module(f"relu{i}", nn.ReLU(inplace=True))
            self.add_module(f"drop{i}", nn.Dropout(dropout))
            width = size
        self.logits = nn.Linear(width, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Linear):  # Keras Dense defaults: Glorot-uniform, zero bias
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)


class PreActResNet(nn.Module):
    """Pre-activation ResNet with named places ``stem``, ``stage1``..``stage4`` for LHC blocks.

    Input: RGB float ``(B, 3, S, S)`` in 0..255 (``bn_data`` normalises it). Output: logits.
    """

    def __init__(
        self,
        layers: Sequence[int] = (3, 4, 6, 3),
        widths: Sequence[int] = (64, 128, 256, 512),
        num_classes: int = 7,
        stem_kernel: int = 7,
        stem_stride: int = 2,
        head_hidden: Sequence[int] = (4096, 1024),
        dropout: float = 0.4,
        input_size: int = 224,
    ) -> None:
        super().__init__()
        if len(layers) != len(widths):
            raise ValueError(f"layers {tuple(layers)} and widths {tuple(widths)} must have the same length")
        self.input_size = input_size
        self.stem = Stem(widths[0], stem_kernel, stem_stride)
        in_channels = widths[0]
        for s, (count, width) in enumerate(zip(layers, widths), start=1):
            stage = nn.Sequential()
            for u in range(1, count + 1):
                stride = 2 if (u == 1 and s > 1) else 1
                stage.add_module(f"unit{u}", PreActUnit(in_channels, width, stride, conv_shortcut=u == 1))
                in_channels = width
            self.add_module(f"stage{s}", stage)
        self.num_stages = len(layers)
        self.bn1 = batch_norm(in_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.num_features = in_channels
        self.head = ClassifierHead(in_channels, head_hidden, num_classes, dropout)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):  # qubvel's ResNets use He-uniform conv init
                nn.init.kaiming_uniform_(module.weight, a=0, nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for s in range(1, self.num_stages + 1):
            x = getattr(self, f"stage{s}")(x)
        return self.relu1(self.bn1(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def resnet34v2(num_classes: int = 7, **kwargs) -> PreActResNet:
    """The paper's backbone: pre-activation ResNet-34 at 224x224 with the authors' head."""
    return PreActResNet((3, 4, 6, 3), (64, 128, 256, 512), num_classes, **kwargs)


def resnet18v2_48(num_classes: int = 7, **kwargs) -> PreActResNet:
    """Compact pre-activation ResNet-18 for native 48x48 FER2013 faces (CPU-trainable).

    Stem conv 3x3/1 + max-pool/2 puts stage 1 at 24x24 (stages 24, 12, 6, 3 px); widths
    48-96-192-384 keep the model with LHC blocks under 25 MB in fp16; head 384 -> 1024 -> classes.
    Measured training speed on 2 Zen-4 cores (bf16 autocast, channels-last, batch 64): ~420 img/s
    (an epoch of FER2013's 28,709 faces in ~70 s); with the five LHC blocks (``lhcnet_resnet18v2_48``)
    ~130-150 img/s (~3.5 min per epoch), inside the 6-minute budget.
    """
    kwargs.setdefault("head_hidden", (1024,))
    return PreActResNet((2, 2, 2, 2), (48, 96, 192, 384), num_classes, stem_kernel=3, stem_stride=1,
                        input_size=48, **kwargs)
