"""torchvision's (post-activation) ResNets as LHC hosts, taking the same 0-255 RGB input.

The ImageNet mean/std normalisation is a fixed first step, so every lhcnet model sees the same
input as ResNet34v2 (whose ``bn_data`` layer normalises). Places for LHC blocks: ``net.maxpool``,
``net.layer1`` ... ``net.layer4``. ImageNet weights come from torchvision's file, converted once
(``lhcnet convert-weights resnet34-b627a593.pth --model tv_resnet34``; never downloaded here).
"""
from __future__ import annotations

import torch
from torch import nn

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


class TorchvisionResNet(nn.Module):
    """``torchvision.models.<arch>`` with a ``num_classes`` classifier and 0-255 input."""

    def __init__(self, arch: str = "resnet34", num_classes: int = 7, input_size: int = 224) -> None:
        super().__init__()
        if arch not in ("resnet18", "resnet34", "resnet50"):
            raise ValueError(f"unsupported torchvision architecture {arch!r}")
        import torchvision  # here, not at module level: it doubles `import lhcnet`'s time

        self.arch, self.input_size = arch, input_size
        self.net = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)
