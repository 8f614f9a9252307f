"""TensorRT backend: an engine file plus its sidecar (`model.engine.json`: the ONNX
metadata and what the engine was built with and for). Refuses an engine built for
another TensorRT or GPU; allocates pinned host and device buffers once per batch size;
copies in, executes and copies out asynchronously on one stream with the name-based
tensor API (`set_tensor_address` + `execute_async_v3`, TensorRT 8.5 on); splits a batch
larger than the engine's optimization profile takes.

Why not Polygraphy's TrtRunner, which Polygraphy itself calls a tool for prototyping and
debugging: per frame it allocates output memory through a Python callback, copies
through pageable host memory and checks every input on the host; docs/export.md has the
measured overhead of both paths. The TensorRT logger is Polygraphy's process-wide one,
the same the builder uses (TensorRT keeps one logger per process).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..metadata import validate
from .base import Backend


# TensorRT DataType member name -> numpy (trt.nptype of 8.x maps BOOL to np.bool, gone from numpy)
NUMPY = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32, "INT64": np.int64,
         "BOOL": np.bool_, "UINT8": np.uint8}
OUTPUTS = {True: ["logits", "boxes"], False: ["scores", "labels", "boxes_xyxy"]}


def sidecar_path(engine) -> Path:
    return Path(f"{engine}.json")


def check_sidecar(meta: dict, trt_version: str, device: dict, source) -> None:
    """One clear refusal when the engine was built for another TensorRT or GPU."""
    built = meta.get("engine", {})
    if built.get("tensorrt_version") != trt_version:
        raise UserError(f"{source}: built with TensorRT {built.get('tensorrt_version')}, this is {trt_version}: "
                        "engines are not portable across TensorRT versions; rebuild it here (detr-edge build)")
    if (built.get("gpu"), built.get("compute_capability")) != (device["gpu"], device["compute_capability"]):
        raise UserError(f"{source}: built for {built.get('gpu')} (sm {built.get('compute_capability')}), this is "
                        f"{device['gpu']} (sm {device['compute_capability']}): rebuild it on this GPU")


def trt_logger():
    """Polygraphy's process-wide TensorRT logger, shared with the engine builder."""
    try:
        from polygraphy.backend.trt.util import get_trt_logger
    except ImportError:
        raise UserError("the TensorRT backend needs NVIDIA's Polygraphy (its process-wide TensorRT logger): "
                        "pip install polygraphy") from None
    return get_trt_logger()


class TensorRTBackend(Backend):
    def __init__(self, path, memory=None, trt=None):
        if trt is None:
            try:
                import tensorrt as trt
            except ImportError:
                raise UserError("TensorRT is not installed: x86: pip install 'detr-edge[tensorrt]'; "
                                "Jetson: JetPack's python3-libnvinfer") from None
        from .. import cuda
        path = Path(path)
        side = sidecar_path(path)
        if not side.exists():
            raise UserError(f"{path}: no sidecar {side.name} (build engines with detr-edge build)")
        try:
            meta = json.loads(side.read_text())
        except ValueError:
            raise UserError(f"{side}: not JSON (write sidecars with detr-edge build)") from None
        check_sidecar(meta, trt.__version__, cuda.device_info(), path)
        self._set_meta(validate(meta, str(side)), str(side))
        self.trt, self.name, self.path = trt, path.name, path
        runtime = trt.Runtime(trt_logger())
        dla = (meta["engine"].get("plan") or {}).get("dla")
        if dla:
            runtime.DLA_core = int(dla["core"])
        self.memory = memory or cuda.memory()
        self.context = None
        with self.memory.active():
            self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
            if self.engine is None:
                self.memory.close()
                raise UserError(f"{path}: TensorRT could not deserialize it (corrupt, or built elsewhere)")
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        order = OUTPUTS[self.raw]  # the ONNX graph's output order, whatever order the engine lists
        self.output_names = sorted((n for n in names if n not in self.inputs),
                                   key=lambda n: order.index(n) if n in order else 99)
        if self.batch is None:  # min, opt, max of the optimization profile: batches beyond max are split
            self.batch_range = tuple(int(shape[0]) for shape in self.engine.get_tensor_profile_shape(self.inputs[0], 0))
            self.max_batch = self.batch_range[2]
        self._buffers: dict[int, dict] = {}

    def _set_shapes(self, batch: int) -> None:
        for name in self.inputs:
            if not self.context.set_input_shape(name, (batch, *self.engine.get_tensor_shape(name)[1:])):
                low, _, high = getattr(self, "batch_range", (self.batch,) * 3)
                raise UserError(f"{self.name}: TensorRT refused batch {batch} for {name} (the engine takes "
                                f"{low} to {high})")

    def _allocate(self, batch: int) -> dict:
        """Pinned host + device buffer per tensor for this batch size, made once."""
        if batch not in self._buffers:
            buffers = {}
            with self.memory.active():
                self._set_shapes(batch)
                for name in self.inputs + self.output_names:
                    shape = tuple(self.context.get_tensor_shape(name))
                    host = self.memory.host(shape, NUMPY[self.engine.get_tensor_dtype(name).name])
                    buffers[name] = (host, self.memory.device(host.nbytes))
            self._buffers[batch] = buffers
        return self._buffers[batch]

    def _run(self, images: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, ...]:
        buffers = self._allocate(images.shape[0])
        feed = {"images": images, "mask": mask}
        with self.memory.active():
            self._set_shapes(images.shape[0])
            for name in self.inputs:
                host, device = buffers[name]
                np.copyto(host, feed[name].astype(host.dtype, copy=False))
                self.memory.to_device(device, host)
            for name, (_, device) in buffers.items():
                self.context.set_tensor_address(name, device)
            if not self.context.execute_async_v3(self.memory.stream):
                raise UserError(f"{self.name}: TensorRT execution failed")
            for name in self.output_names:
                host, device = buffers[name]
                self.memory.to_host(host, device)
            self.memory.synchronize()
        return tuple(buffers[name][0].copy() for name in self.output_names)

    def close(self) -> None:
        """Destroy the execution context and engine inside their CUDA context, then free the buffers."""
        if self.context is None:
            return
        with self.memory.active():
            self.context = self.engine = None
        self._buffers.clear()
        self.memory.close()
