"""The legacy INT8 calibrator's data path on a real GPU, which needs no TensorRT: the build
applies its plan through Polygraphy against a stand-in `tensorrt` (tests/trt_stub.py, the
names of 10.3's bindings) that calibrates as TensorRT does, asking Polygraphy's
Calibrator for batches; Polygraphy uploads each to device memory, and what lies at the
addresses it hands TensorRT is read back and compared with the runtime's preprocessing."""
import numpy as np
import pytest

from detr_edge.calibration.data import Samples
from detr_edge.export.onnx_export import ExportOptions, export_onnx
from detr_edge.export.trt_build import build
from detr_edge.export.trt_plan import BuildOptions
from detr_edge.runtime.metadata import preprocess_spec
from detr_edge.train.config import DETRConfig, checkpoint_config
from detr_edge.train.synth import synthesize

from conftest import sharp_model
from trt_stub import bindings_strings, install, stub_tensorrt

TINY = DETRConfig(backbone="resnet18", hidden_dim=32, nheads=2, enc_layers=1, dec_layers=1, dim_feedforward=64,
                  num_queries=5, num_classes=3, dropout=0.0)


def test_calibration_batches_reach_the_device_as_preprocessed(tmp_path, monkeypatch):
    from detr_edge.runtime.cuda import _check, _cudart
    cudart = _cudart()
    strings = bindings_strings("10.3.0")
    model = tmp_path / "m.onnx"
    export_onnx(sharp_model(TINY), checkpoint_config(TINY, (64, 64), None), model,
                ExportOptions(dynamic_batch=True, target="trt10"))
    synthesize(tmp_path / "data", train=5, val=0, size=(64, 80), video_frames=0, seed=2)
    trt = install(monkeypatch, stub_tensorrt("10.3.0", strings))
    seen = []

    def read_back(names, pointers, shapes):
        batch = {}
        for name, pointer, shape in zip(names, pointers, shapes):
            array = np.empty(shape, bool if name == "mask" else np.float32)
            _check(cudart, cudart.cudaMemcpy(array.ctypes.data, pointer, array.nbytes,
                                             cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost))
            batch[name] = array
        seen.append(batch)
    trt.on_calibration_batch = read_back
    build(model, tmp_path / "m.engine", BuildOptions(legacy_int8=True, calib_data=str(tmp_path / "data" / "train"),
                                                     batch=(1, 2, 4)))
    expected = list(Samples(tmp_path / "data" / "train", preprocess_spec((64, 64)), 256, batch=2,
                            progress=False).batches())
    assert len(seen) == len(expected) == 3 and trt.calibration_batches == 3
    for got, want in zip(seen, expected):
        np.testing.assert_array_equal(got["images"], want["images"])
        np.testing.assert_array_equal(got["mask"], want["mask"])
    assert seen[0]["mask"].any()  # 64 x 80 frames letterboxed into 64 x 64: real padding went up too
    assert (tmp_path / "m.legacy-calibrator.cache").read_bytes().startswith(b"TRT-stub")


@pytest.fixture(autouse=True)
def _needs_polygraphy():
    pytest.importorskip("polygraphy")
