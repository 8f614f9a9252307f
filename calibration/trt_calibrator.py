"""The legacy implicit INT8 calibrator for the engine builder on TensorRT 8.x/10.x:
`EntropyCalibrator` feeds the same `Samples` as the Q/DQ path and reads/writes the same
cache format (trt_cache.py). Defined only when a TensorRT that still has
`IInt8EntropyCalibrator2` (< 11) is importable; `EntropyCalibrator` is None otherwise.

Device memory is the builder's business: it passes `upload(name, array) -> device pointer`
(pycuda or cuda-python, whichever it uses), so this file needs no CUDA library.
"""
from __future__ import annotations

from pathlib import Path

from runtime.io import atomic_path

try:
    import tensorrt as trt
except ImportError:  # no TensorRT here: nothing to define
    trt = None

EntropyCalibrator = None

if trt is not None and hasattr(trt, "IInt8EntropyCalibrator2"):
    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self, samples, upload, cache_path):
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.samples, self.upload, self.cache_path = samples, upload, Path(cache_path)
            self._batches = None

        def get_batch_size(self) -> int:
            return self.samples.batch

        def get_batch(self, names, *_):
            """Device pointers of the next batch in `names` order; None when the data ends."""
            if self._batches is None:
                self._batches = self.samples.batches()
            feed = next(self._batches, None)
            if feed is None:
                return None
            return [int(self.upload(name, feed[name])) for name in names]

        def read_calibration_cache(self):
            return self.cache_path.read_bytes() if self.cache_path.exists() else None

        def write_calibration_cache(self, cache) -> None:
            with atomic_path(self.cache_path) as tmp:
                tmp.write_bytes(bytes(cache))
