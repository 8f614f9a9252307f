"""Inference backends behind one small interface (as Polygraphy pairs a loader and a
runner per backend): a backend is loaded from a model file, reads the detr-edge
metadata inside it, and runs `infer(images, mask) -> outputs` on numpy arrays.

`load_backend` picks the backend by file type; each backend's module imports its engine
library only when used, so this package imports with numpy alone.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from .base import Backend

BACKENDS = ("onnxruntime", "tensorrt")
ENGINE_SUFFIXES = (".engine", ".plan")


def load_backend(path, backend: str = "auto", **options) -> Backend:
    """`auto`: TensorRT for .engine/.plan files, onnxruntime for .onnx (its TensorRT or CUDA
    execution provider when that onnxruntime has one, else the CPU)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if backend == "auto":
        if path.suffix not in (".onnx", *ENGINE_SUFFIXES):
            raise UserError(f"{path}: unknown model type {path.suffix!r} (expected .onnx or .engine)")
        backend = "tensorrt" if path.suffix in ENGINE_SUFFIXES else "onnxruntime"
    if backend == "onnxruntime":
        from .ort import OnnxRuntimeBackend
        return OnnxRuntimeBackend(path, **options)
    if backend == "tensorrt":
        from .trt import TensorRTBackend
        return TensorRTBackend(path, **options)
    raise UserError(f"unknown backend {backend!r}: auto or one of {', '.join(BACKENDS)}")


__all__ = ["Backend", "BACKENDS", "load_backend"]
