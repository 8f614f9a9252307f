"""TensorRT engines from the demo model (or, without one, a small model on the synthetic
shapes), built, run and checked against PyTorch with the checker's gates."""
import statistics
import time
from pathlib import Path

import numpy as np
import pytest

from export.check import check
from export.cli import main
from runtime.backends import load_backend
from runtime.errors import UserError
from train.checkpoint import save_checkpoint
from train.config import DETRConfig, checkpoint_config
from train.synth import synthesize

from conftest import ROOT, sharp_model

pytestmark = pytest.mark.tensorrt

DEMO = ROOT / "demo-out" / "train" / "best.pth"
SMALL = DETRConfig(backbone="resnet18", hidden_dim=64, nheads=4, enc_layers=2, dec_layers=2, dim_feedforward=128,
                   num_queries=12, num_classes=5, dropout=0.0)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
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
    assert main(["export", str(checkpoint), "--out", str(onnx), "--dynamic-batch", "--precision", "fp32,fp16"]) == 0
    assert main(["calibrate", str(onnx), "--data", str(data / "train"), "--samples", "64", "--flavour", "trt"]) == 0
    engines = {}
    for suffix in (".onnx", ".fp16.onnx", ".int8.onnx"):
        source = onnx.with_suffix(suffix)
        assert main(["build", str(source), "--batch", "1,4,4", "--timing-cache", str(root / "timing.cache")]) == 0
        engines[suffix] = source.with_suffix(".engine")
    return checkpoint, data, engines


def test_engines_pass_the_gates(files):
    checkpoint, data, engines = files
    report = check(checkpoint, list(engines.values()), data, conf=0.5)
    for model in report["models"]:
        print(model["file"], model["precision"], model["detections"], model.get("coco"))
    assert report["passed"], [m["gate"]["failures"] for m in report["models"]]
    fp32 = report["models"][0]
    assert fp32["tensors"]["logits"]["max_abs"] <= 1e-3 and fp32["tensors"]["boxes"]["max_abs"] <= 1e-3


def test_dynamic_batch_1_and_4(files):
    _, _, engines = files
    backend = load_backend(engines[".onnx"])
    rng = np.random.default_rng(0)
    images = rng.standard_normal((4, 3, *backend.imgsz), dtype=np.float32)
    mask = np.zeros((4, *backend.imgsz), bool)
    mask[1, 100:] = True
    four = backend.infer(images, mask)
    one = backend.infer(images[1:2], mask[1:2])
    np.testing.assert_allclose(four[0][1:2], one[0], atol=1e-3)


def test_mismatched_sidecar_is_refused(files, tmp_path):
    import json
    _, _, engines = files
    engine = tmp_path / "m.engine"
    engine.write_bytes(engines[".onnx"].read_bytes())
    sidecar = json.loads(Path(f"{engines['.onnx']}.json").read_text())
    sidecar["engine"]["tensorrt_version"] = "8.5.0"
    Path(f"{engine}.json").write_text(json.dumps(sidecar))
    with pytest.raises(UserError, match="built with TensorRT 8.5.0"):
        load_backend(engine)


def test_time_each_engine(files):
    _, _, engines = files
    for suffix, path in engines.items():
        backend = load_backend(path)
        images = np.zeros((1, 3, *backend.imgsz), np.float32)
        mask = np.zeros((1, *backend.imgsz), bool)
        for _ in range(10):
            backend.infer(images, mask)
        times = []
        for _ in range(50):
            start = time.perf_counter()
            backend.infer(images, mask)
            times.append(time.perf_counter() - start)
        print(f"{path.name}: median {statistics.median(times) * 1000:.2f} ms (batch 1, copies included)")
