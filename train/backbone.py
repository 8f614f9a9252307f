"""ResNet backbone (torchvision) with FrozenBatchNorm2d, optional DC5 dilation, and the
Joiner that adds the position encoding. Module names give the official state-dict keys:
`backbone.0.body.*` for the ResNet, `backbone.1` for the (parameter-free) encoding."""
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import FrozenBatchNorm2d

from .config import BACKBONE_CHANNELS


class Backbone(nn.Module):
    def __init__(self, name: str, dilation: bool, frozen_bn: bool):
        super().__init__()
        resnet = getattr(torchvision.models, name)(
            weights=None, replace_stride_with_dilation=[False, False, dilation],
            norm_layer=FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d)
        self.body = IntermediateLayerGetter(resnet, return_layers={"layer4": "0"})
        self.num_channels = BACKBONE_CHANNELS[name]

    def forward(self, images: torch.Tensor, mask: torch.Tensor):
        features = self.body(images)["0"]
        return features, downsample_mask(mask, features.shape[-2:])


def downsample_mask(mask: torch.Tensor, size) -> torch.Tensor:
    """The padding mask [B,H,W] at a feature map's size: nearest-neighbour, as the official code."""
    return F.interpolate(mask[None].float(), size=size).to(torch.bool)[0]


class Joiner(nn.Sequential):
    def __init__(self, backbone: Backbone, position_embedding: nn.Module):
        super().__init__(backbone, position_embedding)
        self.num_channels = backbone.num_channels

    def forward(self, images: torch.Tensor, mask: torch.Tensor):
        features, mask = self[0](images, mask)
        return features, mask, self[1](mask).to(features.dtype)
