"""Files: atomic writes (a killed process never leaves a half-written artifact), image
reading, the COCO layout's folder naming."""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np

from .errors import UserError


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path` (same suffix, so writers that pick a format
    from the extension still work); rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def read_image(path) -> np.ndarray:
    """A BGR image file, or one clear error."""
    frame = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if frame is None:
        raise UserError(f"{path}: not a readable image" if Path(path).exists() else f"{path}: no such file")
    return frame


def decode_image(data: bytes, what: str = "image") -> np.ndarray:
    """A BGR image from a file's bytes (JPEG, PNG, ...), decoded as `read_image` reads one."""
    if not data:
        raise UserError(f"{what}: empty bytes, not an image")
    try:
        frame = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error:  # a header that claims more pixels than OPENCV_IO_MAX_IMAGE_PIXELS allows
        raise UserError(f"{what}: an image larger than this decoder takes") from None
    if frame is None:
        raise UserError(f"{what}: {len(data)} bytes that OpenCV cannot decode as an image")
    return frame


def coco_image_folder(annotations) -> Path:
    """The image folder of a COCO instances json, by the COCO layout's naming:
    instances_val2017.json -> val2017/ beside it or beside its annotations/ folder."""
    annotations = Path(annotations)
    name = annotations.stem
    name = name[len("instances_"):] if name.startswith("instances_") else name  # str.removeprefix is 3.9+
    for folder in (annotations.parent / name, annotations.parent.parent / name):
        if folder.is_dir():
            return folder
    return annotations.parent / name
