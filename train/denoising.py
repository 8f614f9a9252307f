"""Contrastive denoising queries, training only: DN-DETR (Li et al., "DN-DETR: Accelerate
DETR Training by Introducing Query DeNoising", 2022) with DINO's contrastive negatives
(Zhang et al., "DINO: DETR with Improved DeNoising Anchor Boxes", 2022).

Each ground-truth object enters the decoder twice per denoising group, beside the
matching queries: as a positive query, its box corners jittered by less than half the
box's size and its label replaced by a random one with probability label_noise / 2,
which must reconstruct the true box and class; and as a negative query, jittered by one
to two halves, which must answer "no object". Their targets are known, so no matching
is involved: a stable signal while the Hungarian matching still flips (DN-DETR's
analysis). A query's content (the decoder's starting target, zeros for learned queries)
is its label's embedding, its position an MLP of its box's sine encoding (DAB-DETR's
anchor encoding). The decoder's self-attention (transformer.QueryBlocks) keeps the
matching queries from seeing any denoising query (they would read the answers) and each
denoising group from seeing the others; denoising queries see the model's own queries,
as in DINO. Images with fewer objects than the batch's most pad their groups with
queries that learn "no object".

The module is dropped after training: checkpoints and exports are plain DETR.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchvision.ops import box_convert

from .data import pad_targets
from .detr import MLP
from .position_encoding import sine_encoding


@dataclass
class DenoisingQueries:
    """One batch's denoising queries: pos, content [M,B,d] with M = groups * 2 * pad
    (per group: `pad` positives, then `pad` negatives) made of the noised `boxes` [M,B,4]
    cxcywh and `labels` [M,B]; `indices`: per image the (positive query index, target
    index) pairs of every group, what the loss supervises."""
    pos: torch.Tensor
    content: torch.Tensor
    boxes: torch.Tensor
    labels: torch.Tensor
    groups: int
    pad: int
    indices: list


class Denoising(nn.Module):
    def __init__(self, hidden_dim: int, num_classes: int, queries: int = 100, label_noise: float = 0.5,
                 box_noise: float = 1.0):
        """`queries`: the budget per image (DINO's 100): as many groups as fit 2 queries per
        object of the batch's fullest image, at least one. Noise as DINO's and RT-DETR's."""
        super().__init__()
        self.num_classes, self.queries = num_classes, queries
        self.label_noise, self.box_noise = label_noise, box_noise
        self.label_embed = nn.Embedding(num_classes, hidden_dim)
        self.box_embed = MLP(2 * hidden_dim, hidden_dim, hidden_dim, 2)

    def forward(self, targets: list[dict]) -> DenoisingQueries:
        """A batch with no object gets one group of padding (learning "no object"), so the
        module takes part in every step (DDP expects every parameter to)."""
        labels, boxes, valid = pad_targets(targets)  # padding: a centred box, as DINO's
        pad, device = labels.shape[1], labels.device
        groups = max(1, self.queries // (2 * pad))
        # [B, groups, 2 (positive, negative), pad]
        labels = labels[:, None, None].expand(-1, groups, 2, -1)
        boxes = boxes[:, None, None].expand(-1, groups, 2, -1, -1)
        valid = valid[:, None, None].expand(-1, groups, 2, -1)
        flip = torch.rand(labels.shape, device=device) < self.label_noise * 0.5
        labels = torch.where(flip, torch.randint_like(labels, self.num_classes), labels)
        half = boxes[..., 2:].repeat(1, 1, 1, 1, 2) / 2  # (w/2, h/2, w/2, h/2)
        shift = torch.rand(boxes.shape, device=device)
        shift[:, :, 1] += 1.0  # negatives: one to two halves away
        sign = torch.randint_like(boxes, 2) * 2 - 1
        corners = box_convert(boxes, "cxcywh", "xyxy") + sign * shift * half * self.box_noise
        noised = box_convert(corners.clamp(0, 1), "xyxy", "cxcywh")
        content = self.label_embed(labels) * valid[..., None]
        pos = self.box_embed(sine_encoding(noised, self.label_embed.embedding_dim // 2))
        group = torch.arange(groups, device=device)[:, None] * 2 * pad
        indices = []
        for t in targets:
            n = len(t["labels"])
            slots = (group + torch.arange(n, device=device)).flatten()
            indices.append((slots, torch.arange(n, device=device).repeat(groups)))
        queries = [x.flatten(1, 3).transpose(0, 1) for x in (pos, content, noised, labels)]
        return DenoisingQueries(*queries, groups, pad, indices)
