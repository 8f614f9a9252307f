"""The calibration data TensorRT's legacy implicit INT8 calibrator reads (8.x/10.x; 11
removed it), for Polygraphy's `Calibrator`, which owns the device buffers, the uploads and
the cache. The feed is the same `Samples` as the Q/DQ path: the runtime's sources and
preprocessing, padding mask included.

TensorRT's bindings swallow an exception raised inside `get_batch` and calibrate on what
they got, possibly nothing; the feed keeps the error and the batch count, and `check()`
turns them into one clear error after the build.
"""
from __future__ import annotations

from detr_edge.runtime.errors import UserError


class CalibrationFeed:
    """Re-iterable {'images', 'mask'} batches of `samples` (a calibration.data.Samples)."""

    def __init__(self, samples):
        self.samples = samples
        self.batches = 0
        self.error: BaseException | None = None

    def __iter__(self):
        self.batches, self.error = 0, None
        try:
            for feed in self.samples.batches():
                self.batches += 1
                yield feed
        except Exception as exc:  # re-raised by check(): TensorRT would swallow it
            self.error = exc

    def check(self, had_cache: bool) -> None:
        """After the build: the error the data raised, or no batch at all where no cache was read."""
        if isinstance(self.error, UserError):
            raise self.error
        if self.error is not None:
            raise UserError(f"calibration data failed: {type(self.error).__name__}: {self.error}")
        if self.batches == 0 and not had_cache:
            raise UserError("TensorRT's calibrator received no batch: the engine was not calibrated")
