"""`detr-edge deploy`: every precision checked and reported, resumable, INT8 recovery or a
named failure, and a Triton repository whose configs parse and match the files."""
import json
import time

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
    code = main(args)
    return root, args, code


def test_report_has_every_precision_with_ap_latency_and_a_verdict(deployed):
    root, _, code = deployed
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


def test_rerun_with_nothing_changed_does_no_work(deployed, monkeypatch):
    root, args, code = deployed
    start = time.monotonic()
    assert main(args) == code
    elapsed = time.monotonic() - start
    report = json.loads((root / "out" / "report.json").read_text())
    assert report["steps"]["ran"] == [] and elapsed < 20
    monkeypatch.chdir(root)  # the same files named by relative paths: still nothing to do
    assert main([a.replace(f"{root}/", "") for a in args]) == code
    assert json.loads((root / "out" / "report.json").read_text())["steps"]["ran"] == []


def test_triton_repository_parses_and_names_the_real_tensors(deployed):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    root, _, _ = deployed
    repository = root / "out" / "triton"
    models = sorted(p for p in repository.iterdir() if p.is_dir())
    assert [m.name for m in models] == ["detr_fp16", "detr_fp32", "detr_int8", "detr_int8_cpu"]
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


def test_a_broken_int8_file_is_rebuilt_by_the_search_or_named(deployed):
    """Break the INT8 file (the class head's weight scale x0.01: its scores collapse), rerun:
    deploy notices the changed file, fails its gate, runs the sensitivity search, and either
    recovers or exits 1 naming INT8; the report says which. (Runs last: it changes the files.)"""
    root, args, _ = deployed
    path = root / "out" / "model.int8.onnx"
    graph = onnx.load(str(path))
    inits = {i.name: i for i in graph.graph.initializer}
    producers = {o: n for n in graph.graph.node for o in n.output}
    head = next(n for n in graph.graph.node if "class_embed" in n.name and n.op_type in ("MatMul", "Gemm"))
    dq = next(producers[i] for i in head.input if i in producers and producers[i].op_type == "DequantizeLinear"
              and producers[i].input[0] in inits)
    scale = inits[dq.input[1]]
    values = numpy_helper.to_array(scale)  # FP16 in the TensorRT flavour's FP16 graph
    scale.CopyFrom(numpy_helper.from_array((values * 0.01).astype(values.dtype), scale.name))
    onnx.save(graph, str(path))
    code = main(args)
    report = json.loads((root / "out" / "report.json").read_text())
    assert "int8-search" in report["steps"]["ran"] and report["int8"]
    int8 = [r for r in report["artifacts"] if r["precision"] == "int8"]
    if "recovered" in report["int8"]:
        assert code == 0 and all(r["passed"] for r in int8)
    else:
        assert code == 1 and "did not bring it within the gate" in report["int8"]
    assert report["int8"] in (root / "out" / "report.md").read_text()
