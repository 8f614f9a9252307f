"""calibration/: samples, the two Q/DQ flavours (TensorRT's parser rules walked node by
node), the TensorRT cache and calibrator, the sensitivity search, the `calibrate` command."""
import json
import subprocess
import sys

import cv2
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from detr_edge.calibration.data import Batches, Samples, frames
from detr_edge.calibration.trt_cache import read_cache, scales_from_ranges, version_tag, write_cache
from detr_edge.cli import main
from detr_edge.export.onnx_export import ExportOptions, export_onnx
from detr_edge.runtime.errors import UserError
from detr_edge.runtime.metadata import preprocess_spec, read_onnx_metadata
from detr_edge.runtime.preprocess import preprocess
from detr_edge.train.config import checkpoint_config
from detr_edge.train.synth import synthesize

from conftest import DEMO_CHECKPOINT, NO_TORCH, ROOT, needs_demo_model, sharp_model, small_config

SMALL = small_config()
SPEC = preprocess_spec((128, 128))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Synthetic shapes (train, val, video) and a small model exported at 128 x 128."""
    root = tmp_path_factory.mktemp("calib")
    # a random model's INT8 loses some of its own detections on these 16 val scenes in both
    # flavours (so do seeds 2, 4 and 6 of 1-6); the tests below assert that it does
    synthesize(root / "data", train=16, val=16, size=(128, 160), video_frames=12, seed=3)
    export_onnx(sharp_model(SMALL), checkpoint_config(SMALL, (128, 128), None), root / "m.onnx", ExportOptions())
    return root


@pytest.fixture(scope="module")
def calibrated(work):
    """Calibrated with unannotated --val-data: AP against the FP32 file's own detections (a
    random model scores 0 on the real annotations, which would make every AP bound hold)."""
    # a random model's INT8 misses the 1-point target against its own detections: exit 1
    assert main(["calibrate", str(work / "m.onnx"), "--data", str(work / "data" / "train"), "--samples", "8",
                 "--val-data", str(work / "data" / "val"), "--trt-version", "8.6.1"]) == 1
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
    proc = subprocess.run([sys.executable, "-m", "detr_edge", "calibrate", str(model), "--data", str(tmp_path)],
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

    from detr_edge.calibration.quantize import collect_ranges

    def samples():
        return Samples(work / "data" / "train", SPEC, samples=5, progress=False)

    collect_ranges(work / "m.onnx", tmp_path / "chunked.json", "minmax", samples())
    quantize_static(str(work / "m.onnx"), str(tmp_path / "q.onnx"), Batches(list(samples().batches())),
                    quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=["Conv", "MatMul", "Gemm"], calibrate_method=CalibrationMethod.MinMax,
                    calibration_cache_path=str(tmp_path / "one-pass.json"))
    chunked, one_pass = load_tensors_data(tmp_path / "chunked.json"), load_tensors_data(tmp_path / "one-pass.json")
    assert set(one_pass.data) < set(chunked.data) and len(one_pass.data) > 50  # all tensors: for TensorRT's cache
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


def _activation_matmuls(graph) -> list:
    """MatMuls with no weight input (a weight is an initializer, or the DQ of one)."""
    inits, producers = {i.name for i in graph.graph.initializer}, {o: n for n in graph.graph.node for o in n.output}

    def weight(name):
        node = producers.get(name)
        return name in inits or (node is not None and node.op_type == "DequantizeLinear" and node.input[0] in inits)
    return [n for n in graph.graph.node if n.op_type == "MatMul" and not any(weight(i) for i in n.input)]


def _consumers(graph) -> dict:
    out = {}
    for node in graph.graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def test_tensorrt_flavour_is_placed_as_tensorrt_fuses_it(calibrated):
    """A dedicated Q/DQ pair per consumer, none on Conv/MatMul/Gemm outputs, the MatMuls
    between two activations left float, and FP16 between the pairs (opset 19, FP16 scales)
    except the FP32 islands of the FP16 file."""
    from detr_edge.calibration.precision import fp32_nodes
    path = calibrated / "m.int8.onnx"
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    export = read_onnx_metadata(graph, path)["export"]
    assert export["opset"] == 19 == max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))
    assert export["int8"]["graph"] == "fp16" and export["int8"]["attention"] == "float" and export["kept_fp32"]
    consumers, producers = _consumers(graph), {o: n for n in graph.graph.node for o in n.output}
    quantize = [n for n in graph.graph.node if n.op_type == "QuantizeLinear"]
    assert len(quantize) > 20
    for node in quantize:  # Q -> exactly one DQ -> exactly one consumer
        dq, = consumers[node.output[0]]
        assert dq.op_type == "DequantizeLinear"
        assert len(consumers[dq.output[0]]) == 1, dq.name
        assert producers.get(node.input[0]) is None or producers[node.input[0]].op_type not in ("Conv", "MatMul", "Gemm")
    for node in graph.graph.node:
        if node.op_type in ("Conv", "MatMul", "Gemm"):
            assert not any(c.op_type == "QuantizeLinear" for o in node.output for c in consumers.get(o, [])), node.name
    attention = _activation_matmuls(graph)
    # Q.K^T and softmax.V per attention, less three: the first decoder layer's queries start at
    # zero, so its self-attention and the Q of its cross-attention fold to constants
    assert len(attention) == 2 * (SMALL.enc_layers + 2 * SMALL.dec_layers) - 3
    assert not any(producers[i].op_type == "DequantizeLinear" for n in attention for i in n.input if i in producers)
    types = {v.name: v.type.tensor_type.elem_type for v in graph.graph.value_info}
    islands = set(fp32_nodes(graph, tuple(export["kept_fp32"]["ops"]), tuple(export["kept_fp32"]["names"])))
    kinds = {}
    for node in graph.graph.node:
        floats = [types[o] for o in node.output if types.get(o) in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
        if floats and node.op_type != "Cast":
            kinds.setdefault("fp32" if node.name in islands else "fp16", set()).update(floats)
    assert kinds["fp16"] == {onnx.TensorProto.FLOAT16}  # every layer outside the islands, Q/DQ included
    assert kinds["fp32"] == {onnx.TensorProto.FLOAT}
    scales = {_initializers(graph)[n.input[1]].dtype for n in quantize}
    assert scales == {np.dtype(np.float16)}


def test_tensorrt_flavour_for_tensorrt_8_keeps_the_fp32_graph_and_can_quantize_attention(work, tmp_path):
    """TensorRT 8.x parses no opset 19 (FP32 Q/DQ only): the graph stays FP32 and the builder
    sets FP16 with the islands pinned. `attention` quantizes Q.K^T and softmax.V too."""
    from detr_edge.calibration.quantize import QuantOptions, quantize
    source = tmp_path / "m86.onnx"
    export_onnx(sharp_model(SMALL), checkpoint_config(SMALL, (128, 128), None), source, ExportOptions(target="trt8.6"))
    options = QuantOptions(attention=True)
    reader = Samples(work / "data" / "train", SPEC, samples=4, progress=False)
    meta = quantize(source, tmp_path / "m86.int8.onnx", "trt", options, tmp_path / "r.json", reader)
    graph = onnx.load(str(tmp_path / "m86.int8.onnx"))
    assert meta["export"]["opset"] == 17 and "graph" not in meta["export"]["int8"] and "kept_fp32" not in meta["export"]
    assert meta["export"]["int8"]["attention"] == "quantized"
    assert not [i for i in graph.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]
    producers = {o: n for n in graph.graph.node for o in n.output}
    attention = _activation_matmuls(graph)
    assert len(attention) == 9 and all(producers[i].op_type == "DequantizeLinear" for n in attention for i in n.input)


def test_cpu_flavour_has_uint8_activations(calibrated):
    graph = onnx.load(str(calibrated / "m.int8-cpu.onnx"))
    inits = _initializers(graph)
    zero_types = {inits[n.input[2]].dtype for n in graph.graph.node if n.op_type == "QuantizeLinear"}
    assert zero_types == {np.dtype(np.uint8)}


def test_a_node_kept_float_reads_the_float_tensor_its_quantized_neighbours_share(calibrated, tmp_path):
    """The decoder layers' key projections all read the encoder's memory (+ position): with
    the first kept float and the others quantized, the first still reads the float memory."""
    from detr_edge.calibration.quantize import QuantOptions, quantize
    keys = [f"/model/transformer/decoder/layers.{i}/multihead_attn/MatMul_1" for i in range(2)]
    for flavour, cache in (("trt", "m.calib.json"), ("cpu", "m.calib-cpu.json")):
        out = tmp_path / f"m.{flavour}.onnx"
        quantize(calibrated / "m.onnx", out, flavour, QuantOptions(exclude_nodes=keys[:1]), calibrated / cache)
        graph = onnx.load(str(out))
        producers = {o: n for n in graph.graph.node for o in n.output}
        nodes = {n.name: n for n in graph.graph.node}
        kept, quantized = (nodes[k].input[0] for k in keys)
        assert producers[quantized].op_type == "DequantizeLinear"  # the shared memory is quantized
        assert producers[kept].op_type != "DequantizeLinear" and producers[kept] is producers[
            producers[producers[quantized].input[0]].input[0]]  # ... and the kept one reads what was quantized


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


def test_each_flavour_takes_its_runtimes_default_ranges_and_one_method_shares_one_file(calibrated, tmp_path):
    """By default TensorRT's EntropyCalibration2 for the TensorRT flavour (and its cache) and
    onnxruntime's MinMax for the CPU one: two passes, two range files; --method: one of each."""
    from onnxruntime.quantization.calibrate import load_tensors_data

    from detr_edge.calibration.quantize import collect_ranges

    report = json.loads((calibrated / "m.int8.report.json").read_text())
    assert report["method"] == {"trt": "entropy", "cpu": "minmax"}
    for suffix, method in ((".int8.onnx", "entropy"), (".int8-cpu.onnx", "minmax")):
        assert read_onnx_metadata(onnx.load(str(calibrated / f"m{suffix}")), "m")["export"]["int8"]["method"] == method
    collect_ranges(calibrated / "m.onnx", tmp_path / "minmax.json", "minmax",
                   Samples(calibrated / "data" / "train", SPEC, samples=8, progress=False))
    minmax, cpu, trt = (load_tensors_data(path).data for path in (
        tmp_path / "minmax.json", calibrated / "m.calib-cpu.json", calibrated / "m.calib.json"))
    assert set(cpu) == set(minmax) == set(trt)
    for name, value in minmax.items():
        np.testing.assert_array_equal(cpu[name].range_value, value.range_value)
    assert any(not np.array_equal(trt[k].range_value, cpu[k].range_value) for k in cpu)  # entropy clips
    model = tmp_path / "m.onnx"
    model.write_bytes((calibrated / "m.onnx").read_bytes())
    assert main(["calibrate", str(model), "--data", str(calibrated / "data" / "train"), "--samples", "2",
                 "--method", "entropy"]) == 0
    assert (tmp_path / "m.calib.json").is_file() and not (tmp_path / "m.calib-cpu.json").exists()
    assert json.loads((tmp_path / "m.int8.report.json").read_text())["method"] == {"trt": "entropy", "cpu": "entropy"}


def test_a_file_that_misses_the_target_is_named_and_exits_1(calibrated, tmp_path):
    report = json.loads((calibrated / "m.int8.report.json").read_text())
    drops = {key: report["ap"]["fp32"] - ap for key, ap in report["ap"].items() if key != "fp32"}
    assert max(drops.values()) > 1.0  # the fixture's exit 1 was earned
    text = (calibrated / "m.int8.report.md").read_text()
    assert "**missed**" in text and f"m.int8-cpu.onnx: AP {report['ap']['int8 cpu']:.2f}" in text
    model = tmp_path / "m.onnx"  # its own folder: the fixture's files stay as they are
    model.write_bytes((calibrated / "m.onnx").read_bytes())
    proc = subprocess.run([sys.executable, "-m", "detr_edge", "calibrate", str(model), "--data",
                           str(calibrated / "data" / "train"), "--samples", "8", "--flavour", "cpu", "--val-data",
                           str(calibrated / "data" / "val"), "--max-ap-drop", "100"], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0 and "met by every file" in proc.stdout  # --max-ap-drop sets the target


def test_report_lists_each_file_with_its_size_exclusions_and_ap(calibrated):
    """The report's AP is the files' AP: recomputed here against the FP32 file's detections."""
    from detr_edge.check import coco_ap, pseudo_labelled
    from detr_edge.runtime.backends import load_backend
    from detr_edge.runtime.coco import Images

    report = json.loads((calibrated / "m.int8.report.json").read_text())
    assert report["samples"] == 8 and "own detections" in report["ap_reference"]
    assert set(report["ap"]) == {"fp32", "int8 trt", "int8 cpu"} and report["ap"]["fp32"] == 100.0
    with load_backend(calibrated / "m.onnx") as fp32:
        images = pseudo_labelled(fp32, Images.load(calibrated / "data" / "val"))
    for flavour, suffix in (("trt", ".int8.onnx"), ("cpu", ".int8-cpu.onnx")):
        with load_backend(calibrated / f"m{suffix}") as int8:
            assert report["ap"][f"int8 {flavour}"] == pytest.approx(coco_ap(int8, images))
        assert 0 < report["ap"][f"int8 {flavour}"] < 100  # a random model's INT8 does lose detections
        entry = report["files"][flavour]
        assert entry["MiB"] < report["files"]["fp32"]["MiB"] / 3  # int8 weights
        kept = {n for n in entry["excluded_nodes"] if "/bbox_embed/" not in n}
        assert len(kept) == (9 if flavour == "trt" else 0)  # the TensorRT flavour's activation MatMuls
    assert "| m.int8-cpu.onnx |" in (calibrated / "m.int8.report.md").read_text()


@needs_demo_model
def test_default_int8_is_within_a_point_of_pytorch_on_the_demo_model(tmp_path):
    """The AP bound, on a model that detects: both flavours within 1.0 AP of the FP32 file
    (itself equal to PyTorch, tests/test_export.py) on the demo's annotated val images."""
    data = DEMO_CHECKPOINT.parents[1] / "data"
    assert main(["export", str(DEMO_CHECKPOINT), "--out", str(tmp_path / "m.onnx"), "--dynamic-batch"]) == 0
    assert main(["calibrate", str(tmp_path / "m.onnx"), "--data", str(data / "train"), "--samples", "128",
                 "--val-data", str(data / "annotations" / "instances_val.json")]) == 0
    ap = json.loads((tmp_path / "m.int8.report.json").read_text())["ap"]
    assert ap["fp32"] > 50  # a model that detects
    for flavour in ("trt", "cpu"):
        assert abs(ap[f"int8 {flavour}"] - ap["fp32"]) <= 1.0, ap


def test_trt_cache_has_a_scale_for_every_float_tensor_and_an_explicit_version(calibrated, tmp_path):
    """trtexec --int8 --calib: TensorRT needs a scale for every tensor an INT8 layer touches
    (ReLU and Add outputs too) and ignores a cache whose header names another version."""
    from onnxruntime.quantization.calibrate import load_tensors_data
    ranges = load_tensors_data(calibrated / "m.calib.json").data
    scales = scales_from_ranges(ranges)
    header, parsed = read_cache(calibrated / "m.calib.cache")
    assert header == "TRT-8601-EntropyCalibration2"
    assert parsed == {k: float(np.float32(v)) for k, v in scales.items()}
    low, high = ranges["images"].range_value
    assert parsed["images"] == pytest.approx(max(abs(low), abs(high)) / 127, rel=1e-6)
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(calibrated / "m.onnx")))
    floats = {v.name for v in graph.graph.value_info if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    for op in ("Relu", "Add", "Conv", "MatMul", "Softmax"):
        outputs = {o for n in graph.graph.node if n.op_type == op for o in n.output} & floats
        assert outputs and outputs <= set(parsed) | _constant(ranges, outputs), op
    write_cache(tmp_path / "c", {"x": 0.5}, "10.3.0")
    assert read_cache(tmp_path / "c") == ("TRT-100300-EntropyCalibration2", {"x": 0.5})
    assert version_tag("8.5.2") == "8502" and version_tag("8.5.10") == "8510" and version_tag("10.3.0.26") == "100300"
    for bad in ("8.5", "latest"):  # a version without its patch would name no real TensorRT's cache
        with pytest.raises(UserError, match="not a full version like 8.5.2"):
            version_tag(bad)
    with pytest.raises(UserError, match="TensorRT 11 removed"):
        version_tag("11.0.0")


def _constant(ranges, names) -> set:
    """Tensors whose range is 0..0 (no scale can be written for them)."""
    return {n for n in names if n in ranges and not np.any(np.abs(ranges[n].range_value))}


def test_no_trt_cache_without_a_version(work, tmp_path, capsys):
    model = tmp_path / "m.v8.5.onnx"  # a dotted name keeps its files apart (not m.v8.calib.json)
    model.write_bytes((work / "m.onnx").read_bytes())
    (tmp_path / "m.v8.5.calib.cache").write_text("TRT-8601-EntropyCalibration2\nstale: 3c000000\n")
    assert main(["calibrate", str(model), "--data", str(work / "data" / "train"), "--samples", "2",
                 "--flavour", "cpu"]) == 0
    assert not (tmp_path / "m.v8.5.calib.cache").exists()  # not a cache of other ranges beside the new files
    assert json.loads((tmp_path / "m.v8.5.int8.report.json").read_text())["trt_cache"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.v8.5.calib-cpu.json", "m.v8.5.int8-cpu.onnx", "m.v8.5.int8.report.json",
                                                          "m.v8.5.int8.report.md", "m.v8.5.onnx"]
    capsys.readouterr()
    assert main(["calibrate", str(model), "--data", str(work / "data" / "train"), "--trt-version", "8.5"]) == 2
    assert "not a full version like 8.5.2" in capsys.readouterr().err


def test_the_legacy_calibrators_feed_keeps_errors_and_counts_batches(work):
    from detr_edge.calibration.trt_calibrator import CalibrationFeed
    feed = CalibrationFeed(Samples(work / "data" / "train", SPEC, samples=5, batch=2, progress=False))
    assert [b["images"].shape[0] for b in feed] == [2, 2, 2] and feed.batches == 3  # re-iterable
    assert [b["mask"].dtype for b in feed] == [np.dtype(bool)] * 3
    feed.check(had_cache=False)

    class Broken:
        batch = 1

        def batches(self):
            yield {"images": np.zeros((1, 3, 8, 8), np.float32), "mask": np.zeros((1, 8, 8), bool)}
            raise OSError("disk went away")
    feed = CalibrationFeed(Broken())
    assert len(list(feed)) == 1  # the iteration ends where TensorRT would swallow the error
    with pytest.raises(UserError, match="calibration data failed: OSError: disk went away"):
        feed.check(had_cache=False)
    empty = CalibrationFeed(Samples(work / "data" / "train", SPEC, samples=5, progress=False))
    with pytest.raises(UserError, match="received no batch"):
        empty.check(had_cache=False)  # never iterated: TensorRT asked for nothing
    empty.check(had_cache=True)  # it read the cache instead: fine


def test_sensitivity_search_keeps_costly_groups_float_until_within_target(work, tmp_path):
    """Run where torch cannot be imported: calibration, its AP and the search are onnxruntime
    and pycocotools work (a Jetson or a CPU box without the train extra)."""
    model = tmp_path / "m.onnx"
    model.write_bytes((work / "m.onnx").read_bytes())
    args = ["calibrate", str(model), "--data", str(work / "data" / "train"), "--samples", "8", "--flavour", "cpu",
            "--val-data", str(work / "data" / "val"), "--auto", "--max-ap-drop", "1.0"]
    proc = subprocess.run([sys.executable, "-c", NO_TORCH + f"from detr_edge.cli import main\nsys.exit(main({args!r}))"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
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
