"""COCO evaluation of the PyTorch model: the 12 standard metrics (runtime.coco scores them).
One function serves `detr-edge eval` and the periodic evaluation during training."""
from __future__ import annotations

import torch

from detr_edge.runtime.coco import coco_metrics, recall_by_aspect, to_coco_results

from .data import collate
from .detr import postprocess


@torch.no_grad()
def evaluate(model, dataset, batch_size: int = 8, device="cpu", num_workers: int = 0) -> dict:
    """Run `model` over a CocoDetection with an eval transform; every query's best class
    counts as a detection (no threshold), as the official evaluation does. A dataset of
    several frame shapes (a 'cameras' split) also gets, per shape, the recall at IoU >= 0.5
    of the detections at score >= 0.5 and their mean IoU ('recall_16:9', 'mean_iou_16:9', ...)."""
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
    metrics = coco_metrics(dataset.coco, results)
    shapes = recall_by_aspect(dataset.coco, results)
    if len(shapes) > 1:
        for name, group in shapes.items():
            metrics[f"recall_{name}"], metrics[f"mean_iou_{name}"] = group["recall"], group["mean_iou"]
    return metrics
