"""Hungarian matching of predictions to targets (the paper's bipartite matching).

The cost of every (prediction, target) pair is -p(class) * w_class + L1(cxcywh) * w_bbox
+ (-GIoU) * w_giou, computed for all decoder layers and all images of a batch in one
tensor expression, moved to the host once, split per layer and image and solved with
scipy's linear_sum_assignment. (The official code computes and transfers once per
decoder layer.)
"""
from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou


class HungarianMatcher(nn.Module):
    def __init__(self, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0):
        super().__init__()
        if cost_class == cost_bbox == cost_giou == 0:
            raise ValueError("all matching costs are 0")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou

    @torch.no_grad()
    def forward(self, logits: torch.Tensor, boxes: torch.Tensor, targets: list[dict]):
        """logits [L,B,N,K+1], boxes [L,B,N,4] (L decoder layers) -> for each layer a list
        of B (prediction indices, target indices) int64 pairs."""
        layers, batch, queries = logits.shape[:3]
        sizes = [len(t["labels"]) for t in targets]
        empty = torch.empty(0, dtype=torch.int64)
        if sum(sizes) == 0:
            return [[(empty, empty)] * batch for _ in range(layers)]
        prob = logits.flatten(0, 2).softmax(-1)
        pred = boxes.flatten(0, 2)
        tgt_labels = torch.cat([t["labels"] for t in targets])
        tgt_boxes = torch.cat([t["boxes"] for t in targets])
        cost = (self.cost_bbox * torch.cdist(pred, tgt_boxes, p=1)
                - self.cost_class * prob[:, tgt_labels]
                - self.cost_giou * generalized_box_iou(box_convert(pred, "cxcywh", "xyxy"),
                                                       box_convert(tgt_boxes, "cxcywh", "xyxy")))
        cost = cost.view(layers, batch, queries, -1).float().cpu()
        result = []
        for layer_cost in cost:
            per_image = []
            for b, block in enumerate(layer_cost.split(sizes, -1)):
                rows, cols = linear_sum_assignment(block[b].numpy())
                per_image.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
            result.append(per_image)
        return result
