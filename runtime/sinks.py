"""Where results go: an annotated video file, JSON lines, a window. Files are written
under a temporary name and renamed when closed, so an interrupted run never leaves a
half-written artifact under the requested name."""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import cv2
import numpy as np

from .draw import draw_detections
from .errors import UserError
from .postprocess import detections_to_json

log = logging.getLogger(__name__)


class _AtomicFile:
    def __init__(self, path):
        self.path = Path(path)
        if self.path.is_dir():
            raise UserError(f"{self.path}: a folder, not a file name")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.stem}.{os.getpid()}.tmp{self.path.suffix}")

    def finish(self, ok: bool) -> None:
        if ok and self.tmp.exists():
            os.replace(self.tmp, self.path)
        elif self.tmp.exists():
            self.tmp.unlink()


# the mp4v (MPEG-4 part 2) writer's frame sizes, measured with PyPI's OpenCV 5.0
MIN_SIDE, MAX_SIDE = 2, 8191


class VideoSink(_AtomicFile):
    """An mp4 of every frame. The first frame sets the video's size (rounded down to even
    sides, as 4:2:0 video needs); a frame of another size (a folder of mixed photos) is
    letterboxed into it, centred, so none is dropped: a video has one frame size, and
    OpenCV's writer silently skips frames that do not match it."""

    def __init__(self, path, fps: float):
        super().__init__(path)
        self.fps, self.writer, self.size = fps or 25.0, None, None

    def write(self, image) -> None:
        if self.writer is None:
            height, width = image.shape[:2]
            if not (MIN_SIDE <= width <= MAX_SIDE and MIN_SIDE <= height <= MAX_SIDE):
                raise UserError(f"{self.path}: the mp4v video writer takes frames of {MIN_SIDE} x {MIN_SIDE} to "
                                f"{MAX_SIDE} x {MAX_SIDE} pixels; the first frame is {width} x {height} "
                                f"(too {'small' if min(width, height) < MIN_SIDE else 'large'})")
            self.size = height, width = height - height % 2, width - width % 2  # 4:2:0 video: even sides
            self.writer = cv2.VideoWriter(str(self.tmp), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, (width, height))
            if not self.writer.isOpened():
                raise UserError(f"{self.path}: OpenCV cannot open an mp4v writer for {width} x {height} frames here")
        if image.shape[:2] != self.size:
            image = _letterbox(image, self.size)
        self.writer.write(image)

    def close(self, ok: bool = True) -> None:
        if self.writer is not None:
            self.writer.release()
        self.finish(ok)


class JsonlSink(_AtomicFile):
    def __init__(self, path, classes: list[str]):
        super().__init__(path)
        self.classes, self.file = classes, open(self.tmp, "w")

    def write(self, result) -> None:
        record = {"source": result.source, "stream": result.stream, "frame": result.index,
                  "timestamp": round(result.timestamp, 4), **({"gap_s": round(result.gap_s, 3)} if result.gap_s else {}),
                  "detections": detections_to_json(result.detections, self.classes)}
        self.file.write(json.dumps(record) + "\n")

    def close(self, ok: bool = True) -> None:
        self.file.close()
        self.finish(ok)


class WindowSink:
    def __init__(self, title: str):
        self.title = title
        self.enabled = sys.platform in ("win32", "darwin") or bool(os.environ.get("DISPLAY") or
                                                                   os.environ.get("WAYLAND_DISPLAY"))
        if not self.enabled:
            log.warning("--show: no display here (DISPLAY is not set); not showing frames")

    def write(self, image) -> bool:
        """False when the user closed the window or pressed q/Esc."""
        if not self.enabled:
            return True
        try:
            cv2.imshow(self.title, image)
        except cv2.error:  # an OpenCV built without GUI support (opencv-python-headless)
            log.warning("--show: this OpenCV has no GUI support; not showing frames")
            self.enabled = False
            return True
        return cv2.waitKey(1) & 0xFF not in (ord("q"), 27)

    def close(self, ok: bool = True) -> None:
        if self.enabled:
            cv2.destroyWindow(self.title)


def _letterbox(image: np.ndarray, size) -> np.ndarray:
    """`image` scaled to fit `size` (H, W), aspect kept, centred on black; a frame one pixel
    over (the first frame's odd side) loses its last row or column instead."""
    height, width = size
    if 0 <= image.shape[0] - height <= 1 and 0 <= image.shape[1] - width <= 1:
        return image[:height, :width]
    scale = min(width / image.shape[1], height / image.shape[0])
    resized = cv2.resize(image, (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale))),
                         interpolation=cv2.INTER_AREA)
    canvas = np.zeros((height, width, 3), np.uint8)
    top, left = (height - resized.shape[0]) // 2, (width - resized.shape[1]) // 2
    canvas[top:top + resized.shape[0], left:left + resized.shape[1]] = resized
    return canvas


def annotate(result, classes: list[str], fps: float) -> "cv2.Mat":
    image = draw_detections(result.frame, result.detections, classes)
    cv2.putText(image, f"{fps:.1f} FPS", (8, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(image, f"{fps:.1f} FPS", (8, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 1, cv2.LINE_AA)
    return image
