"""DETR: backbone -> 1x1 input projection -> transformer with learned queries -> class
head (K+1, last = "no object") and 3-layer box MLP with sigmoid, one prediction per
query per decoder layer (the intermediate layers feed the auxiliary losses)."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert, clip_boxes_to_image

from .backbone import Backbone, Joiner
from .config import DETRConfig
from .position_encoding import PositionEmbeddingSine
from .transformer import QueryBlocks, Transformer


class MLP(nn.Module):
    """Feed-forward head: Linear layers with ReLU between (the box head)."""

    def __init__(self, input_dim, hidden_dim, output_dim, num_layers):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < len(self.layers) - 1 else layer(x)
        return x


class ExtraQueries(NamedTuple):
    """Queries decoded after the model's own N in training: pos [M,B,d] their positional
    queries, content [M,B,d] their decoder targets at the start (zeros for learned ones),
    blocks: which of the N+M queries see which in the decoder's self-attention."""
    pos: torch.Tensor
    content: torch.Tensor
    blocks: QueryBlocks


class DETR(nn.Module):
    def __init__(self, config: DETRConfig):
        super().__init__()
        self.config = config
        d = config.hidden_dim
        self.transformer = Transformer(d, config.nheads, config.enc_layers, config.dec_layers,
                                       config.dim_feedforward, config.dropout, config.pre_norm)
        self.class_embed = nn.Linear(d, config.num_classes + 1)
        self.bbox_embed = MLP(d, d, 4, 3)
        self.query_embed = nn.Embedding(config.num_queries, d)
        self.backbone = Joiner(Backbone(config.backbone, config.dilation, config.frozen_bn),
                               PositionEmbeddingSine(d // 2, normalize=True))
        self.input_proj = nn.Conv2d(self.backbone.num_channels, d, kernel_size=1)

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None, extra=None) -> dict:
        """images [B,3,H,W], mask [B,H,W] (True = padding) -> {'pred_logits' [B,N,K+1],
        'pred_boxes' [B,N,4] cxcywh in [0,1] of the unpadded image, 'aux_outputs': [...],
        'memory' [B,d,h,w] (the encoder's output), 'memory_mask' [B,h,w]}.

        `extra` (training only: Group DETR's groups, denoising queries): ExtraQueries decoded
        after the model's own, so outputs have N+M queries."""
        if mask is None:
            mask = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool, device=images.device)
        features, mask, pos = self.backbone(images, mask)
        hs, memory = self.transformer(self.input_proj(features), mask, self.query_embed.weight, pos, extra)
        logits = self.class_embed(hs)
        boxes = self.bbox_embed(hs).sigmoid()
        return {"pred_logits": logits[-1], "pred_boxes": boxes[-1],
                "aux_outputs": [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])],
                "memory": memory, "memory_mask": mask}


def class_scores(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [..., K+1] -> (score, label) per query: softmax, "no object" dropped, max."""
    return logits.float().softmax(-1)[..., :-1].max(-1)


@torch.no_grad()
def postprocess(logits: torch.Tensor, boxes: torch.Tensor, sizes: torch.Tensor,
                conf: float = 0.0, topk: int | None = None) -> list[dict]:
    """Torch twin of `runtime.postprocess.postprocess` (tested equal to it)."""
    scores, labels = class_scores(logits)
    xyxy = box_convert(boxes.float(), "cxcywh", "xyxy")
    results = []
    for b in range(logits.shape[0]):
        height, width = (int(v) for v in sizes[b])
        scale = torch.tensor([width, height, width, height], dtype=torch.float32, device=boxes.device)
        pixel = clip_boxes_to_image(xyxy[b] * scale, (height, width))
        order = torch.sort(scores[b], descending=True, stable=True).indices
        order = order[scores[b][order] >= conf]
        if topk is not None:
            order = order[:topk]
        results.append({"scores": scores[b][order], "labels": labels[b][order], "boxes": pixel[order]})
    return results
