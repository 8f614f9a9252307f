"""Training-only dense supervision of the encoder and the backbone, after the auxiliary
heads of Co-DETR (Zong et al., "DETRs with Collaborative Hybrid Assignments Training", 2023).

A class head and a box head read every cell of a feature map (the encoder's output, and
optionally backbone levels such as ResNet's layer3, through a 1x1 projection); each cell
whose centre lies inside a target box (the smallest, where boxes overlap), and the cell
nearest each box centre, learns that box: one-to-many, where the decoder's matching is
one-to-one. The features then learn where the objects are long before the decoder's
matching settles, which shortens DETR's plateau (docs/training.md). The heads are dropped
after training: checkpoints and exports are plain DETR."""
from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import box_convert

from .detr import MLP

BACKBONE_HEAD_LEVELS = ("layer2", "layer3")  # ResNet stages at strides 8 and 16


class DenseHead(nn.Module):
    def __init__(self, hidden_dim: int, num_classes: int, in_channels: int | None = None):
        super().__init__()
        # a backbone level has its own width: a 1x1 projection to hidden_dim, as DETR's input_proj
        self.proj = nn.Conv2d(in_channels, hidden_dim, 1) if in_channels else nn.Identity()
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> dict:
        """features [B,C,h,w], mask [B,h,w] (True = padding) -> {'pred_logits' [B,h*w,K+1],
        'pred_boxes' [B,h*w,4] cxcywh, 'centres' [B,h*w,2] xy, 'valid' [B,h*w]}. Box centres
        are predicted relative to the cell's own centre; all coordinates are fractions of the
        unpadded image, as the targets' (padding is bottom/right)."""
        valid = ~mask
        ys = (valid.cumsum(1) - 0.5) / valid.sum(1, keepdim=True).clamp(min=1)
        xs = (valid.cumsum(2) - 0.5) / valid.sum(2, keepdim=True).clamp(min=1)
        centres = torch.stack([xs, ys], -1).flatten(1, 2).to(features.dtype)
        cells = self.proj(features).flatten(2).transpose(1, 2)
        raw = self.bbox_embed(cells)
        xy = (raw[..., :2] + torch.logit(centres.clamp(1e-4, 1 - 1e-4))).sigmoid()
        return {"pred_logits": self.class_embed(cells), "pred_boxes": torch.cat([xy, raw[..., 2:].sigmoid()], -1),
                "centres": centres, "valid": valid.flatten(1)}


@torch.no_grad()
def assign_cells(centres: torch.Tensor, valid: torch.Tensor, boxes: torch.Tensor, present: torch.Tensor):
    """One-to-many assignment, for the whole batch at once (no host synchronisation):
    centres [B,C,2], valid [B,C] cells; boxes [B,T,4] cxcywh, present [B,T] padded targets
    (data.pad_targets) -> (target index [B,C], positive [B,C]): the valid cells whose
    centre lies inside a box, plus the cell nearest each box centre; a cell inside several
    boxes takes the smallest."""
    x1, y1, x2, y2 = box_convert(boxes, "cxcywh", "xyxy")[:, None].unbind(-1)  # [B,1,T]
    cx, cy = centres[..., :1], centres[..., 1:]  # [B,C,1]
    inside = (cx > x1) & (cx < x2) & (cy > y1) & (cy < y2)  # [B,C,T]
    nearest = torch.cdist(boxes[..., :2], centres).masked_fill(~valid[:, None], float("inf")).argmin(2)  # [B,T]
    inside.scatter_(1, nearest[:, None], present[:, None])
    inside &= valid[:, :, None] & present[:, None]
    area = (boxes[..., 2] * boxes[..., 3])[:, None].expand_as(inside).masked_fill(~inside, float("inf"))
    return area.argmin(2), inside.any(2)
