"""The one definition of postprocessing (numpy): DETR is NMS-free.

softmax over K+1, drop the last ("no object") column, max -> (score, label),
boxes cxcywh (relative to the unpadded image) -> xyxy in original-frame pixels, clipped
to the frame; then a score threshold and/or top-k, highest score first.
`train.detr.postprocess` is the torch twin, tested equal to this.
"""
from __future__ import annotations

import numpy as np

from .errors import UserError


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def cxcywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    cx, cy, w, h = np.moveaxis(boxes, -1, 0)
    return np.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def check_conf(conf: float) -> float:
    """A score threshold in (0, 1]: at 0 every query is a detection, above 1 none is."""
    if not 0 < conf <= 1:
        raise UserError(f"--conf {conf:g}: a score threshold in (0, 1]")
    return conf


def postprocess(logits: np.ndarray, boxes: np.ndarray, sizes: np.ndarray,
                conf: float = 0.0, topk: int | None = None) -> list[dict]:
    """logits [B,N,K+1], boxes [B,N,4] cxcywh, sizes [B,2] (h, w) -> per image
    {'scores' [n], 'labels' [n], 'boxes' [n,4] xyxy pixels}, sorted by score."""
    probs = softmax(logits.astype(np.float32))[..., :-1]
    scores = probs.max(axis=-1)
    labels = probs.argmax(axis=-1)
    xyxy = cxcywh_to_xyxy(boxes.astype(np.float32))
    results = []
    for b in range(logits.shape[0]):
        height, width = (float(v) for v in sizes[b])
        scale = np.array([width, height, width, height], np.float32)
        pixel = np.clip(xyxy[b] * scale, 0.0, scale)
        order = np.argsort(-scores[b], kind="stable")
        order = order[scores[b][order] >= conf]
        if topk is not None:
            order = order[:topk]
        results.append({"scores": scores[b][order], "labels": labels[b][order].astype(np.int64),
                        "boxes": pixel[order]})
    return results


def postprocess_detections(scores: np.ndarray, labels: np.ndarray, boxes: np.ndarray, sizes: np.ndarray,
                           mask: np.ndarray, conf: float = 0.0, topk: int | None = None) -> list[dict]:
    """The outputs of a graph exported with in-graph postprocessing (scores [B,K] sorted,
    labels [B,K], xyxy boxes [B,K,4] in input pixels) -> the same per-image dicts as
    `postprocess`: boxes mapped from the unpadded input region (read from the padding
    mask [B,H,W]) onto the frame, clipped to it."""
    results = []
    for b in range(scores.shape[0]):
        height, width = (float(v) for v in sizes[b])
        valid_h, valid_w = float((~mask[b, :, 0]).sum()), float((~mask[b, 0, :]).sum())
        frame = np.array([width, height, width, height], np.float32)
        factor = frame / np.array([valid_w, valid_h, valid_w, valid_h], np.float32)
        pixel = np.clip(boxes[b].astype(np.float32) * factor, 0.0, frame)
        keep = np.flatnonzero(scores[b] >= conf)[:topk]
        results.append({"scores": scores[b][keep].astype(np.float32), "labels": labels[b][keep].astype(np.int64),
                        "boxes": pixel[keep]})
    return results


def detections_to_json(detections: dict, classes: list[str]) -> list[dict]:
    """Per-detection JSON records (label id, class name, score, xyxy box in pixels; the
    track id when tracked)."""
    ids = detections.get("ids")
    return [{**({"id": int(ids[i])} if ids is not None else {}), "label": int(label),
             "name": classes[label] if 0 <= label < len(classes) else str(label),
             "score": round(float(score), 6), "box": [round(float(v), 2) for v in box]}
            for i, (score, label, box) in enumerate(zip(detections["scores"], detections["labels"],
                                                        detections["boxes"]))]
