"""COCO evaluation with pycocotools' COCOeval: the 12 standard metrics. One function
serves `detr-edge eval` and the periodic evaluation during training."""
from __future__ import annotations

import contextlib
import io

import numpy as np
import torch

from .data import collate
from .detr import postprocess

METRICS = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
           "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large")


def coco_metrics(coco_gt, results: list[dict]) -> dict:
    """COCO results ({image_id, category_id, bbox xywh, score}) -> the 12 metrics.
    No detections at all scores 0 everywhere (COCOeval cannot load an empty list)."""
    from pycocotools.cocoeval import COCOeval
    if not results:
        return dict.fromkeys(METRICS, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        evaluator.params.imgIds = sorted(coco_gt.getImgIds())
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    # COCOeval reports -1 where a size range has no ground truth
    return {name: float(max(v, 0.0)) for name, v in zip(METRICS, evaluator.stats)}


def to_coco_results(detections: dict, image_id: int, label_to_cat: dict) -> list[dict]:
    boxes = np.asarray(detections["boxes"], np.float64)
    out = []
    for score, label, (x1, y1, x2, y2) in zip(detections["scores"], detections["labels"], boxes):
        if int(label) in label_to_cat:  # a label that is no category of this dataset cannot be right
            out.append({"image_id": int(image_id), "category_id": int(label_to_cat[int(label)]),
                        "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)})
    return out


@torch.no_grad()
def evaluate(model, dataset, batch_size: int = 8, device="cpu", num_workers: int = 0) -> dict:
    """Run `model` over a CocoDetection with an eval transform; every query's best class
    counts as a detection (no threshold), as the official evaluation does."""
    was_training = model.training
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate,
                                         num_workers=num_workers)
    results = []
    for images, mask, targets in loader:
        out = model(images.to(device), mask.to(device))
        sizes = torch.stack([t["size"] for t in targets])
        for target, det in zip(targets, postprocess(out["pred_logits"], out["pred_boxes"], sizes)):
            det = {k: v.cpu().numpy() for k, v in det.items()}
            results += to_coco_results(det, int(target["image_id"]), dataset.label_to_cat)
    model.train(was_training)
    return coco_metrics(dataset.coco, results)
