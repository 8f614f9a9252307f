"""export/: ONNX (FP32, FP16, in-graph postprocessing) against PyTorch on real photos,
the onnxruntime backend, and the `export`/`check` commands."""
import json
import re
import subprocess
import sys

import cv2
import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from detr_edge.cli import main
from detr_edge.export.onnx_export import ExportOptions, export_onnx
from detr_edge.runtime.backends import load_backend
from detr_edge.runtime.metadata import preprocess_spec
from detr_edge.runtime.postprocess import postprocess
from detr_edge.runtime.preprocess import preprocess
from detr_edge.train.checkpoint import load_model, save_checkpoint
from detr_edge.train.config import DETRConfig, checkpoint_config

from conftest import NO_TORCH, ROOT, sharp_model

IMGSZ = (320, 416)
SMALL = DETRConfig(backbone="resnet18", hidden_dim=64, nheads=4, enc_layers=2, dec_layers=2, dim_feedforward=128,
                   num_queries=12, num_classes=91, dropout=0.0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "small.pth"
    save_checkpoint(path, sharp_model(SMALL), checkpoint_config(SMALL, IMGSZ, None))
    return path


@pytest.fixture(scope="module")
def dynamic_onnx(checkpoint):
    out = checkpoint.with_name("dynamic.onnx")
    assert main(["export", str(checkpoint), "--out", str(out), "--dynamic-batch", "--precision", "fp32,fp16"]) == 0
    return out


def reference(model, batch):
    with torch.no_grad():
        out = model(torch.from_numpy(batch.images), torch.from_numpy(batch.mask))
    return out["pred_logits"].numpy(), out["pred_boxes"].numpy()


def test_fp32_matches_pytorch_on_real_photos_batch_1_and_4(checkpoint, dynamic_onnx, coco_photos, photos_by_aspect):
    model, _ = load_model(checkpoint)
    model.eval()
    backend = load_backend(dynamic_onnx)
    assert backend.batch is None and backend.imgsz == IMGSZ and backend.precision == "fp32"
    spec = preprocess_spec(IMGSZ)
    # batch 4 of different aspect ratios, so every image has its own padding
    frames = [cv2.imread(str(p)) for p in [*photos_by_aspect, coco_photos[5]]]
    batch4 = preprocess(frames, spec)
    assert len({int(m.sum()) for m in batch4.mask}) >= 3
    batch1 = preprocess(frames[:1], spec)
    detections = 0
    for batch in (batch1, batch4):
        logits, boxes = backend.infer(batch.images, batch.mask).values()
        ref_logits, ref_boxes = reference(model, batch)
        assert logits.shape == ref_logits.shape and boxes.shape == ref_boxes.shape
        assert np.abs(logits - ref_logits).max() <= 1e-4
        assert np.abs(boxes - ref_boxes).max() <= 1e-4
        ours = postprocess(logits, boxes, batch.sizes, conf=0.5)
        theirs = postprocess(ref_logits, ref_boxes, batch.sizes, conf=0.5)
        for a, b in zip(ours, theirs):
            np.testing.assert_array_equal(a["labels"], b["labels"])
            np.testing.assert_allclose(a["boxes"], b["boxes"], atol=1e-2)
            detections += len(b["labels"])
    assert detections >= 10  # the agreement is about real detections, not empty sets


def test_fixed_batch_model_runs_any_number_of_images(checkpoint, tmp_path, coco_photos):
    out = tmp_path / "b2.onnx"
    model, config = load_model(checkpoint)
    meta = export_onnx(model.eval(), config, out, ExportOptions(batch=2))
    assert meta["export"]["batch"] == 2
    graph = onnx.load(str(out))
    assert [d.dim_value for d in graph.graph.input[0].type.tensor_type.shape.dim] == [2, 3, *IMGSZ]
    backend = load_backend(out)
    batch = preprocess([cv2.imread(str(p)) for p in coco_photos[:3]], preprocess_spec(IMGSZ))
    logits, boxes = backend.infer(batch.images, batch.mask).values()  # chunks 2 + 1 (padded)
    ref_logits, ref_boxes = reference(model, batch)
    assert logits.shape[0] == 3
    assert np.abs(logits - ref_logits).max() <= 1e-4 and np.abs(boxes - ref_boxes).max() <= 1e-4


def test_metadata_travels_in_the_file(dynamic_onnx):
    backend = load_backend(dynamic_onnx)
    assert backend.classes[1] == "person" and len(backend.classes) == 91
    assert backend.spec == preprocess_spec(IMGSZ)
    assert backend.meta["model"] == SMALL.to_dict()
    assert backend.meta["export"]["opset"] == 17 and backend.meta["export"]["outputs"] == "raw"


def test_graph_keeps_to_tensorrt_parser_rules(dynamic_onnx):
    graph = onnx.load(str(dynamic_onnx))
    onnx.checker.check_model(graph, full_check=True)
    ops = {n.op_type for n in graph.graph.node}
    assert not ops & {"Einsum", "NonZero", "Pad", "Loop", "If", "Scan"}  # no data-dependent shapes
    assert {"Conv", "MatMul", "LayerNormalization", "Softmax"} <= ops
    dims = [[d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in graph.graph.output]
    assert dims == [["batch", 12, 92], ["batch", 12, 4]]


RUN_WITHOUT_TORCH = NO_TORCH + """
import numpy as np
from detr_edge.runtime.backends import load_backend
from detr_edge.runtime.preprocess import preprocess
backend = load_backend(sys.argv[1])
frame = np.random.default_rng(0).integers(0, 255, (240, 400, 3), np.uint8)
print(len(backend.detect(preprocess([frame, frame], backend.spec), conf=0.0)[1]['scores']))
"""


def test_onnxruntime_backend_runs_without_torch(dynamic_onnx):
    proc = subprocess.run([sys.executable, "-c", RUN_WITHOUT_TORCH, str(dynamic_onnx)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "12"  # every query of the second frame


def _value_types(graph):
    inferred = onnx.shape_inference.infer_shapes(graph)
    types = {v.name: v.type.tensor_type.elem_type for v in
             [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    types.update({i.name: i.data_type for i in inferred.graph.initializer})
    return types


def _node_types(graph, select):
    """{node name: set of element types of its float-carrying inputs and outputs}"""
    types = _value_types(graph)
    return {n.name: {types.get(v) for v in [*n.input, *n.output] if types.get(v) in (1, 10)}
            for n in graph.graph.node if select(n)}


@pytest.mark.parametrize("target", ["ort", "trt8.5"])
def test_fp16_keeps_layernorm_softmax_position_embedding_and_io_fp32(checkpoint, tmp_path, target):
    out = tmp_path / "m.onnx"
    assert main(["export", str(checkpoint), "--out", str(out), "--target", target, "--precision", "fp16"]) == 0
    assert not out.exists() and out.with_suffix(".fp16.onnx").exists()  # only FP16 was asked for
    graph = onnx.load(str(out.with_suffix(".fp16.onnx")))
    fp32, fp16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    ops = {n.op_type for n in graph.graph.node}
    if target == "trt8.5":  # opset 16: LayerNorm decomposed (TensorRT 8.5 cannot parse LayerNormalization)
        assert "LayerNormalization" not in ops
        norms = _node_types(graph, lambda n: "/norm" in n.name and n.op_type != "Cast")
        assert len(norms) >= 7 * 2 * 2 + 7  # 7 nodes per LayerNorm, 2+2 layers x 2-3 norms
    else:
        norms = _node_types(graph, lambda n: n.op_type == "LayerNormalization")
        assert len(norms) == 2 * 2 + 2 * 3 + 1
    softmax = _node_types(graph, lambda n: n.op_type == "Softmax")
    position = _node_types(graph, lambda n: n.op_type in ("CumSum", "Sin", "Cos", "Div") and "/backbone.1/" in n.name)
    # 2 encoder + 2x2 decoder attentions, less the first decoder self-attention, which folds
    # to a constant at a fixed batch (its inputs are zeros and the learned queries)
    assert len(softmax) == 2 + 2 * 2 - 1 and len(position) >= 6
    for name, kinds in {**norms, **softmax, **position}.items():
        assert kinds == {fp32}, (name, kinds)
    matmuls = _node_types(graph, lambda n: n.op_type in ("MatMul", "Conv", "Gemm"))
    assert sum(kinds == {fp16} for kinds in matmuls.values()) >= 0.9 * len(matmuls)  # the rest is FP16
    for value in [*graph.graph.input, *graph.graph.output]:
        assert value.type.tensor_type.elem_type in (fp32, onnx.TensorProto.BOOL)


def test_postprocess_graph_equals_runtime_postprocessing(checkpoint, tmp_path, photos_by_aspect):
    out = tmp_path / "post.onnx"
    assert main(["export", str(checkpoint), "--out", str(out), "--postprocess", "--max-det", "5"]) == 0
    graph = onnx.load(str(out))
    assert [o.name for o in graph.graph.output] == ["scores", "labels", "boxes_xyxy"]
    topk = [n for n in graph.graph.node if n.op_type == "TopK"]
    initializers = {i.name: numpy_helper.to_array(i) for i in graph.graph.initializer}
    assert len(topk) == 1 and initializers[topk[0].input[1]].tolist() == [5]  # constant K (TensorRT's rule)
    model, _ = load_model(checkpoint)
    post = load_backend(out)
    assert not post.raw
    batch = preprocess([cv2.imread(str(p)) for p in photos_by_aspect], preprocess_spec(IMGSZ))
    got = post.detect(batch, conf=0.3)  # a batch-1 model: three runs
    expected = postprocess(*reference(model, batch), batch.sizes, conf=0.3, topk=5)
    assert sum(len(e["scores"]) for e in expected) >= 5
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(g["labels"], e["labels"])
        np.testing.assert_allclose(g["scores"], e["scores"], atol=1e-5)
        np.testing.assert_allclose(g["boxes"], e["boxes"], atol=0.05)


def test_check_passes_the_export_and_fails_a_perturbed_weight(checkpoint, dynamic_onnx, tmp_path, coco_photos):
    broken = tmp_path / "broken.onnx"
    graph = onnx.load(str(dynamic_onnx))
    # one weight of the class head: the Gemm/MatMul that produces the logits
    head = next(n for n in graph.graph.node if "class_embed" in n.name)
    weights = {i.name: i for i in graph.graph.initializer}
    name = next(i for i in head.input if i in weights and numpy_helper.to_array(weights[i]).ndim == 2)
    array = numpy_helper.to_array(weights[name]).copy()
    array.flat[int(np.abs(array).argmax())] *= 3.0
    weights[name].CopyFrom(numpy_helper.from_array(array, name))
    onnx.save(graph, str(broken))
    data = coco_photos[0].parent.parent  # coco-tiny: annotated, so the AP level runs too
    out = tmp_path / "report"
    args = ["check", str(checkpoint), "--data", str(data), "--limit", "8", "--out", str(out), "--against"]
    assert main([*args, str(dynamic_onnx), str(dynamic_onnx.with_suffix(".fp16.onnx"))]) == 0
    report = json.loads((out / "report.json").read_text())
    fp32, fp16 = report["models"]
    assert fp32["gate"]["passed"] and fp16["gate"]["passed"]
    assert fp32["detections"]["reference"] >= 10 and fp32["detections"]["agreement"] == 1.0
    assert fp32["tensors"]["logits"]["max_abs"] <= 1e-4 and abs(fp32["coco"]["AP_delta"]) < 1e-6
    assert fp16["precision"] == "fp16" and fp16["detections"]["agreement"] >= 0.97
    assert (out / "report.md").read_text().count("| pass |") == 2 and (out / "deltas.png").stat().st_size > 1000
    assert main([*args, str(broken)]) == 1
    report = json.loads((out / "report.json").read_text())
    assert not report["passed"] and report["models"][0]["gate"]["failures"][0].startswith("logits max abs error")


def test_fp16_has_a_tensor_criterion_that_catches_what_detections_miss(checkpoint, dynamic_onnx, tmp_path,
                                                                         coco_photos):
    """A box-head bias nudged in the FP16 file: every box a little wider (mean IoU 0.92), too
    little for detection agreement or AP to notice on 8 photos; the FP16 tensor limit fails it
    alone."""
    fp16 = dynamic_onnx.with_suffix(".fp16.onnx")
    graph = onnx.load(str(fp16))
    bias = next(i for i in graph.graph.initializer if i.name == "model.bbox_embed.layers.2.bias")
    array = numpy_helper.to_array(bias).copy()
    array[2] += 0.15  # the width, before the sigmoid
    bias.CopyFrom(numpy_helper.from_array(array, bias.name))
    nudged = tmp_path / "nudged.fp16.onnx"
    onnx.save(graph, str(nudged))
    out = tmp_path / "report"
    assert main(["check", str(checkpoint), "--data", str(coco_photos[0].parent.parent), "--limit", "8",
                 "--out", str(out), "--against", str(nudged)]) == 1
    gate = json.loads((out / "report.json").read_text())["models"][0]["gate"]
    assert len(gate["failures"]) == 1 and gate["failures"][0].startswith("boxes mean abs error"), gate


@pytest.mark.parametrize("args, message", [
    (["missing.pth"], "missing.pth"),
    (["{ckpt}", "--target", "trt8.5", "--opset", "17"], "opset 17 is not supported for target trt8.5"),
    (["{ckpt}", "--imgsz", "300x416"], "multiple of 32"),
    (["{ckpt}", "--precision", "int4"], "--precision"),
])
def test_export_refuses_bad_input_in_one_line(checkpoint, tmp_path, args, message):
    out = tmp_path / "x.onnx"
    command = [sys.executable, "-m", "detr_edge", "export", *[a.format(ckpt=checkpoint) for a in args], "--out", str(out)]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and message in proc.stderr and "Traceback" not in proc.stderr
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_an_fp16_graph_that_fails_the_checker_is_one_line_and_not_written(checkpoint, tmp_path, monkeypatch,
                                                                          capsys):
    """onnxruntime 1.30-1.31's float16 converter names one Cast per consumer alike, which
    onnx.checker rejects: the user gets one line naming the version, and no file (not even
    the FP32 file the FP16 one is made from)."""
    check = onnx.checker.check_model

    def reject_fp16(model, *args, **kwargs):  # the FP32 export's own check passes
        if any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer):
            raise onnx.checker.ValidationError("Graph must be in single static assignment (SSA) form\nmore")
        return check(model, *args, **kwargs)
    monkeypatch.setattr(onnx.checker, "check_model", reject_fp16)
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "m.onnx"), "--precision", "fp16"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "Traceback" not in error
    assert re.search(r"from onnxruntime \S+'s float16 converter fails onnx.checker \(Graph must be in single static "
                     r"assignment .*use 1.32 or newer", error)
    assert not list(tmp_path.iterdir())
