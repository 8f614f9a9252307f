"""ResNet backbone (torchvision) with FrozenBatchNorm2d, optional DC5 dilation, and the
Joiner that adds the position encoding. Module names give the official state-dict keys:
`backbone.0.body.*` for the ResNet, `backbone.1` for the (parameter-free) encoding.

In training, each convolution followed by a FrozenBatchNorm2d computes both at once: a
frozen BatchNorm is a per-channel scale and shift, so conv(x, W * scale) + shift (or
conv(x, W) * scale + shift in one op, where the weights outnumber the output) is the same
function with one pass over the activations fewer, forward and backward (2.5% of a CPU
training step, benchmarks/train_speed.py). In eval mode, which export traces, the
two stay apart, as in the official graph."""
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import FrozenBatchNorm2d

from .config import BACKBONE_CHANNELS


class FoldedFrozenBatchNorm2d(FrozenBatchNorm2d):
    """torchvision's FrozenBatchNorm2d (the official keys and eps), which in training lets the
    convolution before it apply it (FoldingConv2d) and passes its input through."""

    def forward(self, x):
        return x if self.training else super().forward(x)

    def scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return scale, self.bias - self.running_mean * scale


class FoldingConv2d(nn.Conv2d):
    """A convolution that, in training, applies the frozen BatchNorm after it (held outside
    its state dict, so the keys stay torchvision's): its scale multiplies the weights or the
    output, whichever has fewer elements (at 128 px, batch 16, layer3's and layer4's weights
    outnumber their outputs: scaling those is 1.01-1.02x the benchmark's step, side by
    side), and its shift is the convolution's bias or added with the scale in one op (in
    the output's dtype, so that autocast's half-precision activations stay so)."""

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        scale, shift = self._bn[0].scale_shift()
        if self.scales_weight(x):
            return self._conv_forward(x, self.weight * scale[:, None, None, None], shift)
        out = self._conv_forward(x, self.weight, None)
        return torch.addcmul(shift.to(out.dtype)[:, None, None], out, scale.to(out.dtype)[:, None, None])

    def scales_weight(self, x: torch.Tensor) -> bool:
        """Whether the weights have no more elements than the output for input `x` [B,C,H,W]."""
        outputs = x.shape[0] * self.out_channels * (x.shape[-2] // self.stride[0]) * (x.shape[-1] // self.stride[1])
        return self.weight.numel() <= outputs


def fold_frozen_batchnorm(body: nn.Module) -> None:
    """Turn every (Conv2d, FoldedFrozenBatchNorm2d) pair of a torchvision ResNet into a
    FoldingConv2d and its BatchNorm: the same parameters, the same keys."""
    for parent in body.modules():
        children = list(parent.named_children())
        for (_, conv), (_, bn) in zip(children, children[1:]):
            if type(conv) is nn.Conv2d and isinstance(bn, FoldedFrozenBatchNorm2d) and conv.bias is None:
                conv.__class__ = FoldingConv2d
                conv._bn = (bn,)  # a tuple: not a submodule, no keys of its own


class Backbone(nn.Module):
    def __init__(self, name: str, dilation: bool, frozen_bn: bool):
        super().__init__()
        resnet = getattr(torchvision.models, name)(
            weights=None, replace_stride_with_dilation=[False, False, dilation],
            norm_layer=FoldedFrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d)
        if frozen_bn:
            fold_frozen_batchnorm(resnet)
        self.body = IntermediateLayerGetter(resnet, return_layers={"layer4": "0"})
        self.num_channels = BACKBONE_CHANNELS[name]

    def forward(self, images: torch.Tensor, mask: torch.Tensor):
        features = self.body(images)["0"]
        return features, downsample_mask(mask, features.shape[-2:])


def training_memory_format(backbone: nn.Module) -> None:
    """Channels-last memory order for training, where activations outweigh weights: the stem
    to layer3, whose convolutions run faster so on CPUs (oneDNN). layer4 keeps the default
    order: at the demo's size its maps are 4x4 and its 512-channel weights dominate, and a
    channels-last weight costs there a reordered gradient per convolution and a contiguous
    copy per step in the fused AdamW: the step 1.01-1.06x as fast as with every weight
    channels-last, in two side-by-side runs. The same values either way. Measured on CPUs
    only: on CUDA, and at sizes where layer4's maps are large, either may be the faster."""
    backbone.to(memory_format=torch.channels_last)
    layer4 = backbone[0].body.layer4
    layer4.to(memory_format=torch.contiguous_format)
    layer4.register_forward_pre_hook(lambda _module, inputs: (inputs[0].contiguous(),))


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
