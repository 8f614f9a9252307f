"""The encoder-decoder transformer of DETR (post-norm by default, pre-norm optional).

Position encodings are added to queries and keys, never values, at every attention
layer; the decoder target starts at zero with the learned queries as `query_pos`; the
decoder returns every layer's output through its final LayerNorm (for the aux losses).
Sequences are (length, batch, dim) as in nn.MultiheadAttention's default layout, which
keeps the official parameter names (`in_proj_weight`, `out_proj`).
"""
from __future__ import annotations

import copy
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


def _clones(module: nn.Module, n: int) -> nn.ModuleList:
    return nn.ModuleList(copy.deepcopy(module) for _ in range(n))


def _with_pos(x: torch.Tensor, pos):
    return x if pos is None else x + pos


class QueryBlocks(NamedTuple):
    """Who sees whom in the decoder's self-attention in training: the model's `own` queries,
    `groups - 1` more groups of as many (Group DETR: no group sees another), then
    `denoising_groups` groups of `denoising_size` denoising queries, each seeing itself and
    the model's own queries (DINO), seen by none of the matching queries."""
    own: int
    groups: int = 1
    denoising_groups: int = 0
    denoising_size: int = 0

    def mask(self) -> torch.Tensor:
        """The same as an attention mask [Q,Q] (True = blocked; rows attend to columns): the
        definition the block-by-block attention is tested against."""
        blocks = ([torch.ones(self.own, self.own, dtype=torch.bool)] * self.groups
                  + [torch.ones(self.denoising_size, self.denoising_size, dtype=torch.bool)] * self.denoising_groups)
        visible = torch.block_diag(*blocks)
        visible[self.own * self.groups:, :self.own] = True
        return ~visible


def blockwise_self_attention(attn: nn.MultiheadAttention, query, key, value, blocks: QueryBlocks):
    """query/key/value [Q,B,d] -> [Q,B,d]: `attn` under the mask `blocks.mask()`, computed
    block by block: each group attends within itself (a denoising group also to the own
    queries' keys), so no [B*heads, Q, Q] score matrix is ever made; with hundreds of
    denoising queries that matrix, mostly masked, dominated the decoder's time."""
    heads, (_, batch, d) = attn.num_heads, query.shape
    q, k, v = (F.linear(x, w, b) for x, w, b in zip((query, key, value), attn.in_proj_weight.chunk(3),
                                                         attn.in_proj_bias.chunk(3)))
    dropout = attn.dropout if attn.training else 0.0

    def split(x, start, size, count):  # rows [start, start + size*count) -> [B, heads, count, size, d/heads]
        return x[start:start + size * count].reshape(count, size, batch, heads, -1).permute(2, 3, 0, 1, 4)

    def merge(x):  # the inverse: [B, heads, count, size, d/heads] -> [count*size, B, d]
        return x.permute(2, 3, 0, 1, 4).reshape(-1, batch, d)

    n, g = blocks.own, blocks.groups
    out = [merge(F.scaled_dot_product_attention(*(split(x, 0, n, g) for x in (q, k, v)), dropout_p=dropout))]
    if blocks.denoising_groups:
        start, size, count = n * g, blocks.denoising_size, blocks.denoising_groups
        own_k, own_v = (split(x, 0, n, 1).expand(-1, -1, count, -1, -1) for x in (k, v))
        keys, values = (torch.cat([own, split(x, start, size, count)], 3) for own, x in ((own_k, k), (own_v, v)))
        out.append(merge(F.scaled_dot_product_attention(split(q, start, size, count), keys, values,
                                                        dropout_p=dropout)))
    return attn.out_proj(torch.cat(out))


class EncoderLayer(nn.Module):
    def __init__(self, d_model, nhead, dim_feedforward, dropout, pre_norm):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.pre_norm = pre_norm

    def _attend(self, x, pos, key_padding_mask):
        q = k = _with_pos(x, pos)
        return self.dropout1(self.self_attn(q, k, value=x, key_padding_mask=key_padding_mask)[0])

    def _feed_forward(self, x):
        return self.dropout2(self.linear2(self.dropout(F.relu(self.linear1(x)))))

    def forward(self, src, key_padding_mask, pos):
        if self.pre_norm:
            src = src + self._attend(self.norm1(src), pos, key_padding_mask)
            return src + self._feed_forward(self.norm2(src))
        src = self.norm1(src + self._attend(src, pos, key_padding_mask))
        return self.norm2(src + self._feed_forward(src))


class DecoderLayer(nn.Module):
    def __init__(self, d_model, nhead, dim_feedforward, dropout, pre_norm):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.pre_norm = pre_norm

    def _self_attend(self, tgt, query_pos, blocks):
        q = k = _with_pos(tgt, query_pos)
        if blocks is None:
            return self.dropout1(self.self_attn(q, k, value=tgt)[0])
        return self.dropout1(blockwise_self_attention(self.self_attn, q, k, tgt, blocks))

    def _cross_attend(self, tgt, memory, memory_key_padding_mask, pos, query_pos):
        out = self.multihead_attn(query=_with_pos(tgt, query_pos), key=_with_pos(memory, pos),
                                  value=memory, key_padding_mask=memory_key_padding_mask)[0]
        return self.dropout2(out)

    def _feed_forward(self, x):
        return self.dropout3(self.linear2(self.dropout(F.relu(self.linear1(x)))))

    def forward(self, tgt, memory, memory_key_padding_mask, pos, query_pos, blocks=None):
        if self.pre_norm:
            tgt = tgt + self._self_attend(self.norm1(tgt), query_pos, blocks)
            tgt = tgt + self._cross_attend(self.norm2(tgt), memory, memory_key_padding_mask, pos, query_pos)
            return tgt + self._feed_forward(self.norm3(tgt))
        tgt = self.norm1(tgt + self._self_attend(tgt, query_pos, blocks))
        tgt = self.norm2(tgt + self._cross_attend(tgt, memory, memory_key_padding_mask, pos, query_pos))
        return self.norm3(tgt + self._feed_forward(tgt))


class Encoder(nn.Module):
    def __init__(self, layer, num_layers, norm=None):
        super().__init__()
        self.layers = _clones(layer, num_layers)
        self.norm = norm  # only with pre-norm, as the official code

    def forward(self, src, key_padding_mask, pos):
        for layer in self.layers:
            src = layer(src, key_padding_mask, pos)
        return src if self.norm is None else self.norm(src)


class Decoder(nn.Module):
    def __init__(self, layer, num_layers, norm):
        super().__init__()
        self.layers = _clones(layer, num_layers)
        self.norm = norm

    def forward(self, tgt, memory, memory_key_padding_mask, pos, query_pos, blocks=None):
        """-> [num_layers, num_queries, batch, d_model], every layer through the final norm."""
        intermediate = []
        for layer in self.layers:
            tgt = layer(tgt, memory, memory_key_padding_mask, pos, query_pos, blocks)
            intermediate.append(self.norm(tgt))
        return torch.stack(intermediate)


class Transformer(nn.Module):
    def __init__(self, d_model=256, nhead=8, num_encoder_layers=6, num_decoder_layers=6,
                 dim_feedforward=2048, dropout=0.1, pre_norm=False):
        super().__init__()
        args = (d_model, nhead, dim_feedforward, dropout, pre_norm)
        self.encoder = Encoder(EncoderLayer(*args), num_encoder_layers, nn.LayerNorm(d_model) if pre_norm else None)
        self.decoder = Decoder(DecoderLayer(*args), num_decoder_layers, nn.LayerNorm(d_model))
        self.d_model = d_model
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, src, mask, query_embed, pos_embed, extra=None):
        """src/pos_embed [B,C,h,w], mask [B,h,w], query_embed [N,C] -> hs [L,B,N(+M),C], memory [B,C,h,w].
        `extra` (training only, detr.ExtraQueries): M more queries with their own starting
        targets, and the QueryBlocks that say which queries see which."""
        bs, c, h, w = src.shape
        src = src.flatten(2).permute(2, 0, 1)
        pos_embed = pos_embed.flatten(2).permute(2, 0, 1)
        query_embed = query_embed.unsqueeze(1).repeat(1, bs, 1)
        mask = mask.flatten(1)
        memory = self.encoder(src, key_padding_mask=mask, pos=pos_embed)
        tgt = torch.zeros_like(query_embed)
        blocks = None
        if extra is not None:
            query_embed, tgt = torch.cat([query_embed, extra.pos]), torch.cat([tgt, extra.content])
            blocks = extra.blocks
        hs = self.decoder(tgt, memory, memory_key_padding_mask=mask, pos=pos_embed, query_pos=query_embed,
                          blocks=blocks)
        return hs.transpose(1, 2), memory.permute(1, 2, 0).reshape(bs, c, h, w)
