"""Hugging Face `DetrForObjectDetection` -> official DETR key layout.

Same numerics, other names (see docs/architecture.md): q/k/v projections merge into
`in_proj_*`, layer names map to the official ones, and the HF ResNet backbone names map
to torchvision's. Handles transformers 4.x names (`fc1`, `out_proj`,
`backbone.conv_encoder`) and 5.x names (`mlp.fc1`, `o_proj`, `backbone.model`).
"""
from __future__ import annotations

import re

import torch

# Applied in order to each key after the backbone prefix is resolved.
_RENAMES = [
    (r"^model\.input_projection\.", "input_proj."),
    (r"^model\.query_position_embeddings\.", "query_embed."),
    (r"^class_labels_classifier\.", "class_embed."),
    (r"^bbox_predictor\.", "bbox_embed."),
    (r"^model\.decoder\.layernorm\.", "transformer.decoder.norm."),
    (r"^model\.(encoder|decoder)\.layers\.", r"transformer.\1.layers."),
    (r"\.encoder_attn\.", ".multihead_attn."),
    (r"\.(o_proj|out_proj)\.", ".out_proj."),
    (r"\.(mlp\.)?fc([12])\.", r".linear\2."),
    (r"\.self_attn_layer_norm\.", ".norm1."),
    (r"(decoder\.layers\.\d+)\.encoder_attn_layer_norm\.", r"\1.norm2."),
    (r"(decoder\.layers\.\d+)\.final_layer_norm\.", r"\1.norm3."),
    (r"(encoder\.layers\.\d+)\.final_layer_norm\.", r"\1.norm2."),
]
_BACKBONE_PREFIX = re.compile(r"^model\.backbone\.(conv_encoder\.)?model\.")
_HF_STEM = re.compile(r"^embedder\.embedder\.(convolution|normalization)\.")
_HF_BLOCK = re.compile(r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.(shortcut|layer\.(\d+))\.(convolution|normalization)\.")
_QKV = re.compile(r"^(.*)\.([qkv])_proj\.(weight|bias)$")


def is_hf_state_dict(state_dict: dict) -> bool:
    return "class_labels_classifier.weight" in state_dict


def _backbone_key(rest: str) -> str:
    """HF's own ResNet (use_timm_backbone=False) -> torchvision names; timm's equal torchvision's."""
    m = _HF_STEM.match(rest)
    if m:
        return ("conv1." if m.group(1) == "convolution" else "bn1.") + rest[m.end():]
    m = _HF_BLOCK.match(rest)
    if not m:
        return rest
    stage, block, part, index, op = m.groups()
    if part == "shortcut":
        name = "downsample.0" if op == "convolution" else "downsample.1"
    else:
        name = ("conv" if op == "convolution" else "bn") + str(int(index) + 1)
    return f"layer{int(stage) + 1}.{block}.{name}.{rest[m.end():]}"


def convert_state_dict(hf: dict) -> dict:
    """HF DETR state dict -> official-layout state dict (tensors shared, not copied)."""
    out, qkv = {}, {}
    for key, value in hf.items():
        if key.endswith("num_batches_tracked"):
            continue
        m = _BACKBONE_PREFIX.match(key)
        if m:
            out["backbone.0.body." + _backbone_key(key[m.end():])] = value
            continue
        for pattern, repl in _RENAMES:
            key = re.sub(pattern, repl, key)
        m = _QKV.match(key)
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
        else:
            out[key] = value
    for (prefix, kind), parts in qkv.items():
        out[f"{prefix}.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def options_from_hf_config(hf_config: dict) -> dict:
    """What the weights cannot tell: heads, dropout, dilation and class names."""
    options = {"nheads": int(hf_config.get("encoder_attention_heads", 8)),
               "dropout": float(hf_config.get("dropout", 0.1)),
               "dilation": bool(hf_config.get("dilation", False))}
    id2label = hf_config.get("id2label")
    if id2label:
        options["classes"] = [id2label.get(str(i), id2label.get(i, "N/A")) for i in range(len(id2label))]
    return options
