"""calibration/: samples, the two Q/DQ flavours (TensorRT's parser rules walked node by
node), the TensorRT cache and calibrator, the sensitivity search, the `calibrate` command."""
import importlib
import json
import subprocess
import sys
import types

import cv2
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from calibration.data import Batches, Samples, frames
from calibration.trt_cache import read_cache, scales_from_ranges, version_tag, write_cache
from export.cli import main
from export.onnx_export import ExportOptions, export_onnx
from runtime.errors import UserError
from runtime.metadata import preprocess_spec, read_onnx_metadata
from runtime.preprocess import preprocess
from train.config import checkpoint_config
from train.synth import synthesize

from conftest import ROOT, sharp_model, small_config

SMALL = small_config()
SPEC = preprocess_spec((128, 128))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Synthetic shapes (train, val, video) and a small model exported at 128 x 128."""
    root = tmp_path_factory.mktemp("calib")
    synthesize(root / "data", train=16, val=16, size=(128, 160), video_frames=12, seed=1)
    export_onnx(sharp_model(SMALL), checkpoint_config(SMALL, (128, 128), None), root / "m.onnx", ExportOptions())
    return root


@pytest.fixture(scope="module")
def calibrated(work):
    assert main(["calibrate", str(work / "m.onnx"), "--data", str(work / "data" / "train"), "--samples", "8",
                 "--val-data", str(work / "data" / "annotations" / "instances_val.json")]) == 0
    return work


def test_samples_are_the_runtime_preprocessing_of_each_source(work):
    data = work / "data"
    folder = list(frames(data / "train", 5))
    listed = list(frames(data / "annotations" / "instances_train.json", 5))
    video = list(frames(data / "shapes.mp4", 3, every=4))
    assert len(folder) == len(listed) == 5 and len(video) == 3
    np.testing.assert_array_equal(folder[0], cv2.imread(str(data / "train" / "000000.jpg")))
    capture = cv2.VideoCapture(str(data / "shapes.mp4"))
    decoded = [capture.read()[1] for _ in range(9)]
    np.testing.assert_array_equal(video[2], decoded[8])  # frames 0, 4, 8
    samples = Samples(data / "train", SPEC, samples=3, batch=2, progress=False)
    feeds = list(samples.batches())
    assert samples.count == 3 and [f["images"].shape[0] for f in feeds] == [2, 2]
    expected = preprocess(folder[:2], SPEC)
    np.testing.assert_array_equal(feeds[0]["images"], expected.images)
    np.testing.assert_array_equal(feeds[0]["mask"], expected.mask)
    assert feeds[0]["mask"].any()  # 128 x 160 frames letterboxed into 128 x 128: real padding


def test_no_readable_image_fails_clearly_and_writes_nothing(work, tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(UserError, match="no readable image"):
        list(Samples(tmp_path, SPEC, progress=False).batches())
    model = tmp_path / "m.onnx"
    model.write_bytes((work / "m.onnx").read_bytes())
    proc = subprocess.run([sys.executable, "-m", "export.cli", "calibrate", str(model), "--data", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "no readable image" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jpg", "m.onnx"]


def _initializers(graph):
    return {i.name: numpy_helper.to_array(i) for i in graph.graph.initializer}


def test_ranges_collected_batch_by_batch_equal_one_pass(work, tmp_path):
    """The bounded-memory collection (one batch per `collect_data`) gives the ranges
    onnxruntime's own single pass over all the data gives: exactly, for min-max."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static
    from onnxruntime.quantization.calibrate import load_tensors_data

    from calibration.quantize import QuantOptions, collect_ranges

    def samples():
        return Samples(work / "data" / "train", SPEC, samples=5, progress=False)

    collect_ranges(work / "m.onnx", tmp_path / "chunked.json", QuantOptions(method="minmax"), samples())
    quantize_static(str(work / "m.onnx"), str(tmp_path / "q.onnx"), Batches(list(samples().batches())),
                    quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=["Conv", "MatMul", "Gemm"], calibrate_method=CalibrationMethod.MinMax,
                    calibration_cache_path=str(tmp_path / "one-pass.json"))
    chunked, one_pass = load_tensors_data(tmp_path / "chunked.json"), load_tensors_data(tmp_path / "one-pass.json")
    assert set(chunked.data) == set(one_pass.data) and len(chunked.data) > 50
    for name, value in one_pass.data.items():
        np.testing.assert_array_equal(chunked.data[name].range_value, value.range_value)


def test_tensorrt_flavour_follows_the_parser_rules(calibrated):
    graph = onnx.load(str(calibrated / "m.int8.onnx"))
    opset = max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))
    assert opset >= 13
    inits = _initializers(graph)
    producers = {out: n for n in graph.graph.node for out in n.output}
    qdq = [n for n in graph.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert len(qdq) > 50
    per_channel = 0
    for node in qdq:
        scale, zero = inits[node.input[1]], inits[node.input[2]]
        assert (scale > 0).all(), node.name
        assert zero.dtype == np.int8 and not zero.any(), node.name  # int8, zero point 0: symmetric
        if scale.ndim == 1 and scale.size > 1:  # per-channel: weights only, one scale per channel
            per_channel += 1
            assert node.op_type == "DequantizeLinear" and node.input[0] in inits, node.name
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            assert scale.size == inits[node.input[0]].shape[axis]
        else:
            assert scale.size == 1
        if node.op_type == "DequantizeLinear":  # its input is int8: a weight or a QuantizeLinear output
            source = node.input[0]
            assert (inits[source].dtype == np.int8) if source in inits else producers[source].op_type == "QuantizeLinear"
    assert per_channel >= 20  # every conv and linear weight


def test_cpu_flavour_has_uint8_activations(calibrated):
    graph = onnx.load(str(calibrated / "m.int8-cpu.onnx"))
    inits = _initializers(graph)
    zero_types = {inits[n.input[2]].dtype for n in graph.graph.node if n.op_type == "QuantizeLinear"}
    assert zero_types == {np.dtype(np.uint8)}


def _int8_weights(path) -> list[np.ndarray]:
    return [w for w in _initializers(onnx.load(str(path))).values() if w.dtype == np.int8 and w.ndim >= 2]


def _largest_int8_weight(path) -> int:
    return max(int(np.abs(w.astype(int)).max()) for w in _int8_weights(path))


def test_cpu_flavour_products_cannot_saturate_avx2_int16_pairs(calibrated, tmp_path):
    """Without VNNI, onnxruntime's uint8 x int8 kernels add pairs of products in int16:
    255 * |w| * 2 must stay <= 32767, so |w| <= 64. The TensorRT flavour keeps 8 bits, and
    so does the CPU flavour made for VNNI CPUs (--vnni)."""
    assert len(_int8_weights(calibrated / "m.int8-cpu.onnx")) >= 20
    assert _largest_int8_weight(calibrated / "m.int8-cpu.onnx") * 255 * 2 <= 32767
    assert _largest_int8_weight(calibrated / "m.int8.onnx") == 127
    model = tmp_path / "m.onnx"
    model.write_bytes((calibrated / "m.onnx").read_bytes())
    assert main(["calibrate", str(model), "--data", str(calibrated / "data" / "train"), "--samples", "4",
                 "--flavour", "cpu", "--vnni"]) == 0
    assert _largest_int8_weight(tmp_path / "m.int8-cpu.onnx") == 127
    assert read_onnx_metadata(onnx.load(str(tmp_path / "m.int8-cpu.onnx")), "m")["export"]["int8"]["weight_bits"] == 8


def test_report_and_ap_within_a_point_of_fp32_on_annotated_data(calibrated):
    report = json.loads((calibrated / "m.int8.report.json").read_text())
    assert report["samples"] == 8 and report["method"] == "entropy"
    assert set(report["ap"]) == {"fp32", "int8 trt", "int8 cpu"}
    for flavour in ("trt", "cpu"):
        entry = report["files"][flavour]
        assert entry["MiB"] < report["files"]["fp32"]["MiB"] / 3  # int8 weights
        assert entry["excluded_nodes"] and all("/bbox_embed/" in n for n in entry["excluded_nodes"])
    assert "| m.int8-cpu.onnx |" in (calibrated / "m.int8.report.md").read_text()


def test_trt_cache_parses_back_to_the_same_scales(calibrated, tmp_path):
    from onnxruntime.quantization.calibrate import load_tensors_data
    ranges = load_tensors_data(calibrated / "m.calib.json").data
    scales = scales_from_ranges(ranges)
    assert len(scales) > 50 and "images" in scales
    header, parsed = read_cache(calibrated / "m.calib.cache")
    assert header == "TRT-8601-EntropyCalibration2"
    assert parsed == {k: float(np.float32(v)) for k, v in scales.items()}
    low, high = ranges["images"].range_value
    assert parsed["images"] == pytest.approx(max(abs(low), abs(high)) / 127, rel=1e-6)
    write_cache(tmp_path / "c", {"x": 0.5}, "10.3.0")
    assert read_cache(tmp_path / "c") == ("TRT-100300-EntropyCalibration2", {"x": 0.5})
    assert version_tag("8.5.1") == "8501" and version_tag("8.5.10") == "8510"  # the reference page's header
    with pytest.raises(UserError, match="TensorRT 11 removed"):
        version_tag("11.0")


def test_entropy_calibrator_with_a_stand_in_tensorrt(work, tmp_path, monkeypatch):
    fake = types.ModuleType("tensorrt")
    fake.IInt8EntropyCalibrator2 = type("IInt8EntropyCalibrator2", (), {"__init__": lambda self: None})
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    import calibration.trt_calibrator as module
    module = importlib.reload(module)
    try:
        uploads = []

        def upload(name, array):
            uploads.append((name, array.shape))
            return 1000 + len(uploads)
        samples = Samples(work / "data" / "train", SPEC, samples=3, batch=2, progress=False)
        calibrator = module.EntropyCalibrator(samples, upload, tmp_path / "cache")
        assert calibrator.get_batch_size() == 2 and calibrator.read_calibration_cache() is None
        assert calibrator.get_batch(["mask", "images"]) == [1001, 1002]
        assert uploads == [("mask", (2, 128, 128)), ("images", (2, 3, 128, 128))]
        assert calibrator.get_batch(["images", "mask"]) == [1003, 1004]
        assert calibrator.get_batch(["images", "mask"]) is None
        calibrator.write_calibration_cache(b"TRT-8601-EntropyCalibration2\n")
        assert calibrator.read_calibration_cache() == b"TRT-8601-EntropyCalibration2\n"
    finally:
        monkeypatch.delitem(sys.modules, "tensorrt")
        assert importlib.reload(module).EntropyCalibrator is None  # no TensorRT here: not defined


def test_sensitivity_search_keeps_costly_groups_float_until_within_target(work, tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes((work / "m.onnx").read_bytes())
    assert main(["calibrate", str(model), "--data", str(work / "data" / "train"), "--samples", "8",
                 "--flavour", "cpu", "--val-data", str(work / "data" / "val"), "--auto", "--max-ap-drop", "1.0"]) == 0
    report = json.loads((tmp_path / "m.int8.report.json").read_text())
    result = report["search"]["cpu"]
    first, last = result["steps"][0], result["steps"][-1]
    assert first["kept_float"] == [] and first["AP_drop"] > 1.0  # quantizing everything costs too much
    assert result["within_target"] and last["AP_drop"] <= 1.0 and result["kept_float_groups"]
    assert len(result["kept_float_groups"]) < len(result["groups"])  # not simply everything float
    # the file on disk is the reported one: exactly those nodes take float inputs
    graph = onnx.load(str(tmp_path / "m.int8-cpu.onnx"))
    dq_outputs = {o for n in graph.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    float_nodes = {n.name for n in graph.graph.node if n.op_type in ("Conv", "MatMul", "Gemm")
                   and not any(i in dq_outputs for i in n.input)}
    assert set(result["kept_float_nodes"]) <= float_nodes
    assert report["ap"]["int8 cpu"] == pytest.approx(last["AP"])
