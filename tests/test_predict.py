"""The PyTorch reference path on real photos, and the `predict`/`info`/`init` commands."""
import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from detr_edge.cli import main
from detr_edge.runtime.metadata import METADATA_KEY, preprocess_spec
from detr_edge.train.checkpoint import load_model
from detr_edge.train.config import DETRConfig, checkpoint_config
from detr_edge.train.detr import DETR
from detr_edge.train.predict import predict_frames

from conftest import ROOT

SMALL = DETRConfig(backbone="resnet18", hidden_dim=64, nheads=4, enc_layers=2, dec_layers=2, dim_feedforward=128,
                   num_queries=12, num_classes=91, dropout=0.0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "small.pth"
    assert main(["init", "detr_r18", str(path), "--imgsz", "320x416"]) == 0
    return path


def test_real_photos_end_to_end_in_the_frame(photos_by_aspect):
    torch.manual_seed(0)
    model = DETR(SMALL).eval()
    frames = [cv2.imread(str(p)) for p in photos_by_aspect]
    results = predict_frames(model, frames, preprocess_spec((320, 416)), conf=0.0)
    for frame, det in zip(frames, results):
        h, w = frame.shape[:2]
        assert det["boxes"].shape == (12, 4) and det["scores"].shape == (12,) and det["labels"].shape == (12,)
        assert (det["boxes"] >= 0).all() and (det["boxes"][:, [0, 2]] <= w).all() and (det["boxes"][:, [1, 3]] <= h).all()
        assert (det["boxes"][:, 2:] >= det["boxes"][:, :2]).all()
        assert ((det["labels"] >= 0) & (det["labels"] < 91)).all()
    # batching with different padding gives each image what it gets alone (the mask at work)
    alone = predict_frames(model, frames[1:2], preprocess_spec((320, 416)), conf=0.0)[0]
    np.testing.assert_allclose(alone["boxes"], results[1]["boxes"], atol=1e-2)


def test_predict_command_writes_images_and_json(checkpoint, photos_by_aspect, tmp_path):
    out = tmp_path / "pred"
    assert main(["predict", str(checkpoint), *map(str, photos_by_aspect), "--out", str(out),
                 "--conf", "0", "--max-det", "5"]) == 0
    report = json.loads((out / "predictions.json").read_text())
    assert report["imgsz"] == [320, 416] and len(report["images"]) == 3
    model, config = load_model(checkpoint)
    for entry, photo in zip(report["images"], photos_by_aspect):
        frame = cv2.imread(str(photo))
        assert cv2.imread(str(out / f"{photo.stem}.jpg")).shape == frame.shape
        assert (entry["height"], entry["width"]) == frame.shape[:2]
        expected = predict_frames(model.eval(), [frame], config["preprocess"], 0.0, 5)[0]
        assert [d["label"] for d in entry["detections"]] == expected["labels"].tolist()
        assert all(d["name"] == config["classes"][d["label"]] for d in entry["detections"])
        np.testing.assert_allclose([d["box"] for d in entry["detections"]], expected["boxes"], atol=0.01)


def test_info_on_checkpoint(checkpoint, capsys):
    assert main(["info", str(checkpoint)]) == 0
    text = capsys.readouterr().out
    assert "resnet18" in text and "(preset detr_r18)" in text and "parameters: 17,010,208" in text
    assert "320 x 416" in text and "person" in text


def test_info_on_onnx_reads_metadata(tmp_path, capsys):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper
    graph = helper.make_graph([helper.make_node("Identity", ["images"], ["logits"]),
                               helper.make_node("Not", ["mask"], ["boxes"])], "g",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 64, 64]),
                               helper.make_tensor_value_info("mask", TensorProto.BOOL, ["batch", 64, 64])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3, 64, 64]),
                               helper.make_tensor_value_info("boxes", TensorProto.BOOL, ["batch", 64, 64])],
                              [helper.make_tensor("w", TensorProto.FLOAT, [2, 3], [0.0] * 6)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    meta = checkpoint_config(SMALL, (64, 64))
    helper.set_model_props(model, {METADATA_KEY: json.dumps(meta)})
    onnx.save(model, tmp_path / "m.onnx")
    assert main(["info", str(tmp_path / "m.onnx")]) == 0
    text = capsys.readouterr().out
    assert "opset 17" in text and "parameters: 6" in text and "'images': ['batch', 3, 64, 64]" in text
    helper.set_model_props(model, {})
    onnx.save(model, tmp_path / "bare.onnx")
    assert main(["info", str(tmp_path / "bare.onnx")]) == 2
    assert "without detr-edge metadata" in capsys.readouterr().err


def test_predict_bad_image_is_one_line(checkpoint, tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    proc = subprocess.run([sys.executable, "-m", "detr_edge", "predict", str(checkpoint), str(bad),
                           "--out", str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip() == f"detr-edge: error: {bad}: not a readable image"


def test_help_lists_stage_commands():
    proc = subprocess.run([sys.executable, "-m", "detr_edge", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0
    for command in ("init", "predict", "info"):
        assert f"    {command} " in proc.stdout
