"""Calibration samples: frames from an image folder, a COCO json (the images it lists) or a
video file (every k-th frame), read by the runtime's own sources and preprocessed by its
own `preprocess`, so calibration sees exactly the tensors deployment feeds the engine,
padding mask included."""
from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from detr_edge.runtime.errors import UserError
from detr_edge.runtime.io import coco_image_folder
from detr_edge.runtime.preprocess import preprocess
from detr_edge.runtime.sources import open_source


def image_paths(annotations: Path) -> list[Path]:
    """The images a COCO json lists (in the COCO layout's folder, else beside the json)."""
    try:
        listed = [image["file_name"] for image in json.loads(annotations.read_text())["images"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{annotations}: not a COCO json with an 'images' list ({type(exc).__name__})") from None
    folder = coco_image_folder(annotations)
    return [(folder if folder.is_dir() else annotations.parent) / name for name in listed]


def frames(source, samples: int, every: int = 1) -> Iterator[np.ndarray]:
    """Up to `samples` BGR frames of an image folder or video (the runtime's sources:
    unreadable images are skipped; a video gives every `every`-th frame) or of the images
    a COCO json lists."""
    source = Path(source)
    if source.suffix.lower() == ".json":
        if not source.exists():
            raise UserError(f"{source}: no such file")
        readable = (cv2.imread(str(p), cv2.IMREAD_COLOR) for p in image_paths(source))
        yield from itertools.islice((f for f in readable if f is not None), samples)
        return
    opened = open_source(str(source))
    try:
        items = iter(opened.read, None)
        yield from itertools.islice((frame for frame, _ in itertools.islice(items, 0, None, every)), samples)
    finally:
        opened.close()


class Samples:
    """Preprocessed calibration batches for one model (its spec and batch size), read once
    per pass by `batches()`."""

    def __init__(self, source, spec: dict, samples: int = 256, every: int = 1, batch: int = 1,
                 progress: bool = True):
        if samples < 1 or every < 1 or batch < 1:
            raise UserError("samples, every and batch must be >= 1")
        self.source, self.spec, self.samples, self.every, self.batch = source, spec, samples, every, batch
        self.progress = progress
        self.count = 0

    def batches(self) -> Iterator[dict]:
        """{'images', 'mask'} of `batch` frames each (the last one topped up with repeats)."""
        try:
            from tqdm import tqdm
        except ImportError:  # the runtime-only install has no tqdm
            def tqdm(iterable, **_):
                return iterable
        pending = []
        self.count = 0
        for frame in tqdm(frames(self.source, self.samples, self.every), total=self.samples, desc="calibration",
                          unit="img", disable=None if self.progress else True):
            pending.append(frame)
            self.count += 1
            if len(pending) == self.batch:
                yield self._feed(pending)
                pending = []
        if pending:
            yield self._feed(pending + pending[:1] * (self.batch - len(pending)))
        if self.count == 0:
            raise UserError(f"{self.source}: no readable image or frame to calibrate with")

    def _feed(self, frames_: list) -> dict:
        batch = preprocess(frames_, self.spec)
        return {"images": batch.images, "mask": batch.mask}


class Batches:
    """A list of feed dicts as an onnxruntime `CalibrationDataReader`."""

    def __init__(self, feeds: list[dict]):
        self._feeds = iter(feeds)

    def get_next(self):
        return next(self._feeds, None)
