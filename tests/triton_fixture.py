"""A real NVIDIA Triton Inference Server for the tests (nvidia-pytriton's tritonserver, CPU is enough).

    from triton_fixture import served
    with served(repository) as server:           # free ports on 127.0.0.1; stopped on exit
        client = tritonclient.grpc.InferenceServerClient(server.grpc_url)

Skipped, with the reason, where nvidia-pytriton is not installed. Not tests/triton.py: tests/ comes
first on sys.path, and `triton` is OpenAI's Triton, which torch imports.
"""
import contextlib
import importlib.util

import pytest

from detr_edge.serve import TritonServer

INSTALL = "pip install --no-deps nvidia-pytriton"  # its numpy<2 pin is for the Python package, not the server


@contextlib.contextmanager
def served(repository, timeout: float = 120.0, **ports):
    """A started TritonServer on `repository` (TritonServer's ports and log_file as keywords)."""
    if importlib.util.find_spec("pytriton") is None:
        pytest.skip(f"nvidia-pytriton is not installed ({INSTALL}): no tritonserver to serve with")
    with TritonServer(repository, **ports).start(timeout) as server:
        yield server
