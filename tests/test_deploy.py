"""`detr-edge deploy`: every precision checked and reported, each artifact loaded once,
resumable, INT8 recovered by the search, and a Triton repository whose configs parse and
match the files."""
import json
from collections import Counter
from pathlib import Path

import cv2
import onnx
import pytest
from onnx import numpy_helper

from detr_edge.cli import main
from detr_edge.train.checkpoint import save_checkpoint
from detr_edge.train.config import checkpoint_config
from detr_edge.train.synth import synthesize

from conftest import sharp_model, small_config

SMALL = small_config()


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    synthesize(root / "data", train=16, val=16, size=(128, 128), video_frames=0, seed=2, max_objects=3)
    checkpoint = root / "small.pth"
    save_checkpoint(checkpoint, sharp_model(SMALL), checkpoint_config(SMALL, (128, 128),
                                                                      ["N/A", "square", "circle", "triangle", "star"]))
    args = ["deploy", str(checkpoint), "--calib-data", str(root / "data" / "train"), "--calib-samples", "8",
            "--val-data", str(root / "data" / "annotations" / "instances_val.json"), "--out", str(root / "out"),
            "--triton"]
    import detr_edge.check
    loads = Counter()
    load_reference = detr_edge.check.load_reference

    def counted(path, *more):
        loads[Path(path).name] += 1
        return load_reference(path, *more)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(detr_edge.check, "load_reference", counted)
        code = main(args)
    return root, args, code, loads


def test_report_has_every_precision_with_ap_latency_and_a_verdict(deployed):
    root, _, code, _ = deployed
    report = json.loads((root / "out" / "report.json").read_text())
    rows = {r["artifact"]: r for r in report["artifacts"]}
    assert set(rows) == {"fp32", "fp16", "int8", "int8-cpu"}
    for row in rows.values():
        assert row["AP"] is not None and row["latency_p50_ms"] > 0 and isinstance(row["passed"], bool)
    assert rows["fp32"]["passed"] and rows["fp16"]["passed"]
    assert code == (0 if report["passed"] else 1)
    assert not report["engines"]  # no TensorRT here: it says so and stops at the ONNX files
    md = (root / "out" / "report.md").read_text()
    assert "No TensorRT engines" in md and md.count("| pass |") >= 2
    page = (root / "out" / "report.html").read_text()
    assert page.count("<tr>") == 5 and page.count("samples/") == 3
    for sample in report["samples"]:  # PyTorch and the four files side by side
        image = cv2.imread(str(root / "out" / sample))
        assert image.shape[1] == 5 * 128


def test_each_artifact_is_loaded_once(deployed):
    """Checked, benchmarked, drawn and reported from one load each (a file the INT8 search
    remakes is loaded again, once)."""
    root, _, _, loads = deployed
    report = json.loads((root / "out" / "report.json").read_text())
    remade = {"model.int8.onnx", "model.int8-cpu.onnx"} if "int8-search" in report["steps"]["ran"] else set()
    assert set(loads) == {"small.pth", "model.onnx", "model.fp16.onnx", "model.int8.onnx", "model.int8-cpu.onnx"}
    assert {name: count for name, count in loads.items() if count != 1} == dict.fromkeys(remade, 2)


def test_rerun_with_nothing_changed_does_no_work(deployed, monkeypatch):
    root, args, code, _ = deployed
    assert main(args) == code
    report = json.loads((root / "out" / "report.json").read_text())
    assert report["steps"]["ran"] == []
    monkeypatch.chdir(root)  # the same files named by relative paths: still nothing to do
    assert main([a.replace(f"{root}/", "") for a in args]) == code
    assert json.loads((root / "out" / "report.json").read_text())["steps"]["ran"] == []


def test_triton_repository_parses_and_names_the_real_tensors(deployed):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    root, _, _, _ = deployed
    repository = root / "out" / "triton"
    models = sorted(p for p in repository.iterdir() if p.is_dir() and p.name != "detr")
    assert [m.name for m in models] == ["detr_fp16", "detr_fp32", "detr_int8", "detr_int8_cpu"]
    # the end-to-end detector serves the fastest artifact that passed its gate
    summary = json.loads((root / "out" / "report.json").read_text())
    passed = [r for r in summary["artifacts"] if r["passed"]]
    fastest = min(passed, key=lambda r: r["latency_p50_ms"])
    assert summary["triton_served"] == fastest["file"]  # (paths as the last run named them)
    detector = text_format.Parse((repository / "detr" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert detector.backend == "python" and detector.max_batch_size == 8 and detector.HasField("dynamic_batching")
    assert [i.name for i in detector.input] == ["encoded", "frame"] and all(i.optional for i in detector.input)
    assert [o.name for o in detector.output] == ["num_detections", "scores", "labels", "boxes"]
    assert list(detector.output[3].dims) == [SMALL.num_queries, 4]
    assert json.loads(detector.parameters["classes"].string_value) == ["N/A", "square", "circle", "triangle", "star"]
    assert (repository / "detr" / "1" / "model.onnx").read_bytes() == \
        (root / "out" / Path(fastest["file"]).name).read_bytes()
    assert (repository / "detr" / "labels.txt").read_text().split("\n")[1] == "square"
    for folder in models:
        config = text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        graph = onnx.load(str(folder / "1" / "model.onnx")).graph
        assert config.name == folder.name and config.platform == "onnxruntime_onnx"
        assert config.max_batch_size > 0 and config.HasField("dynamic_batching")  # a dynamic-batch export
        for declared, actual in [*zip(config.input, graph.input), *zip(config.output, graph.output)]:
            dims = [d.dim_value for d in actual.type.tensor_type.shape.dim][1:]
            assert declared.name == actual.name and list(declared.dims) == dims
        assert [i.name for i in config.input] == ["images", "mask"]
        assert model_config_pb2.DataType.Name(config.input[1].data_type) == "TYPE_BOOL"


def test_the_search_recovers_int8_when_a_layer_breaks_under_quantization(deployed, tmp_path, monkeypatch):
    """A sensitive layer, made so: every INT8 file that quantizes the class head gets that
    head's weight scale x0.01 (its scores collapse). deploy's INT8 fails its gate, the
    sensitivity search keeps the class head float, and the gate passes: exit 0, and the
    report says the search recovered it. (Its own output folder: the fixture stays as it is.)"""
    import detr_edge.calibrate
    import detr_edge.calibration.search
    from detr_edge.calibration import quantize as module

    root, args, _, _ = deployed
    quantize = module.quantize

    def breaking(src, dst, flavour, options, cache, reader=None):
        meta = quantize(src, dst, flavour, options, cache, reader)
        graph = onnx.load(str(dst))
        inits = {i.name: i for i in graph.graph.initializer}
        producers = {o: n for n in graph.graph.node for o in n.output}
        head = next(n for n in graph.graph.node if "class_embed" in n.name and n.op_type in ("MatMul", "Gemm"))
        for dq in (producers.get(i) for i in head.input):
            if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in inits:  # its weight
                values = numpy_helper.to_array(inits[dq.input[1]])  # FP16 in the TensorRT flavour's FP16 graph
                inits[dq.input[1]].CopyFrom(numpy_helper.from_array((values * 0.01).astype(values.dtype), dq.input[1]))
        onnx.save(graph, str(dst))
        return meta
    for place in (detr_edge.calibrate, detr_edge.calibration.search):
        monkeypatch.setattr(place, "quantize", breaking)
    out = tmp_path / "out"
    assert main([str(out) if a == str(root / "out") else a for a in args]) == 0
    report = json.loads((out / "report.json").read_text())
    assert "int8-search" in report["steps"]["ran"] and "recovered" in report["int8"]
    assert all(r["passed"] for r in report["artifacts"] if r["precision"] == "int8")
    calibration = json.loads((out / "model.int8.report.json").read_text())
    for flavour in ("trt", "cpu"):
        search = calibration["search"][flavour]
        assert search["steps"][0]["AP_drop"] > 1.0 and search["within_target"]  # broken first, recovered after
        assert "class_embed" in search["kept_float_groups"]
    assert report["int8"] in (out / "report.md").read_text()


def test_a_step_reruns_when_the_environment_changes(tmp_path):
    """An upgrade of onnxruntime, TensorRT, torch or detr-edge, or another GPU, changes what a
    step makes: its fingerprint holds them."""
    from detr_edge.deploy import Steps, environment
    env = environment()
    assert set(env) == {"detr_edge", "torch", "onnxruntime", "tensorrt", "gpu"} and env["onnxruntime"]
    source, made = tmp_path / "in.txt", tmp_path / "out.txt"
    source.write_text("x")
    calls = []

    def body():
        calls.append(1)
        made.write_text("y")
    for step_env in (env, env, {**env, "onnxruntime": "9.9.9"}, {**env, "gpu": "another GPU"}):
        Steps(tmp_path / "state.json", step_env).run("step", [source], {"o": 1}, [made], body)
    assert len(calls) == 3  # first run, the onnxruntime upgrade, the other GPU; not the unchanged rerun
