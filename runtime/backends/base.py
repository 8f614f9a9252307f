"""The interface every backend implements, and what they share: the metadata, the fixed
batch of a static-batch model (larger batches are run in chunks, the last one padded),
and turning raw outputs into detections."""
from __future__ import annotations

import numpy as np

from ..errors import UserError
from ..metadata import validate
from ..postprocess import postprocess, postprocess_detections


class Backend:
    """Subclasses set `self.meta` (validated detr-edge metadata), `self.name`, and
    implement `_run(images, mask) -> tuple of numpy outputs` for one batch of the model's size."""

    name = "backend"
    meta: dict

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

    def infer(self, images: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, ...]:
        """images float32 [B,3,H,W], mask bool [B,H,W] -> the model's outputs for all B images."""
        if images.shape[1:] != (3, *self.imgsz) or mask.shape != (images.shape[0], *self.imgsz):
            raise UserError(f"{self.name}: input of shape {images.shape} / mask {mask.shape} does not fit "
                            f"the model's 3 x {self.imgsz[0]} x {self.imgsz[1]}")
        images = np.ascontiguousarray(images, np.float32)
        mask = np.ascontiguousarray(mask, bool)
        fixed = self.batch
        if fixed is None or fixed == images.shape[0]:
            return self._run(images, mask)
        chunks = []
        for start in range(0, images.shape[0], fixed):
            part, part_mask = images[start:start + fixed], mask[start:start + fixed]
            count = part.shape[0]
            if count < fixed:  # pad the last chunk with copies of its first image
                part = np.concatenate([part, np.repeat(part[:1], fixed - count, 0)])
                part_mask = np.concatenate([part_mask, np.repeat(part_mask[:1], fixed - count, 0)])
            chunks.append([out[:count] for out in self._run(part, part_mask)])
        return tuple(np.concatenate(parts) for parts in zip(*chunks))

    def detect(self, batch, conf: float = 0.5, topk: int | None = None) -> list[dict]:
        """A preprocessed `runtime.preprocess.Batch` -> per frame {'scores','labels','boxes'}
        (xyxy in frame pixels), whichever output form the model has."""
        return self.to_detections(self.infer(batch.images, batch.mask), batch, conf, topk)

    def to_detections(self, outputs, batch, conf: float = 0.5, topk: int | None = None) -> list[dict]:
        if self.raw:
            return postprocess(*outputs, batch.sizes, conf, topk)
        return postprocess_detections(*outputs, batch.sizes, batch.mask, conf, topk)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name}, {self.precision}, batch {self.batch or 'dynamic'})"
