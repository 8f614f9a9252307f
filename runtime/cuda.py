"""Device memory for the TensorRT backend behind one small interface, from cuda-python
(what NVIDIA's own TensorRT samples use) or pycuda (the product's listed dependency),
whichever works here: a binding that is installed but cannot start (cuda-python 13 on a
CUDA 12 driver, say) gives way to the other, and the error names both reasons.

Both act in the device's primary context, the one the CUDA runtime and TensorRT use:
pycuda retains it (never a private `make_context`) and pushes it around every call from
whichever thread infers, so TensorRT's engine and execution context are made and
destroyed in the context they belong to. `close()` frees every buffer and the stream.
"""
from __future__ import annotations

import contextlib
import ctypes

import numpy as np

from .errors import UserError

INSTALL = ("pip install 'cuda-python==M.*' with M the CUDA major version of the driver (12 on JetPack 6, 13 on "
           "JetPack 7), or pycuda built against the local CUDA")


class CudaError(RuntimeError):
    """A CUDA call failed."""


class Memory:
    """Pinned host arrays, device buffers, one stream, async copies."""

    stream: int

    def host(self, shape, dtype) -> np.ndarray: ...
    def device(self, nbytes: int) -> int: ...
    def to_device(self, pointer: int, array: np.ndarray) -> None: ...
    def to_host(self, array: np.ndarray, pointer: int) -> None: ...
    def synchronize(self) -> None: ...
    def close(self) -> None: ...

    def active(self):
        return contextlib.nullcontext()


def _cudart():
    try:
        from cuda.bindings import runtime  # cuda-python 12.6 and newer
    except ImportError:
        from cuda import cudart as runtime  # older cuda-python (CUDA 11 and early 12)
    return runtime


def _check(cudart, result):
    """cuda-python returns (error, value...): the value, or CudaError with the driver's CUDA version."""
    err, *value = result
    if int(err) != 0:
        _, driver = cudart.cudaDriverGetVersion()
        supports = f"the driver supports CUDA {driver // 1000}.{driver % 1000 // 10}" if driver else "no CUDA driver"
        raise CudaError(f"{getattr(err, 'name', err)} ({supports})")
    return value[0] if value else None


class CudaPython(Memory):
    def __init__(self):
        self.cudart = _cudart()
        self._host: list[int] = []
        self._device: list[int] = []
        self.stream = int(_check(self.cudart, self.cudart.cudaStreamCreate()))

    def host(self, shape, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        count = int(np.prod(shape))
        nbytes = max(count * dtype.itemsize, 1)
        pointer = int(_check(self.cudart, self.cudart.cudaMallocHost(nbytes)))
        self._host.append(pointer)
        buffer = (ctypes.c_byte * nbytes).from_address(pointer)
        return np.frombuffer(buffer, dtype=dtype, count=count).reshape(shape)

    def device(self, nbytes: int) -> int:
        pointer = int(_check(self.cudart, self.cudart.cudaMalloc(max(nbytes, 1))))
        self._device.append(pointer)
        return pointer

    def to_device(self, pointer: int, array: np.ndarray) -> None:
        _check(self.cudart, self.cudart.cudaMemcpyAsync(pointer, array.ctypes.data, array.nbytes,
                                                        self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream))

    def to_host(self, array: np.ndarray, pointer: int) -> None:
        _check(self.cudart, self.cudart.cudaMemcpyAsync(array.ctypes.data, pointer, array.nbytes,
                                                        self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream))

    def synchronize(self) -> None:
        _check(self.cudart, self.cudart.cudaStreamSynchronize(self.stream))

    def close(self) -> None:
        """Free every buffer and the stream (arrays from `host()` must not be used after)."""
        if self.stream is None:
            return
        self.synchronize()
        for pointer in self._host:
            _check(self.cudart, self.cudart.cudaFreeHost(pointer))
        for pointer in self._device:
            _check(self.cudart, self.cudart.cudaFree(pointer))
        _check(self.cudart, self.cudart.cudaStreamDestroy(self.stream))
        self._host, self._device, self.stream = [], [], None


class PyCuda(Memory):
    def __init__(self):
        import pycuda.driver as cuda
        cuda.init()
        self.cuda = cuda
        self.context = cuda.Device(0).retain_primary_context()
        with self.active():
            self._stream = cuda.Stream()
        self.stream = self._stream.handle
        self._allocations = []  # device allocations and the pinned host allocations behind arrays

    @contextlib.contextmanager
    def active(self):
        self.context.push()
        try:
            yield
        finally:
            self.context.pop()

    def host(self, shape, dtype) -> np.ndarray:
        with self.active():
            array = self.cuda.pagelocked_empty(shape, dtype)
        self._allocations.append(array.base)
        return array

    def device(self, nbytes: int) -> int:
        with self.active():
            allocation = self.cuda.mem_alloc(max(nbytes, 1))
        self._allocations.append(allocation)
        return int(allocation)

    def to_device(self, pointer: int, array: np.ndarray) -> None:
        self.cuda.memcpy_htod_async(pointer, array, self._stream)

    def to_host(self, array: np.ndarray, pointer: int) -> None:
        self.cuda.memcpy_dtoh_async(array, pointer, self._stream)

    def synchronize(self) -> None:
        self._stream.synchronize()

    def close(self) -> None:
        """Free every buffer and the stream in the context, then release the context."""
        if self._stream is None:
            return
        with self.active():
            self._stream.synchronize()
            for allocation in self._allocations:
                allocation.free()
            self._allocations, self._stream, self.stream = [], None, None
        self.context.detach()  # the primary context lives on while TensorRT's runtime holds it


def _cuda_python_info() -> dict:
    cudart = _cudart()
    props = _check(cudart, cudart.cudaGetDeviceProperties(0))
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return {"gpu": name.strip("\x00 "), "compute_capability": f"{props.major}.{props.minor}"}


def _pycuda_info() -> dict:
    import pycuda.driver as cuda
    cuda.init()
    device = cuda.Device(0)
    return {"gpu": device.name(), "compute_capability": "{}.{}".format(*device.compute_capability())}


def _first(candidates):
    """The first of (name, factory) that works; one error with every reason otherwise."""
    reasons = []
    for name, make in candidates:
        try:
            return make()
        except ImportError:
            reasons.append(f"{name} is not installed")
        except Exception as exc:  # a driver too old for the binding, no device, ...
            reasons.append(f"{name}: {str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__}")
    raise UserError(f"no usable CUDA binding for the TensorRT backend ({'; '.join(reasons)}): {INSTALL}")


def device_info() -> dict:
    """{'gpu', 'compute_capability'} of device 0, with no stream or buffer made."""
    return _first([("cuda-python", _cuda_python_info), ("pycuda", _pycuda_info)])


def memory() -> Memory:
    """cuda-python's memory if it works here, else pycuda's."""
    return _first([("cuda-python", CudaPython), ("pycuda", PyCuda)])
