"""The ResNet-50/101 trunk of DETR's backbone, without importing torchvision.

``import torchvision`` pulls in ``torchvision.ops``, which imports ``torch._dynamo``: about
3 CPU-seconds of every ``extractor run`` start (8-10 s wall on the shared machine), for
two module classes. This is torchvision's ResNet v1.5 (stride in the 3x3 conv) with the
same module names, registration order and arithmetic, so official checkpoints load with
``strict=True``, :func:`extractor.checkpoints.seeded_state_dict` draws the same tensors,
and the outputs are torchvision's bit for bit (tests/test_fastpath.py compares them).
"""
from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

_LAYERS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}
_EXPANSION = 4


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride, dilation) -> 1x1 with a residual: ``[B, Cin, H, W] -> [B, 4*planes, H/s, W/s]``."""

    def __init__(self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None,
                 dilation: int, norm_layer: Callable[[int], nn.Module]) -> None:
        super().__init__()
        # Registration order = torchvision's: the state dict's key order follows it.
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = norm_layer(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = norm_layer(planes)
        self.conv3 = nn.Conv2d(planes, planes * _EXPANSION, 1, bias=False)
        self.bn3 = norm_layer(planes * _EXPANSION)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


def trunk_modules(name: str, dilation: bool, norm_layer: Callable[[int], nn.Module]) -> dict[str, nn.Module]:
    """conv1, bn1, relu, maxpool, layer1..layer4 of torchvision's ``resnet50/101`` (``fc``/``avgpool``
    left out); ``dilation`` replaces layer4's stride by dilation 2 (DETR's DC5)."""
    inplanes, current_dilation = 64, 1
    modules: dict[str, nn.Module] = {
        "conv1": nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False), "bn1": norm_layer(64),
        "relu": nn.ReLU(inplace=True), "maxpool": nn.MaxPool2d(3, stride=2, padding=1)}
    for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), _LAYERS[name])):
        stride = 1 if i == 0 else 2
        previous_dilation = current_dilation
        if dilation and i == 3:
            current_dilation, stride = current_dilation * stride, 1
        downsample = None
        if stride != 1 or inplanes != planes * _EXPANSION:
            downsample = nn.Sequential(nn.Conv2d(inplanes, planes * _EXPANSION, 1, stride=stride, bias=False),
                                       norm_layer(planes * _EXPANSION))
        layer = [Bottleneck(inplanes, planes, stride, downsample, previous_dilation, norm_layer)]
        inplanes = planes * _EXPANSION
        layer += [Bottleneck(inplanes, planes, 1, None, current_dilation, norm_layer) for _ in range(1, blocks)]
        modules[f"layer{i + 1}"] = nn.Sequential(*layer)
    return modules
