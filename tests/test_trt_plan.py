"""TensorRT without TensorRT. The build plan (export/trt_plan.py) as a pure function, per
version; then the plan applied through the real Polygraphy loaders, and the engine run by
our backend, against a stand-in `tensorrt` (tests/trt_stub.py) that knows exactly the names
each version's real Python bindings register (the PyPI `*-bindings` wheels, read as data:
their compiled module needs TensorRT's libraries to load, but every name it registers is a
string in its string table) and raises AttributeError for the rest, as TensorRT does."""
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

from detr_edge.cli import main
from detr_edge.export.fp16 import convert_fp16
from detr_edge.export.onnx_export import ExportOptions, export_onnx
from detr_edge.export.trt_build import build, layer_node
from detr_edge.export.trt_plan import NO_DLA, BuildOptions, flags, parse_version, plan
from detr_edge.runtime.backends.trt import TensorRTBackend, check_sidecar
from detr_edge.runtime.errors import UserError
from detr_edge.train.config import DETRConfig, checkpoint_config
from detr_edge.train.synth import synthesize

from conftest import ROOT, sharp_model
from trt_stub import WHEELS, bindings_strings, install, stub_tensorrt

TINY = DETRConfig(backbone="resnet18", hidden_dim=32, nheads=2, enc_layers=1, dec_layers=1, dim_feedforward=64,
                  num_queries=5, num_classes=3, dropout=0.0)
DEVICE = {"gpu": "stand-in", "compute_capability": "0.0"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Dynamic-batch exports for TensorRT 8.5 (opset 16) and 10 (opset 17), FP32 and FP16."""
    root = tmp_path_factory.mktemp("trt")
    out = {}
    for target in ("trt8.5", "trt10"):
        path = root / f"{target}.onnx"
        export_onnx(sharp_model(TINY), checkpoint_config(TINY, (64, 64), None), path,
                    ExportOptions(dynamic_batch=True, target=target))
        convert_fp16(path, path.with_suffix(".fp16.onnx"))
        out[target], out[f"{target}.fp16"] = path, path.with_suffix(".fp16.onnx")
    fixed = root / "fixed.onnx"
    export_onnx(sharp_model(TINY), checkpoint_config(TINY, (64, 64), None), fixed, ExportOptions(target="trt10"))
    convert_fp16(fixed, fixed.with_suffix(".fp16.onnx"))
    out["fixed.fp16"] = fixed.with_suffix(".fp16.onnx")
    synthesize(root / "data", train=5, val=0, size=(64, 80), video_frames=0, seed=2)
    out["images"] = root / "data" / "train"
    return out


# ---- the plan, per version ----------------------------------------------------------------

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
    assert flags(parse_version(version), precision) == (network, builder)


def _plan_cli(capsys, *args) -> dict:
    assert main(["build", *map(str, args), "--plan"]) == 0
    return json.loads(capsys.readouterr().out)


def test_every_plan_clears_tf32(files, capsys):
    """TensorRT enables TF32 by default: an 'FP32' engine would miss the FP32 gate on Ampere+."""
    fp32 = _plan_cli(capsys, files["trt10"], "--trt-version", "10.3")
    assert fp32["precision"] == "fp32" and fp32["builder"]["cleared_flags"] == ["TF32"]
    assert fp32["builder"]["flags"] == [] and not fp32["network"]["strongly_typed"]
    assert plan(files["trt10.fp16"], "11.4")["builder"]["cleared_flags"] == ["TF32"]


def test_weakly_typed_fp16_pins_layernorm_softmax_and_position_embedding(files, capsys):
    p = _plan_cli(capsys, files["trt8.5.fp16"], "--trt-version", "8.5")
    assert p["builder"]["flags"] == ["FP16", "OBEY_PRECISION_CONSTRAINTS"]
    pinned = p["fp32_layers"]["layers_of_onnx_nodes"]
    graph = onnx.load(str(files["trt8.5.fp16"]))
    by_name = {n.name: n for n in graph.graph.node}
    # opset 16: LayerNorm decomposed (ReduceMean, Sub, Pow, Sqrt, Div, ...), each piece pinned
    for layers in ("encoder/layers.0/norm1", "decoder/layers.0/norm2", "decoder/norm"):
        pieces = {by_name[n].op_type for n in pinned if f"/{layers}/" in n}
        assert {"ReduceMean", "Sqrt", "Div"} <= pieces, (layers, pieces)
    assert sum(by_name[n].op_type == "Softmax" for n in pinned) == 3  # encoder self, decoder self and cross
    assert sum("/backbone.1/" in n for n in pinned) >= 10  # the sine position embedding
    assert not any(by_name[n].op_type in ("Conv", "MatMul", "Gemm") for n in pinned)
    # the converter's casts to FP16 at the islands' edges carry the islands' names: not pinned
    assert not [n for n in pinned if by_name[n].op_type == "Cast"
                and next(a.i for a in by_name[n].attribute if a.name == "to") != onnx.TensorProto.FLOAT]
    assert p["fp32_layers"]["set"] == ["precision", "output types"]
    # strongly typed (10 default, 11): precision from the file, nothing to pin
    for version in ("10.3", "11.4"):
        assert plan(files["trt10.fp16"], version)["fp32_layers"]["layers_of_onnx_nodes"] == []
    weak = plan(files["trt10.fp16"], "10.3", BuildOptions(weakly_typed=True))
    assert weak["builder"]["flags"] == ["FP16", "OBEY_PRECISION_CONSTRAINTS"] and weak["fp32_layers"]["layers_of_onnx_nodes"]


def test_a_dynamic_batch_file_gets_a_profile_covering_the_runtime(files):
    """Without --batch the profile used to be 1/1/1 while `check` sends 4 and COCO evaluation 8."""
    profile = plan(files["trt10"], "10.3")["profile"]
    assert profile == {"images": {"min": [1, 3, 64, 64], "opt": [1, 3, 64, 64], "max": [8, 3, 64, 64]},
                       "mask": {"min": [1, 64, 64], "opt": [1, 64, 64], "max": [8, 64, 64]}}
    assert plan(files["trt10"], "10.3", BuildOptions(batch=(2, 4, 16)))["profile"]["mask"]["max"] == [16, 64, 64]
    assert plan(files["fixed.fp16"], "10.3")["profile"]["images"]["max"] == [1, 3, 64, 64]
    with pytest.raises(UserError, match="--batch needs a dynamic-batch file"):
        plan(files["fixed.fp16"], "10.3", BuildOptions(batch=(1, 2, 4)))


def _refusal(capsys, *args) -> str:
    assert main(["build", *map(str, args), "--plan"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    return captured.err


def test_refusals_are_one_line(files, capsys):
    assert "--opt-level needs TensorRT 8.6" in _refusal(capsys, files["trt8.5"], "--trt-version", "8.5", "--opt-level", "3")
    assert plan(files["trt10"], "8.6.1", BuildOptions(opt_level=3))["builder"]["optimization_level"] == 3
    assert "DLA needs one fixed shape" in _refusal(capsys, files["trt10.fp16"], "--trt-version", "10.3", "--dla", "0",
                                                   "--gpu-fallback", "--batch", "1,4,8")
    assert "DLA needs one fixed shape" in _refusal(capsys, files["trt10.fp16"], "--trt-version", "10.3", "--dla", "0",
                                                   "--gpu-fallback")  # the default 1/1/8 profile
    assert "has no DLA" in _refusal(capsys, files["fixed.fp16"], "--trt-version", "10.8", "--dla", "0", "--gpu-fallback")
    assert "has no DLA" in _refusal(capsys, files["fixed.fp16"], "--trt-version", "11.4.0", "--dla", "0", "--gpu-fallback")
    assert "add --gpu-fallback" in _refusal(capsys, files["fixed.fp16"], "--trt-version", "10.3", "--dla", "0")
    assert "FP16 or INT8 only" in _refusal(capsys, files["trt10"], "--trt-version", "10.3", "--dla", "0")
    assert "no TensorRT here" in _refusal(capsys, files["trt10"]) if "tensorrt" not in sys.modules else True
    dla = plan(files["fixed.fp16"], "10.7", BuildOptions(dla=1, gpu_fallback=True))
    assert dla["dla"] == {"core": 1, "gpu_fallback": True}
    assert dla["builder"]["flags"] == ["PREFER_PRECISION_CONSTRAINTS", "GPU_FALLBACK"]
    assert plan(files["fixed.fp16"], "11.4.1", BuildOptions(dla=0, gpu_fallback=True))["dla"]["core"] == 0
    with pytest.raises(UserError, match="Orin Nano has none"):  # a GPU without DLA cores, whatever its name
        plan(files["fixed.fp16"], "10.3", BuildOptions(dla=0, gpu_fallback=True), {"gpu": "Orin", "dla_cores": 0})
    with pytest.raises(UserError, match="opset 17 is newer than TensorRT 8.5.0 parses.*--target trt8.5"):
        plan(files["trt10"], "8.5")
    with pytest.raises(UserError, match="older than 8.5"):
        plan(files["trt10"], "8.4.3")


def test_the_legacy_calibrator_plan_has_its_profile_and_its_own_cache(files, capsys):
    p = _plan_cli(capsys, files["trt10"], "--trt-version", "10.3", "--legacy-int8-calibrator", "--calib-data", "imgs",
                  "--batch", "1,2,8")
    assert p["builder"]["flags"] == ["INT8", "FP16", "OBEY_PRECISION_CONSTRAINTS"]
    calibration = p["calibration"]
    assert calibration["profile"] == "the build profile" and calibration["batch"] == 2  # the profile's opt
    assert calibration["cache"] == "trt10.legacy-calibrator.cache" != "trt10.calib.cache"  # not calibrate's
    assert "--legacy-int8-calibrator needs --calib-data" in _refusal(capsys, files["trt10"], "--trt-version", "10.3",
                                                                     "--legacy-int8-calibrator")
    assert "TensorRT 11 removed implicit INT8" in _refusal(capsys, files["trt10"], "--trt-version", "11.4",
                                                           "--legacy-int8-calibrator", "--calib-data", "imgs")


def test_layer_to_node_follows_the_parser_naming():
    nodes = {"/a/Softmax", "/a/Mul", "/a/Mul_1"}
    assert layer_node("anything", "[ONNX Layer: /a/Softmax]", nodes) == "/a/Softmax"  # 8.6 on: the metadata
    assert layer_node("x", "[ONNX Layer: /a/Mul | doc string]", nodes) == "/a/Mul"
    assert layer_node("/a/Softmax_17", None, nodes) == "/a/Softmax"  # 8.5: a further layer of the node
    assert layer_node("/a/Mul_1", None, nodes) == "/a/Mul_1"  # a node of that name comes first
    assert layer_node("(Unnamed Layer* 3) [Shuffle]", None, nodes) is None


# ---- the plan applied through Polygraphy, against each version's names ----------------------

def has_name(strings: bytes, name: str) -> bool:
    """A registered name is a NUL-terminated string, or the tail of a longer one (the linker
    merges "set_output_type" into "reset_output_type")."""
    return f"{name}\0".encode() in strings


@pytest.fixture(scope="module", params=list(WHEELS))
def bindings(request):
    return request.param, bindings_strings(request.param)


def test_the_string_table_tells_present_from_removed(bindings):
    version, strings = bindings
    for name in ("execute_async_v3", "set_tensor_address", "deserialize_cuda_engine", "get_tensor_profile_shape"):
        assert has_name(strings, name)
    legacy = ["IInt8EntropyCalibrator2", "int8_calibrator", "EXPLICIT_BATCH", "OBEY_PRECISION_CONSTRAINTS"]
    assert [has_name(strings, n) for n in legacy] == [not version.startswith("11")] * 4
    assert has_name(strings, "STRONGLY_TYPED") == (not version.startswith("8"))
    assert not has_name(strings, "surely_no_tensorrt_name_like_this")


@pytest.fixture
def use_stub(monkeypatch):
    """Install a stand-in `tensorrt` where Polygraphy and our code import it, on a stand-in GPU."""
    import detr_edge.runtime.cuda as cuda
    monkeypatch.setattr(cuda, "device_info", lambda: dict(DEVICE))
    return lambda trt: install(monkeypatch, trt)


def _paths(version: str, files) -> list:
    """(file, options) of every build path a version has."""
    major = int(version.split(".")[0])
    paths = [(files["trt10"], BuildOptions(batch=(1, 2, 4), timing_cache="cache.bin", opt_level=3)),
             (files["trt10.fp16"], BuildOptions(batch=(1, 2, 4), timing_cache="cache.bin"))]
    if major < 11:
        paths += [(files["trt10.fp16"], BuildOptions(weakly_typed=True) if major == 10 else BuildOptions()),
                  (files["trt10"], BuildOptions(legacy_int8=True, calib_data=str(files["images"]), batch=(1, 2, 4)))]
    if not NO_DLA[0] <= parse_version(version) <= NO_DLA[1]:
        paths.append((files["fixed.fp16"], BuildOptions(dla=1, gpu_fallback=True)))
    return paths


def test_each_version_builds_its_plan_through_polygraphy(bindings, files, use_stub, tmp_path, monkeypatch):
    import polygraphy.backend.trt.util as polygraphy_util
    version, strings = bindings
    monkeypatch.chdir(tmp_path)
    uploads = []  # Polygraphy's calibrator copies each batch to the GPU: here, a record of it

    def upload(array, name, buffers, stream=None):
        uploads.append((name, array.shape, array.dtype))
        return 4096 * len(uploads)
    monkeypatch.setattr(polygraphy_util, "_get_array_on_gpu", upload)
    for source, options in _paths(version, files):
        trt = use_stub(stub_tensorrt(version, strings, dla_cores=2))
        out = tmp_path / f"{source.stem}.engine"
        sidecar = build(source, out, options)
        p = sidecar["engine"]["plan"]
        assert p == plan(source, version, options, {**DEVICE, "dla_cores": 2})  # the plan recorded is the plan applied
        assert out.read_bytes() == b"serialized engine" and sidecar["engine"]["tensorrt_version"] == version
        (network, config), = trt.builds
        flag = trt.BuilderFlag
        assert {f.name for f in config.flags} == set(p["builder"]["flags"]), (options, config.flags)
        assert flag.TF32 not in config.flags  # cleared: on by default
        strongly = network.flags & (1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)) if has_name(
            strings, "STRONGLY_TYPED") else 0
        assert bool(strongly) == p["network"]["strongly_typed"]
        trt_profile, = config.profiles
        assert {name: [list(s) for s in shapes] for name, shapes in trt_profile.shapes.items()} == {
            name: [shape["min"], shape["opt"], shape["max"]] for name, shape in p["profile"].items()}
        assert config.pools[trt.MemoryPoolType.WORKSPACE] == p["builder"]["workspace_bytes"]
        pinned = {layer.name for layer in network.layers if layer.precision is not None}
        wanted = set(p["fp32_layers"]["layers_of_onnx_nodes"])
        assert {layer_node(n, None, wanted) for n in pinned} == wanted - _not_float(source, wanted)
        for layer in network.layers:
            if layer.precision is not None:
                assert layer.precision == trt.DataType.FLOAT
                assert layer.output_types == {i: trt.DataType.FLOAT for i in range(layer.num_outputs)}
        if p["calibration"]:  # Polygraphy's calibrator, the build profile as calibration profile, its own cache
            assert config.calibration_profile is trt_profile or config.calibration_profile.shapes == trt_profile.shapes
            assert isinstance(config.int8_calibrator, trt.IInt8EntropyCalibrator2)
            assert config.int8_calibrator._cache.endswith("trt10.legacy-calibrator.cache")
            assert trt.calibration_batches == 3 and len(uploads) == 6  # 5 images at the opt batch of 2: 2 + 2 + 1
            assert uploads[:2] == [("images", (2, 3, 64, 64), np.float32), ("mask", (2, 64, 64), np.bool_)]
            cache = files["trt10"].with_suffix(".legacy-calibrator.cache")
            assert cache.read_bytes().startswith(b"TRT-stub")
            cache.unlink()  # read back by the next build: calibration skipped
            uploads.clear()
        if p["dla"]:
            assert config.DLA_core == 1 and config.default_device_type == trt.DeviceType.DLA
        if options.opt_level:
            assert config.builder_optimization_level == 3
        assert len({id(logger) for logger in trt.loggers}) == 1 and not trt.created_loggers  # one logger


def _not_float(source, nodes) -> set:
    """Pinned nodes none of whose layers has only float outputs (shape and index arithmetic)."""
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(source)))
    types = {v.name: v.type.tensor_type.elem_type for v in graph.graph.value_info}
    return {n.name for n in graph.graph.node if n.name in nodes
            and any(types.get(o, 1) != onnx.TensorProto.FLOAT for o in n.output)}


def test_the_same_dla_refusals_on_the_device(files, use_stub, bindings, tmp_path):
    version, strings = bindings
    if version != "10.3.0":
        pytest.skip("one version is enough")
    use_stub(stub_tensorrt(version, strings, dla_cores=0))
    with pytest.raises(UserError, match="stand-in has 0 DLA cores"):
        build(files["fixed.fp16"], tmp_path / "x.engine", BuildOptions(dla=0, gpu_fallback=True))
    assert not list(tmp_path.iterdir())


# ---- the engine runner ---------------------------------------------------------------------

SHAPES = {"images": (3, 64, 64), "mask": (64, 64), "logits": (5, 4), "boxes": (5, 4)}


class FakeMemory:
    stream = 7

    def __init__(self):
        self.closed = 0

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

    def close(self):
        self.closed += 1

    def active(self):
        import contextlib
        return contextlib.nullcontext()


def _engine(tmp_path, files, use_stub, strings, version, profile) -> TensorRTBackend:
    trt = use_stub(stub_tensorrt(version, strings, engine_spec={"dynamic": True, "profile": profile, "shapes": SHAPES}))
    build(files["trt10.fp16"], tmp_path / "m.engine", BuildOptions(batch=profile))
    return TensorRTBackend(tmp_path / "m.engine", memory=FakeMemory(), trt=trt), trt


def test_the_runner_splits_batches_beyond_the_profile(bindings, files, use_stub, tmp_path):
    version, strings = bindings
    backend, trt = _engine(tmp_path, files, use_stub, strings, version, (1, 2, 2))
    assert backend.max_batch == 2 and backend.batch_range == (1, 2, 2)
    outputs = backend.infer(np.zeros((5, 3, 64, 64), np.float32), np.zeros((5, 64, 64), bool))
    assert list(outputs) == ["logits", "boxes"]  # by name, in the ONNX order
    assert outputs["logits"].shape == (5, 5, 4) and outputs["boxes"].shape == (5, 5, 4)
    assert backend.context.runs == 3  # 2 + 2 + 1
    assert {"set_tensor_address", "execute_async_v3", "set_input_shape"} <= trt.names.used
    assert len({id(logger) for logger in trt.loggers}) == 1 and not trt.created_loggers  # the builder's logger
    memory = backend.memory
    backend.close()
    assert backend.context is None and backend.engine is None and memory.closed == 1
    backend.close()
    assert memory.closed == 1


def test_a_batch_the_profile_refuses_is_one_clear_error(bindings, files, use_stub, tmp_path):
    version, strings = bindings
    if version != "10.3.0":
        pytest.skip("one version is enough")
    backend, _ = _engine(tmp_path, files, use_stub, strings, version, (2, 2, 4))
    with pytest.raises(UserError, match="TensorRT refused batch 1 for images .*takes 2 to 4"):
        backend.infer(np.zeros((1, 3, 64, 64), np.float32), np.zeros((1, 64, 64), bool))


def test_device_memory_falls_through_to_the_binding_that_starts(monkeypatch):
    """cuda-python 13 on a CUDA 12 driver (JetPack 6) fails at its first call, not at import:
    pycuda must still be tried, and without either the error names both reasons."""
    import detr_edge.runtime.cuda as cuda

    def driver_too_old():
        raise cuda.CudaError("cudaErrorInsufficientDriver (the driver supports CUDA 12.6)")

    class Started:
        pass
    monkeypatch.setattr(cuda, "CudaPython", driver_too_old)
    monkeypatch.setattr(cuda, "PyCuda", Started)
    assert isinstance(cuda.memory(), Started)

    def missing():
        raise ImportError("No module named 'pycuda'")
    monkeypatch.setattr(cuda, "PyCuda", missing)
    with pytest.raises(UserError, match=r"cuda-python: cudaErrorInsufficientDriver \(the driver supports CUDA 12.6\); "
                                        r"pycuda is not installed\): pip install 'cuda-python==M.\*'"):
        cuda.memory()


def test_mismatched_sidecar_is_refused():
    meta = {"engine": {"tensorrt_version": "10.3.0", "gpu": "Orin", "compute_capability": "8.7"}}
    check_sidecar(meta, "10.3.0", {"gpu": "Orin", "compute_capability": "8.7"}, "m.engine")
    with pytest.raises(UserError, match="built with TensorRT 10.3.0, this is 10.13.3"):
        check_sidecar(meta, "10.13.3", {"gpu": "Orin", "compute_capability": "8.7"}, "m.engine")
    with pytest.raises(UserError, match="built for Orin .*this is NVIDIA H100"):
        check_sidecar(meta, "10.3.0", {"gpu": "NVIDIA H100", "compute_capability": "9.0"}, "m.engine")


def test_build_without_tensorrt_says_how_to_get_it(files, tmp_path):
    if subprocess.run([sys.executable, "-c", "import tensorrt"]).returncode == 0:
        pytest.skip("TensorRT is installed here")
    proc = subprocess.run([sys.executable, "-m", "detr_edge", "build", str(files["trt10"]), "--out",
                           str(tmp_path / "m.engine")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "TensorRT is not installed" in proc.stderr and "python3-libnvinfer" in proc.stderr
    assert not list(tmp_path.iterdir())
    assert main(["build", str(files["trt10"]), "--batch", "4,2,1"]) == 2
