"""The one definition of preprocessing (BGR uint8 frame -> model input).

Letterbox: resize keeping the aspect ratio to fit H x W, pad bottom/right, RGB, /255,
ImageNet mean/std, NCHW float32. Padding is zero *after* normalisation, exactly what the
official code's padded batches contain, and the mask (True = padded) tells the model
where it is, so the position encoding and attention ignore it.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .errors import UserError


@dataclass
class Batch:
    images: np.ndarray  # float32 [B, 3, H, W]
    mask: np.ndarray    # bool [B, H, W], True = padding
    sizes: np.ndarray   # int64 [B, 2], original (height, width) of each frame
    scales: np.ndarray  # float64 [B], resize factor of each frame


def as_bgr(frame: np.ndarray) -> np.ndarray:
    """Accept grey, BGR and BGRA uint8 frames; return BGR."""
    if frame is None or not isinstance(frame, np.ndarray) or frame.dtype != np.uint8:
        raise UserError("frame is not a uint8 image array")
    if frame.ndim == 2:
        return cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
    if frame.ndim == 3 and frame.shape[2] == 4:
        return cv2.cvtColor(frame, cv2.COLOR_BGRA2BGR)
    if frame.ndim == 3 and frame.shape[2] == 3:
        return frame
    raise UserError(f"frame of shape {frame.shape} is not a grey, BGR or BGRA image")


def letterbox_geometry(height: int, width: int, imgsz: tuple[int, int]) -> tuple[float, int, int]:
    """Scale and resized (height, width) that fit a height x width frame into imgsz."""
    target_h, target_w = imgsz
    scale = min(target_h / height, target_w / width)
    new_h = min(target_h, max(1, int(round(height * scale))))
    new_w = min(target_w, max(1, int(round(width * scale))))
    return scale, new_h, new_w


def preprocess(frames: list[np.ndarray], spec: dict) -> Batch:
    """Letterbox a list of BGR frames into one batch for the spec's fixed input size."""
    target_h, target_w = spec["imgsz"]
    mean = np.asarray(spec["mean"], np.float32)
    inv_std = 1.0 / np.asarray(spec["std"], np.float32)
    count = len(frames)
    images = np.zeros((count, 3, target_h, target_w), np.float32)
    mask = np.ones((count, target_h, target_w), bool)
    sizes = np.zeros((count, 2), np.int64)
    scales = np.zeros(count, np.float64)
    for i, frame in enumerate(frames):
        frame = as_bgr(frame)
        height, width = frame.shape[:2]
        scales[i], new_h, new_w = letterbox_geometry(height, width, (target_h, target_w))
        if (new_h, new_w) != (height, width):
            frame = cv2.resize(frame, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
        rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB).astype(np.float32)
        rgb *= 1.0 / 255.0
        rgb -= mean
        rgb *= inv_std
        images[i, :, :new_h, :new_w] = rgb.transpose(2, 0, 1)
        mask[i, :new_h, :new_w] = False
        sizes[i] = (height, width)
    return Batch(images, mask, sizes, scales)
