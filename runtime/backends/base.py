"""The interface every backend implements, and what they share: the metadata, outputs by
name, the fixed batch of a static-batch model (other batches are run in chunks, the last
one padded), the largest batch of a dynamic one (larger batches are run in chunks), and
turning outputs into detections."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import UserError
from ..metadata import validate
from ..postprocess import postprocess, postprocess_detections


class Backend:
    """Subclasses set `self.meta` (validated detr-edge metadata), `self.name`,
    `self.path`, `self.output_names` (the model's outputs, in its order), and implement
    `_run(images, mask) -> tuple of numpy outputs` for one batch of the model's size (at most
    `max_batch` images for a dynamic-batch model that has a limit). `close()` frees what the
    backend holds; a backend is also a context manager."""

    name = "backend"
    path: Path  # the model file
    meta: dict
    output_names: list[str]
    max_batch: int | None = None  # the most images one call of a dynamic-batch model takes
    concurrent = False  # whether threads may call infer() at once (TensorRT: one context, one set of buffers)

    def close(self) -> None:
        """Free the backend's engine and buffers (nothing to do for most backends)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _set_meta(self, meta: dict, source: str) -> None:
        self.meta = validate(meta, source)
        self.export = meta.get("export", {})
        if self.export.get("outputs", "raw") not in ("raw", "detections"):
            raise UserError(f"{source}: unknown output form {self.export.get('outputs')!r}")

    @property
    def spec(self) -> dict:
        """The preprocessing this model expects (runtime.preprocess.preprocess's spec)."""
        return self.meta["preprocess"]

    @property
    def imgsz(self) -> tuple[int, int]:
        return tuple(self.spec["imgsz"])

    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]

    @property
    def precision(self) -> str:
        return self.export.get("precision", "fp32")

    @property
    def batch(self) -> int | None:
        """The fixed batch size, or None for a dynamic-batch model."""
        batch = self.export.get("batch", 1)
        return None if batch == "dynamic" else int(batch)

    @property
    def raw(self) -> bool:
        """True: outputs are (logits, boxes); False: in-graph postprocessing (scores, labels, boxes_xyxy)."""
        return self.export.get("outputs", "raw") == "raw"

    def _run(self, images: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, ...]:
        raise NotImplementedError

    def fits(self, imgsz) -> bool:
        """Whether the model takes input of this H x W (a file's is fixed)."""
        return tuple(imgsz) == self.imgsz

    def infer(self, images: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        """images float32 [B,3,H,W], mask bool [B,H,W] -> {output name: the outputs of all B images}."""
        if images.shape[1] != 3 or not self.fits(images.shape[2:]) or mask.shape != (images.shape[0], *images.shape[2:]):
            raise UserError(f"{self.name}: input of shape {images.shape} / mask {mask.shape} does not fit "
                            f"the model's 3 x {self.imgsz[0]} x {self.imgsz[1]}")
        images = np.ascontiguousarray(images, np.float32)
        mask = np.ascontiguousarray(mask, bool)
        fixed = self.batch
        size = fixed or self.max_batch
        if size is None or images.shape[0] == fixed or (fixed is None and images.shape[0] <= size):
            return dict(zip(self.output_names, self._run(images, mask)))
        chunks = []
        for start in range(0, images.shape[0], size):
            part, part_mask = images[start:start + size], mask[start:start + size]
            count = part.shape[0]
            if fixed and count < fixed:  # pad the last chunk of a fixed batch with copies of its first image
                part = np.concatenate([part, np.repeat(part[:1], fixed - count, 0)])
                part_mask = np.concatenate([part_mask, np.repeat(part_mask[:1], fixed - count, 0)])
            chunks.append([out[:count] for out in self._run(part, part_mask)])
        return {name: np.concatenate(parts) for name, parts in zip(self.output_names, zip(*chunks))}

    def detect(self, batch, conf: float = 0.5, topk: int | None = None) -> list[dict]:
        """A preprocessed `runtime.preprocess.Batch` -> per frame {'scores','labels','boxes'}
        (xyxy in frame pixels), whichever output form the model has."""
        return self.to_detections(self.infer(batch.images, batch.mask), batch, conf, topk)

    def to_detections(self, outputs: dict, batch, conf: float = 0.5, topk: int | None = None) -> list[dict]:
        if self.raw:
            return postprocess(outputs["logits"], outputs["boxes"], batch.sizes, conf, topk)
        return postprocess_detections(outputs["scores"], outputs["labels"], outputs["boxes_xyxy"], batch.sizes,
                                      batch.mask, conf, topk)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name}, {self.precision}, batch {self.batch or 'dynamic'})"
