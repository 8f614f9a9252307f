"""The PyTorch reference path: runtime preprocessing -> model -> postprocessing.
Every later backend is compared with what this produces."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from detr_edge.runtime.draw import draw_detections
from detr_edge.runtime.errors import UserError
from detr_edge.runtime.io import atomic_path, read_image, write_json
from detr_edge.runtime.metadata import preprocess_spec
from detr_edge.runtime.postprocess import detections_to_json
from detr_edge.runtime.preprocess import preprocess

from .checkpoint import load_model
from .detr import DETR, postprocess


@torch.no_grad()
def predict_frames(model: DETR, frames: list[np.ndarray], spec: dict, conf: float = 0.5,
                   max_det: int | None = None) -> list[dict]:
    """BGR frames -> per-frame {'scores','labels','boxes'} numpy arrays (boxes xyxy, frame pixels)."""
    batch = preprocess(frames, spec)
    device = next(model.parameters()).device
    out = model(torch.from_numpy(batch.images).to(device), torch.from_numpy(batch.mask).to(device))
    results = postprocess(out["pred_logits"], out["pred_boxes"], torch.from_numpy(batch.sizes), conf, max_det)
    return [{k: v.cpu().numpy() for k, v in r.items()} for r in results]


def run(checkpoint, images, out_dir, imgsz=None, conf=0.5, max_det=100, device="cpu") -> dict:
    model, config = load_model(checkpoint)
    model.eval().to(device)
    spec = preprocess_spec(imgsz) if imgsz else config["preprocess"]
    report = {"checkpoint": str(checkpoint), "imgsz": spec["imgsz"], "conf": conf, "images": []}
    out_dir = Path(out_dir)
    for path in images:
        frame = read_image(path)
        detections = predict_frames(model, [frame], spec, conf, max_det)[0]
        with atomic_path(out_dir / f"{Path(path).stem}.jpg") as tmp:
            if not cv2.imwrite(str(tmp), draw_detections(frame, detections, config["classes"])):
                raise UserError(f"{out_dir}: could not write the annotated image")
        report["images"].append({"file": str(path), "height": frame.shape[0], "width": frame.shape[1],
                                 "detections": detections_to_json(detections, config["classes"])})
    write_json(out_dir / "predictions.json", report)
    return report
