"""Sine position encoding of the paper, computed from the padding mask.

Coordinates are cumulative sums over the *non-padded* pixels, normalised by the
unpadded extent, so a padded image gets the same encoding as the unpadded one over its
valid region. Output channels: y-half then x-half (as the official code).
"""
import math

import torch
from torch import nn


class PositionEmbeddingSine(nn.Module):
    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000.0,
                 normalize: bool = True, scale: float = 2 * math.pi):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        """mask [B, h, w] (True = padded) -> [B, 2 * num_pos_feats, h, w]."""
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * (dim_t // 2) / self.num_pos_feats)
        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def sine_encoding(boxes: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """boxes [...,C] in [0,1] (C coordinates, e.g. cx, cy, w, h) -> [..., C*dim]: each
    coordinate as `dim` sines and cosines of geometric frequencies, one coordinate after
    the other, as PositionEmbeddingSine encodes y and x (with num_pos_feats = dim, a
    coordinate v there is the unpadded extent's share (row + 1) / h, here v itself)."""
    freqs = temperature ** (2 * (torch.arange(dim, device=boxes.device) // 2) / dim)
    angles = boxes[..., None] * (2 * math.pi) / freqs
    return torch.stack([angles[..., 0::2].sin(), angles[..., 1::2].cos()], -1).flatten(-3)
