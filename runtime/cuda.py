"""Device memory for the TensorRT backend behind one small interface, from cuda-python
(`cuda.bindings.runtime`, what NVIDIA's own TensorRT samples use) or pycuda (the product's
listed dependency), whichever is installed.

pycuda's context is bound to the thread that made it; inference runs in a worker thread,
so `PyCuda` keeps its own context and pushes/pops it around every call (`active()`).
"""
from __future__ import annotations

import contextlib

import numpy as np

from .errors import UserError


class Memory:
    """pinned host arrays, device buffers, one stream, async copies."""

    def host(self, shape, dtype) -> np.ndarray: ...
    def device(self, nbytes: int) -> int: ...
    def to_device(self, pointer: int, array: np.ndarray) -> None: ...
    def to_host(self, array: np.ndarray, pointer: int) -> None: ...
    def synchronize(self) -> None: ...
    def device_info(self) -> dict: ...
    stream: int

    def active(self):
        return contextlib.nullcontext()


class CudaPython(Memory):
    def __init__(self):
        from cuda.bindings import runtime as cudart
        self.cudart = cudart
        self.stream = int(self._call(cudart.cudaStreamCreate()))
        self._keep = []

    def _call(self, result):
        err, *value = result
        if int(err) != 0:
            raise UserError(f"CUDA error {err}")
        return value[0] if value else None

    def host(self, shape, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        nbytes = max(int(np.prod(shape)) * dtype.itemsize, 1)
        pointer = self._call(self.cudart.cudaMallocHost(nbytes))
        import ctypes
        buffer = (ctypes.c_byte * nbytes).from_address(int(pointer))
        self._keep.append(pointer)
        return np.frombuffer(buffer, dtype=dtype, count=int(np.prod(shape))).reshape(shape)

    def device(self, nbytes: int) -> int:
        pointer = int(self._call(self.cudart.cudaMalloc(max(nbytes, 1))))
        self._keep.append(pointer)
        return pointer

    def to_device(self, pointer: int, array: np.ndarray) -> None:
        self._call(self.cudart.cudaMemcpyAsync(pointer, array.ctypes.data, array.nbytes,
                                               self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream))

    def to_host(self, array: np.ndarray, pointer: int) -> None:
        self._call(self.cudart.cudaMemcpyAsync(array.ctypes.data, pointer, array.nbytes,
                                               self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream))

    def synchronize(self) -> None:
        self._call(self.cudart.cudaStreamSynchronize(self.stream))

    def device_info(self) -> dict:
        props = self._call(self.cudart.cudaGetDeviceProperties(0))
        name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
        return {"gpu": name.strip("\x00 "), "compute_capability": f"{props.major}.{props.minor}"}


class PyCuda(Memory):
    def __init__(self):
        import pycuda.driver as cuda
        cuda.init()
        self.cuda = cuda
        self.context = cuda.Device(0).make_context()  # current in this thread; popped at once
        try:
            self._stream = cuda.Stream()
            self.stream = self._stream.handle
        finally:
            self.context.pop()
        self._keep = []

    @contextlib.contextmanager
    def active(self):
        self.context.push()
        try:
            yield
        finally:
            self.context.pop()

    def host(self, shape, dtype) -> np.ndarray:
        with self.active():
            return self.cuda.pagelocked_empty(shape, dtype)

    def device(self, nbytes: int) -> int:
        with self.active():
            allocation = self.cuda.mem_alloc(max(nbytes, 1))
        self._keep.append(allocation)
        return int(allocation)

    def to_device(self, pointer: int, array: np.ndarray) -> None:
        self.cuda.memcpy_htod_async(pointer, array, self._stream)

    def to_host(self, array: np.ndarray, pointer: int) -> None:
        self.cuda.memcpy_dtoh_async(array, pointer, self._stream)

    def synchronize(self) -> None:
        self._stream.synchronize()

    def device_info(self) -> dict:
        device = self.cuda.Device(0)
        return {"gpu": device.name(), "compute_capability": "{}.{}".format(*device.compute_capability())}


def memory() -> Memory:
    """cuda-python if installed, else pycuda; one clear error without either."""
    for kind in (CudaPython, PyCuda):
        try:
            return kind()
        except ImportError:
            continue
    raise UserError("the TensorRT backend needs cuda-python (pip install cuda-python) or pycuda "
                    "(pip install 'detr-edge[tensorrt]'; on Jetson pass CUDA's include and lib dirs)")
