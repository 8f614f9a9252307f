"""TensorRT engines from the demo model (or, without one, a small model on the synthetic
shapes), built by their plans, run, and checked against PyTorch with the checker's gates
and against the ONNX file each was built from; figures go to gpu-report.md."""
import json
from pathlib import Path

import numpy as np
import pytest

from detr_edge.check import check, coco_ap
from detr_edge.runtime.coco import Images
from detr_edge.cli import main
from detr_edge.export.trt_plan import parse_version, target_for
from detr_edge.runtime.backends import load_backend
from detr_edge.runtime.errors import UserError
from detr_edge.runtime.bench import model_alone
from detr_edge.train.checkpoint import save_checkpoint
from detr_edge.train.config import DETRConfig, checkpoint_config
from detr_edge.train.synth import synthesize

from conftest import ROOT, sharp_model

pytestmark = pytest.mark.tensorrt

DEMO = ROOT / "demo-out" / "train" / "best.pth"
SMALL = DETRConfig(backbone="resnet18", hidden_dim=64, nheads=4, enc_layers=2, dec_layers=2, dim_feedforward=128,
                   num_queries=12, num_classes=5, dropout=0.0)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import tensorrt
    root = tmp_path_factory.mktemp("gpu")
    data = ROOT / "demo-out" / "data"
    if not (data / "annotations" / "instances_val.json").exists():
        data = root / "data"
        synthesize(data, train=64, val=64, size=(128, 128), video_frames=0, seed=3, max_objects=3)
    checkpoint = DEMO
    if not checkpoint.exists():
        checkpoint = root / "small.pth"
        save_checkpoint(checkpoint, sharp_model(SMALL), checkpoint_config(SMALL, (128, 128), ["N/A", "square", "circle", "triangle", "star"]))
    onnx = root / "model.onnx"
    target = target_for(parse_version(tensorrt.__version__))  # the opset this TensorRT parses
    assert main(["export", str(checkpoint), "--out", str(onnx), "--dynamic-batch", "--precision", "fp32,fp16",
                 "--target", target]) == 0
    assert main(["calibrate", str(onnx), "--data", str(data / "train"), "--samples", "64", "--flavour", "trt"]) == 0
    engines = {}
    for suffix in (".onnx", ".fp16.onnx", ".int8.onnx"):
        source = onnx.with_suffix(suffix)
        assert main(["build", str(source), "--batch", "1,4,8", "--timing-cache", str(root / "timing.cache")]) == 0
        engines[source] = source.with_suffix(".engine")
    if parse_version(tensorrt.__version__) < (11, 0, 0):  # TensorRT's own implicit calibration, 8.x/10.x only
        legacy = root / "legacy.engine"
        assert main(["build", str(onnx), "--out", str(legacy), "--legacy-int8-calibrator", "--calib-data",
                     str(data / "train"), "--calib-samples", "64"]) == 0
        engines[onnx] = engines[onnx], legacy
    return checkpoint, data, engines


def _engines(engines: dict) -> list:
    return [(source, engine) for source, built in engines.items() for engine in (built if isinstance(built, tuple) else (built,))]


def test_engines_pass_the_gates(files, gpu_report):
    checkpoint, data, engines = files
    report = check(checkpoint, [engine for _, engine in _engines(engines)], data, conf=0.5)
    images = Images.load(data / "annotations" / "instances_val.json")
    for (source, engine), model in zip(_engines(engines), report["models"]):
        with load_backend(engine) as trt, load_backend(source) as onnx:
            frame = np.random.default_rng(1).integers(0, 255, (*trt.imgsz, 3), np.uint8)
            batch = (np.random.default_rng(0).standard_normal((4, 3, *trt.imgsz), dtype=np.float32),
                     np.zeros((4, *trt.imgsz), bool))
            built, source_outputs = trt.infer(*batch), onnx.infer(*batch)
            diffs = [float(np.abs(built[name] - source_outputs[name]).max()) for name in ("logits", "boxes")]
            gpu_report.add(engine=engine.name, precision=model["precision"], AP=model.get("coco", {}).get("AP"),
                           AP_delta_vs_pytorch=model.get("coco", {}).get("AP_delta"), AP_onnx=coco_ap(onnx, images),
                           logits_max_abs_vs_onnx=diffs[0], boxes_max_abs_vs_onnx=diffs[1],
                           agreement=model["detections"]["agreement"], gate="pass" if model["gate"]["passed"] else
                           "; ".join(model["gate"]["failures"]),
                           p50_ms_batch1=float(np.median(model_alone(trt, frame, 50))))
    assert report["passed"], [m["gate"]["failures"] for m in report["models"]]
    fp32 = report["models"][0]
    assert fp32["tensors"]["logits"]["max_abs"] <= 1e-3 and fp32["tensors"]["boxes"]["max_abs"] <= 1e-3


def test_batches_within_and_beyond_the_profile(files):
    _, _, engines = files
    engine = next(e for s, e in _engines(engines) if s.suffix == ".onnx" and e.name == "model.engine")
    with load_backend(engine) as backend:
        assert backend.max_batch == 8
        rng = np.random.default_rng(0)
        images = rng.standard_normal((11, 3, *backend.imgsz), dtype=np.float32)
        mask = np.zeros((11, *backend.imgsz), bool)
        mask[1, 100:] = True
        eleven = backend.infer(images, mask)  # 8 + 3
        one = backend.infer(images[1:2], mask[1:2])
        np.testing.assert_allclose(eleven["logits"][1:2], one["logits"], atol=1e-3)
        assert eleven["logits"].shape[0] == 11


def test_mismatched_sidecar_is_refused(files, tmp_path):
    _, _, engines = files
    source = next(e for _, e in _engines(engines))
    engine = tmp_path / "m.engine"
    engine.write_bytes(source.read_bytes())
    sidecar = json.loads(Path(f"{source}.json").read_text())
    sidecar["engine"]["tensorrt_version"] = "8.5.0"
    Path(f"{engine}.json").write_text(json.dumps(sidecar))
    with pytest.raises(UserError, match="built with TensorRT 8.5.0"):
        load_backend(engine)
