"""TensorRT without TensorRT: the version logic as pure functions, and every TensorRT name
the builder and the engine runner touch on each version's path, checked against the real
Python bindings of that version (the PyPI `*-bindings` wheels, read as data: their
compiled module needs TensorRT's libraries to load, but every name it registers is a
string in its string table)."""
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from export.cli import main
from export.onnx_export import ExportOptions, export_onnx
from export.trt_build import BuildOptions, build
from runtime.backends.trt import TensorRTBackend, check_sidecar
from runtime.errors import UserError
from runtime.trt_versions import build_plan, check_opset
from train.config import DETRConfig, checkpoint_config

from conftest import ROOT, sharp_model
from trt_stub import stub_tensorrt

WHEELS = {  # version -> the bindings wheel of that version on PyPI
    "8.6.1": "tensorrt-bindings==8.6.1",
    "10.3.0": "tensorrt-cu12-bindings==10.3.0",
    "10.13.3": "tensorrt-cu12-bindings==10.13.3.9",
    "11.4.0": "tensorrt-cu13-bindings==11.4.0.106",
}
CACHE = ROOT / ".cache" / "tensorrt-bindings"
TINY = DETRConfig(backbone="resnet18", hidden_dim=32, nheads=2, enc_layers=1, dec_layers=1, dim_feedforward=64,
                  num_queries=5, num_classes=3, dropout=0.0)


@pytest.mark.parametrize("version, precision, network, builder", [
    ("8.5.2", "fp32", ("EXPLICIT_BATCH",), ()),
    ("8.5.2", "fp16", ("EXPLICIT_BATCH",), ("FP16",)),
    ("8.6.1", "int8", ("EXPLICIT_BATCH",), ("INT8", "FP16")),
    ("10.3.0", "fp32", (), ()),
    ("10.3.0", "fp16", ("STRONGLY_TYPED",), ()),
    ("10.13", "int8", ("STRONGLY_TYPED",), ()),
    ("11.4", "fp16", ("STRONGLY_TYPED",), ()),
    ("11.4", "int8", ("STRONGLY_TYPED",), ()),
])
def test_flags_by_version(version, precision, network, builder):
    plan = build_plan(version, precision)
    assert plan.network_flags == network and plan.builder_flags == builder


def test_opsets_and_options_by_version():
    assert [build_plan(v, "fp32").max_opset for v in ("8.5.2", "8.6.1", "10.3.0", "10.13", "11.4")] == [16, 17, 20, 20, 25]
    plan85 = build_plan("8.5.2", "fp16")
    with pytest.raises(UserError, match="cannot parse LayerNormalization.*--target trt8.5"):
        check_opset(plan85, 16, True, "m.onnx")
    with pytest.raises(UserError, match="opset 17 is newer.*--target trt8.5"):
        check_opset(plan85, 17, False, "m.onnx")
    check_opset(build_plan("8.6.1", "fp16"), 17, True, "m.onnx")
    # weakly typed on request (10.x only), the legacy calibrator (< 11, FP32 file), DLA
    assert build_plan("10.3.0", "fp16", weakly_typed=True).builder_flags == ("FP16",)
    assert build_plan("10.3.0", "fp32", legacy_int8=True).builder_flags == ("INT8", "FP16")
    assert build_plan("8.6.1", "int8", dla=True, gpu_fallback=True).builder_flags[-1] == "GPU_FALLBACK"
    for bad in [dict(version="11.4", precision="fp16", weakly_typed=True),
                dict(version="11.4", precision="fp32", legacy_int8=True),
                dict(version="8.6.1", precision="fp16", legacy_int8=True),
                dict(version="8.6.1", precision="fp32", dla=True),
                dict(version="8.4.3", precision="fp32")]:
        with pytest.raises(UserError):
            build_plan(**bad)


REMOVED_IN_11 = {"FP16", "INT8", "BF16", "FP8", "EXPLICIT_BATCH", "OBEY_PRECISION_CONSTRAINTS",
                 "IInt8EntropyCalibrator2", "int8_calibrator"}


def test_the_11_path_touches_no_removed_name(tmp_path):
    onnx_path = _tiny_onnx(tmp_path)
    for precision in ("fp16", "int8", "fp32"):
        trt, used = stub_tensorrt("11.4.0")
        _set_precision(onnx_path, precision)
        build(onnx_path, tmp_path / f"{precision}.engine", BuildOptions(), trt=trt, device=DEVICE)
        assert used and not used & REMOVED_IN_11, used & REMOVED_IN_11
    trt, used = stub_tensorrt("10.3.0")
    _set_precision(onnx_path, "fp16")
    build(onnx_path, tmp_path / "w.engine", BuildOptions(weakly_typed=True), trt=trt, device=DEVICE)
    assert "FP16" in used  # the stand-in does see flags: the 11 result above is not vacuous


# ---- names against the real bindings ------------------------------------------------------

def _strings(version: str) -> bytes:
    CACHE.mkdir(parents=True, exist_ok=True)
    found = sorted(CACHE.glob(f"*-{version.split('.')[0]}.{version.split('.')[1]}*.whl"))
    if not found:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
                   "--python-version", "3.11", "--platform", "manylinux_2_17_x86_64", "--platform",
                   "manylinux_2_28_x86_64", WHEELS[version], "-d", str(CACHE)]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
        found = sorted(CACHE.glob(f"*-{version.split('.')[0]}.{version.split('.')[1]}*.whl"))
        if proc.returncode or not found:
            pytest.skip(f"cannot fetch {WHEELS[version]} from PyPI: {proc.stderr.strip()[-200:]}")
    with zipfile.ZipFile(found[0]) as wheel:
        return wheel.read(next(n for n in wheel.namelist() if n.endswith("tensorrt.so")))


def has_name(strings: bytes, name: str) -> bool:
    """A registered name is a NUL-terminated string, or the tail of a longer one (the linker
    merges "set_output_type" into "reset_output_type")."""
    return f"{name}\0".encode() in strings


@pytest.fixture(scope="module", params=list(WHEELS))
def bindings(request):
    return request.param, _strings(request.param)


def test_the_string_table_tells_present_from_removed(bindings):
    version, strings = bindings
    for name in ("execute_async_v3", "set_tensor_address", "deserialize_cuda_engine", "BuilderFlag"):
        assert has_name(strings, name)
    legacy = ["IInt8EntropyCalibrator2", "int8_calibrator", "EXPLICIT_BATCH", "OBEY_PRECISION_CONSTRAINTS"]
    assert [has_name(strings, n) for n in legacy] == [not version.startswith("11")] * 4
    assert has_name(strings, "STRONGLY_TYPED") == (not version.startswith("8"))
    assert not has_name(strings, "surely_no_tensorrt_name_like_this")


DEVICE = {"gpu": "stand-in", "compute_capability": "0.0"}


def _tiny_onnx(tmp_path) -> Path:
    path = tmp_path / "tiny.onnx"
    export_onnx(sharp_model(TINY), checkpoint_config(TINY, (64, 64), None), path,
                ExportOptions(dynamic_batch=True, target="trt8.5"))
    return path


def _set_precision(path: Path, precision: str) -> None:
    import onnx
    from runtime.metadata import read_onnx_metadata, write_onnx_metadata
    graph = onnx.load(str(path))
    meta = read_onnx_metadata(graph, path)
    meta["export"]["precision"] = precision
    write_onnx_metadata(graph, meta)
    onnx.save(graph, str(path))


def _paths(version: str):
    """(precision, options) of every build path a version has."""
    major = int(version.split(".")[0])
    paths = [(p, BuildOptions(batch=(1, 2, 4), timing_cache="cache.bin", opt_level=3)) for p in ("fp32", "fp16", "int8")]
    paths.append(("int8", BuildOptions(dla=0, gpu_fallback=True)))
    if major == 10:
        paths.append(("fp16", BuildOptions(weakly_typed=True)))
    return paths


def test_every_name_each_path_uses_exists_in_that_version(bindings, tmp_path, monkeypatch):
    version, strings = bindings
    monkeypatch.chdir(tmp_path)
    onnx_path = _tiny_onnx(tmp_path)
    used_all = set()
    for precision, options in _paths(version):
        trt, used = stub_tensorrt(version, {"num_inputs": 2, "shape": (-1, 3, 64, 64), "name": "images"})
        _set_precision(onnx_path, precision)
        build(onnx_path, tmp_path / "m.engine", options, trt=trt, device=DEVICE)
        missing = sorted(n for n in used if not has_name(strings, n))
        assert not missing, f"TensorRT {version}, {precision} {options}: {missing} not in its bindings"
        used_all |= used
    # the engine runner, on an engine whose sidecar matches
    sidecar = json.loads((tmp_path / "m.engine.json").read_text())
    assert sidecar["engine"]["tensorrt_version"] == version and sidecar["engine"]["gpu"] == "stand-in"
    trt, used = stub_tensorrt(version, _engine_values())
    backend = TensorRTBackend(tmp_path / "m.engine", memory=FakeMemory(), trt=trt)
    logits, boxes = backend.infer(np.zeros((2, 3, 64, 64), np.float32), np.zeros((2, 64, 64), bool))
    assert logits.shape == (2, 5, 4) and boxes.shape == (2, 5, 4)
    missing = sorted(n for n in used if not has_name(strings, n))
    assert not missing, f"TensorRT {version} engine runner: {missing} not in its bindings"
    assert {"set_tensor_address", "execute_async_v3", "set_input_shape"} <= used
    assert {"create_network", "build_serialized_network", "set_timing_cache", "set_shape"} <= used_all


def _engine_values():
    names = ["images", "mask", "logits", "boxes"]
    shapes = {"images": (-1, 3, 64, 64), "mask": (-1, 64, 64), "logits": (-1, 5, 4), "boxes": (-1, 5, 4)}
    batch = {"n": 1}

    class Kind:
        def __init__(self, name):
            self.name = name

    def set_input_shape(name, shape):
        batch["n"] = shape[0]
        return True
    return {"num_io_tensors": 4, "get_tensor_name": names.__getitem__,
            "get_tensor_mode": lambda n: "input" if n in ("images", "mask") else "output",
            "TensorIOMode": type("TensorIOMode", (), {"INPUT": "input"}),
            "get_tensor_shape": lambda n: (batch["n"], *shapes[n][1:]),
            "get_tensor_dtype": lambda n: Kind("BOOL" if n == "mask" else "FLOAT"),
            "set_input_shape": set_input_shape, "execute_async_v3": lambda stream: True}


class FakeMemory:
    stream = 7

    def host(self, shape, dtype):
        return np.zeros(shape, dtype)

    def device(self, nbytes):
        return 1000 + nbytes

    def to_device(self, pointer, array):
        pass

    def to_host(self, array, pointer):
        pass

    def synchronize(self):
        pass

    def device_info(self):
        return dict(DEVICE)

    def active(self):
        import contextlib
        return contextlib.nullcontext()


def test_mismatched_sidecar_is_refused():
    meta = {"engine": {"tensorrt_version": "10.3.0", "gpu": "Orin", "compute_capability": "8.7"}}
    check_sidecar(meta, "10.3.0", {"gpu": "Orin", "compute_capability": "8.7"}, "m.engine")
    with pytest.raises(UserError, match="built with TensorRT 10.3.0, this is 10.13.3"):
        check_sidecar(meta, "10.13.3", {"gpu": "Orin", "compute_capability": "8.7"}, "m.engine")
    with pytest.raises(UserError, match="built for Orin .*this is NVIDIA H100"):
        check_sidecar(meta, "10.3.0", {"gpu": "NVIDIA H100", "compute_capability": "9.0"}, "m.engine")


def test_build_without_tensorrt_says_how_to_get_it(tmp_path):
    onnx_path = _tiny_onnx(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "export.cli", "build", str(onnx_path)], cwd=ROOT,
                          capture_output=True, text=True)
    if "tensorrt" in sys.modules or subprocess.run([sys.executable, "-c", "import tensorrt"]).returncode == 0:
        pytest.skip("TensorRT is installed here")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "TensorRT is not installed" in proc.stderr and "python3-libnvinfer" in proc.stderr
    assert not list(tmp_path.glob("*.engine*"))
    assert main(["build", str(onnx_path), "--batch", "4,2,1"]) == 2
