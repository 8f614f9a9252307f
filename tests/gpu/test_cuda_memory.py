"""The TensorRT backend's device memory (runtime/cuda.py) on a real GPU, which needs no
TensorRT: pinned host arrays go to device buffers and back on the backend's one stream, in
the backend's order (every copy in, then every copy out, one synchronize), from the
thread that made them and from a worker thread, where the runtime's pipeline infers; and
closed, they give every byte back. pycuda works in the device's primary context."""
import re
import threading

import numpy as np
import pytest

from detr_edge.runtime.cuda import CudaPython, PyCuda, _cuda_python_info, _pycuda_info


@pytest.fixture(params=[CudaPython, PyCuda], ids=["cuda-python", "pycuda"])
def memory(request):
    try:
        return request.param()
    except ImportError:
        pytest.skip(f"{request.param.__name__}: its binding is not installed")


def round_trip(memory, arrays: dict) -> dict:
    """What the backend's `_run` does around the engine: pinned host buffers, device buffers,
    copies in, copies out, synchronize."""
    buffers = {}
    with memory.active():
        for name, array in arrays.items():
            host = memory.host(array.shape, array.dtype)
            buffers[name] = host, memory.device(host.nbytes)
            np.copyto(host, array)
            memory.to_device(buffers[name][1], host)
        back = {name: memory.host(array.shape, array.dtype) for name, array in arrays.items()}
        for name, host in back.items():
            host[...] = 0
            memory.to_host(host, buffers[name][1])
        memory.synchronize()
    return {name: host.copy() for name, host in back.items()}


def inputs(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"images": rng.standard_normal((4, 3, 128, 96), dtype=np.float32),
            "mask": rng.random((4, 128, 96)) < 0.3,
            "logits": rng.standard_normal((4, 100, 92)).astype(np.float16)}


@pytest.mark.parametrize("probe", [_cuda_python_info, _pycuda_info], ids=["cuda-python", "pycuda"])
def test_device_info_names_the_gpu(probe):
    try:
        info = probe()
    except ImportError:
        pytest.skip("its binding is not installed")
    assert info["gpu"] and re.fullmatch(r"\d+\.\d+", info["compute_capability"])


def test_buffers_round_trip_on_the_stream(memory):
    arrays = inputs(0)
    back = round_trip(memory, arrays)
    for name, array in arrays.items():
        assert back[name].dtype == array.dtype
        np.testing.assert_array_equal(back[name], array)


def test_buffers_round_trip_from_a_worker_thread(memory):
    arrays, result, errors = inputs(1), {}, []

    def work():
        try:
            result.update(round_trip(memory, arrays))
        except Exception as exc:  # surfaced below, in the test's own thread
            errors.append(exc)
    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    assert not errors, errors
    for name, array in arrays.items():
        np.testing.assert_array_equal(result[name], array)


def _free_bytes() -> int:
    from detr_edge.runtime.cuda import _cudart
    _, free, _ = _cudart().cudaMemGetInfo()
    return int(free)


def test_close_frees_every_buffer_and_the_stream(memory):
    """The backend's buffers used to live until the process ended (cuda-python's were never freed)."""
    try:
        before = _free_bytes()
    except ImportError:
        pytest.skip("cuda-python reads the free memory")
    with memory.active():
        for _ in range(4):
            memory.device(256 * 2**20)
        memory.host((64 * 2**20,), np.uint8)
    assert before - _free_bytes() >= 1000 * 2**20
    memory.close()
    assert abs(before - _free_bytes()) <= 8 * 2**20
    memory.close()  # a second close does nothing


def test_pycuda_works_in_the_primary_context_tensorrt_uses():
    """A private `make_context` made TensorRT's objects die outside the context that made them
    (the 'defaultAllocator::deallocate' crashes); the primary context is the CUDA runtime's."""
    try:
        from cuda.bindings import driver
    except ImportError:
        pytest.skip("cuda-python's driver API names the primary context")
    try:
        memory = PyCuda()
    except ImportError:
        pytest.skip("pycuda is not installed")
    import pycuda.driver as cuda
    err, device = driver.cuDeviceGet(0)
    err, primary = driver.cuDevicePrimaryCtxRetain(device)
    try:
        with memory.active():
            assert int(cuda.Context.get_current().handle) == int(primary)
        memory.close()
    finally:
        driver.cuDevicePrimaryCtxRelease(device)
