"""CLEAR MOT and identity metrics of a tracker's output against ground truth, through
motmetrics (py-motmetrics, the MOTChallenge's reference in Python). Shared by the tracking
tests and any benchmark or docs script: `from mot import evaluate` with tests/ on sys.path.

motmetrics 1.4's own IoU helper (`distances.iou_matrix`) calls `np.asfarray`, which NumPy
2.0 removed, so the IoU distances are computed here and fed to `MOTAccumulator.update`.
The figures equal `trackers.eval`'s (a port of TrackEval, the MOTChallenge's scorer) on
the tracking tests' runs: MOTA, IDF1 and ID switches to the last digit."""
from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

METRICS = ("mota", "motp", "idf1", "num_switches", "precision", "recall", "num_false_positives", "num_misses",
           "num_objects", "num_predictions", "mostly_tracked", "mostly_lost", "num_fragmentations",
           "num_unique_objects", "num_frames")


def iou_distance(gt: np.ndarray, hyp: np.ndarray, max_iou: float = 0.5) -> np.ndarray:
    """1 - IoU of xyxy boxes [G, 4] x [H, 4]; NaN (no match possible) where IoU < max_iou,
    as motmetrics' own helper."""
    gt, hyp = np.asarray(gt, np.float64).reshape(-1, 4), np.asarray(hyp, np.float64).reshape(-1, 4)
    lt = np.maximum(gt[:, None, :2], hyp[None, :, :2])
    rb = np.minimum(gt[:, None, 2:], hyp[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    union = _area(gt)[:, None] + _area(hyp)[None, :] - inter
    distance = 1 - inter / np.maximum(union, 1e-9)
    distance[distance > 1 - max_iou] = np.nan
    return distance


def _area(boxes: np.ndarray) -> np.ndarray:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def oracle_ids(gt: list[dict], detections: list[dict], max_iou: float = 0.5) -> list[dict]:
    """The detections with the ids a perfect tracker would give them: each box the id of
    the true box it overlaps (one to one, IoU >= max_iou), a new id otherwise. Scored with
    `evaluate`, the bound a tracker on these detections can reach."""
    out, fresh = [], 1 + max((int(t["ids"].max()) for t in gt if len(t["ids"])), default=0)
    for truth, found in zip(gt, detections):
        ids = np.full(len(found["boxes"]), -1, np.int64)
        if len(ids) and len(truth["ids"]):
            distance = np.nan_to_num(iou_distance(truth["boxes"], found["boxes"], max_iou), nan=np.inf)
            rows, cols = linear_sum_assignment(np.where(np.isinf(distance), 1e6, distance))
            matched = np.isfinite(distance[rows, cols])
            ids[cols[matched]] = truth["ids"][rows[matched]]
        for j in np.flatnonzero(ids < 0):
            ids[j], fresh = fresh, fresh + 1
        out.append(dict(found, ids=ids))
    return out


def evaluate(gt: list[dict], hyp: list[dict], max_iou: float = 0.5) -> dict:
    """Per frame ground truth {'ids', 'boxes' xyxy} and tracker output
    {'ids', 'boxes' xyxy} (the same frames, in order) -> {metric: value} for METRICS.
    Matching is class-agnostic, at IoU >= max_iou (MOTChallenge: 0.5)."""
    import motmetrics as mm
    if len(gt) != len(hyp):
        raise ValueError(f"{len(gt)} ground-truth frames, {len(hyp)} tracked frames")
    acc = mm.MOTAccumulator(auto_id=True)
    for truth, tracked in zip(gt, hyp):
        acc.update([int(i) for i in truth["ids"]], [int(i) for i in tracked["ids"]],
                   iou_distance(truth["boxes"], tracked["boxes"], max_iou))
    summary = mm.metrics.create().compute(acc, metrics=list(METRICS), name="seq")
    return {name: float(summary[name].iloc[0]) for name in METRICS}
