"""Anchored queries at initialisation (`--query-init anchors`), training only: where the
official code starts each query's positional embedding at random, each starts as the
sine encoding of a random anchor point, the same encoding the memory's positions have
(train/position_encoding.py), and the decoder's cross-attention starts by comparing the
two: its query and key projections pick, for every head, the high-frequency y and x
channels (W_q W_k^T a selection, as mimetic initialisation sets W_q W_k^T near the
identity: Trockman & Kolter, "Mimetic Initialization of Self-Attention Layers", 2023).
So from the first step each query reads the memory around its anchor, as Conditional
DETR's and Anchor DETR's queries do by construction, which DETR otherwise spends its
first hundreds of steps learning (the plateau of docs/training.md). The query groups'
queries start anchored too, and the denoising queries' position MLP starts as the same
encoding of their box's centre.

Only starting values change: the model is the official architecture with the official
parameter names, and the optimiser may move every value anywhere.
"""
from __future__ import annotations

import torch
from torch import nn

from detr_edge.runtime.errors import UserError

from .detr import DETR, MLP
from .position_encoding import sine_encoding

SCALE = 2.0   # the anchored embeddings' amplitude (a sine encoding's channels are in [-1, 1])
GAIN = 2.0    # the query projection's gain on the selected channels: how sharply a query attends
KEEP = 0.5    # the share of the random (xavier) projections kept beside the selection


def anchored(points: torch.Tensor, d: int) -> torch.Tensor:
    """points [N,2] (x, y) in [0,1] -> [N,d]: SCALE times their sine encoding laid out as
    the memory's positions, y channels then x channels."""
    return SCALE * sine_encoding(points.flip(-1), d // 2)


def selection(d: int, heads: int) -> torch.Tensor:
    """[d,d]: each head's rows pick d/heads/2 channels of y and as many of x, the highest
    frequencies in the first half of the heads, the next ones in the second (a sharp and
    a broader look around the anchor); so d/heads channels of each coordinate are compared."""
    per_head, half = d // heads, d // 2
    width = per_head // 2
    if heads < 2 or per_head % 2:
        raise UserError(f"--query-init anchors needs at least 2 heads of an even width, not {heads} of {per_head}")
    picked = torch.zeros(d, d)
    for head in range(heads):
        first = 0 if head < heads // 2 else width
        channels = [*range(first, first + width), *range(half + first, half + first + width)]
        picked[head * per_head + torch.arange(per_head), torch.tensor(channels)] = 1.0
    return picked


@torch.no_grad()
def anchor_model(model: DETR) -> None:
    """The model's queries at random anchors, its cross-attention comparing positions."""
    d, heads = model.config.hidden_dim, model.config.nheads
    model.query_embed.weight.copy_(anchored(torch.rand(model.config.num_queries, 2), d))
    picked = selection(d, heads)
    for layer in model.transformer.decoder.layers:
        w_q, w_k, _ = layer.multihead_attn.in_proj_weight.chunk(3)
        w_q.mul_(KEEP).add_(GAIN * picked)
        w_k.mul_(KEEP).add_(picked)


@torch.no_grad()
def anchor_training_parts(group_queries: nn.Parameter | None, box_embed: MLP | None, heads: int) -> None:
    """The extra groups' queries at random anchors; the denoising position MLP (box sine
    encoding [cx, cy, w, h] -> d) starting as `anchored` of the box's centre on the
    channels the cross-attention compares (`selection`), each through a ReLU pair
    (v = relu(v) - relu(-v))."""
    if group_queries is not None:
        group_queries.copy_(anchored(torch.rand(group_queries.shape[0], 2), group_queries.shape[1]))
    if box_embed is None:
        return
    first, second = box_embed.layers
    d = second.out_features
    half, compared = d // 2, d // heads  # the channels per coordinate that some head compares
    # (input channel of the box encoding, output channel): cy -> y channels, cx -> x channels
    routes = [(half + i, i) for i in range(compared)] + [(i, half + i) for i in range(compared)]
    if 2 * len(routes) > first.out_features:
        raise UserError("--query-init anchors: the denoising position MLP is too narrow for the heads' channels")
    for k, (source, target) in enumerate(routes):
        for unit, sign in ((2 * k, 1.0), (2 * k + 1, -1.0)):
            first.weight[unit].zero_()
            first.weight[unit, source] = sign
            first.bias[unit] = 0.0
        second.weight[target].zero_()
        second.weight[target, 2 * k], second.weight[target, 2 * k + 1] = SCALE, -SCALE
        second.bias[target] = 0.0
