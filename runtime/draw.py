"""Annotate frames with detections (OpenCV)."""
from __future__ import annotations

import colorsys

import cv2
import numpy as np


def class_color(label: int) -> tuple[int, int, int]:
    """A stable, well-spread BGR colour per class id (golden-ratio hue steps)."""
    r, g, b = colorsys.hsv_to_rgb((label * 0.618033988749895) % 1.0, 0.85, 1.0)
    return int(b * 255), int(g * 255), int(r * 255)


def draw_detections(frame: np.ndarray, detections: dict, classes: list[str]) -> np.ndarray:
    """Return a copy of `frame` with boxes, class names and scores drawn (and track ids)."""
    out = frame.copy()
    thickness = max(1, round(min(out.shape[:2]) / 300))
    ids = detections.get("ids")
    for i, (score, label, box) in enumerate(zip(detections["scores"], detections["labels"], detections["boxes"])):
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        color = class_color(int(label))
        cv2.rectangle(out, (x1, y1), (x2, y2), color, thickness)
        name = classes[label] if 0 <= label < len(classes) else str(label)
        text = (f"#{ids[i]} " if ids is not None else "") + f"{name} {score:.2f}"
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.5, 1)
        ty = max(y1, th + base)
        cv2.rectangle(out, (x1, ty - th - base), (x1 + tw, ty), color, cv2.FILLED)
        cv2.putText(out, text, (x1, ty - base), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return out
