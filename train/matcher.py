"""Hungarian matching of predictions to targets (the paper's bipartite matching).

The cost of every (prediction, target) pair is -p(class) * w_class + L1(cxcywh) * w_bbox
+ (-GIoU) * w_giou, computed for all decoder layers and all images of a batch in one
tensor expression, moved to the host once, split per layer and image and solved with
scipy's linear_sum_assignment; the indices of all of them return to the device in one
copy. (The official code computes and transfers once per decoder layer and image, and
its indices stay on the host, each use another transfer.)
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou


def upload(host: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on `device` without a synchronisation: from pinned memory, asynchronously."""
    if torch.device(device).type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


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
        empty = torch.empty(0, dtype=torch.int64, device=logits.device)
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
        cost = cost.view(layers, batch, queries, -1).float().cpu()  # the step's one host synchronisation
        pairs = [linear_sum_assignment(block[b].numpy()) for layer_cost in cost
                 for b, block in enumerate(layer_cost.split(sizes, -1))]
        # every layer's and image's indices go back to the device in one copy
        flat = torch.from_numpy(np.concatenate([np.concatenate(p) for p in pairs]).astype(np.int64))
        lengths = [len(rows) for rows, _ in pairs for _ in range(2)]
        split = upload(flat, logits.device).split(lengths)
        per_image = list(zip(split[0::2], split[1::2]))
        return [per_image[i * batch:(i + 1) * batch] for i in range(layers)]
