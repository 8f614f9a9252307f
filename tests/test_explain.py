"""`detr-edge explain` and `detr-edge queries`: the paper's attention and query figures."""
import json

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_iou

from detr_edge.cli import main
from detr_edge.export.onnx_export import ExportOptions, export_onnx
from detr_edge.runtime.metadata import preprocess_spec
from detr_edge.runtime.preprocess import preprocess
from detr_edge.train.checkpoint import load_model, save_checkpoint
from detr_edge.train.config import checkpoint_config
from detr_edge.train.explain import AttentionRecorder, explain
from detr_edge.train.predict import predict_frames
from detr_edge.train.synth import scene, synthesize

from conftest import DEMO_CHECKPOINT, needs_demo_model, sharp_model, small_config

SMALL = small_config()
SPEC = preprocess_spec((128, 128))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain")
    synthesize(root / "data", train=0, val=12, size=(96, 128), video_frames=2, seed=3)
    model = sharp_model(SMALL)
    with torch.no_grad():  # scores around 0.6, so a 0.63 threshold keeps about half
        model.class_embed.weight.mul_(0.1)
    save_checkpoint(root / "m.pth", model, checkpoint_config(SMALL, (128, 128), None))
    return root


def test_attention_rows_sum_to_one_over_valid_cells_and_zero_on_padding():
    """A 128x64 frame in a 128x128 input: the right half of the feature map is padding."""
    model = sharp_model(SMALL)
    frame = np.random.default_rng(0).integers(0, 255, (128, 64, 3), dtype=np.uint8)
    batch = preprocess([frame], SPEC)
    with AttentionRecorder(model) as rec, torch.no_grad():
        model(torch.from_numpy(batch.images), torch.from_numpy(batch.mask))
    assert rec.grid == (4, 4)
    padded = F.interpolate(torch.from_numpy(batch.mask)[None].float(), size=rec.grid)[0, 0].bool().flatten()
    assert padded.sum() == 8  # the official mask downsampling: two of four columns
    for weights, rows in ((rec.decoder, SMALL.num_queries), (rec.encoder, 16)):
        assert weights.shape == (1, SMALL.nheads, rows, 16)
        assert torch.all(weights[..., padded] == 0)
        torch.testing.assert_close(weights[..., ~padded].sum(-1), torch.ones(1, SMALL.nheads, rows))
        assert torch.all(weights[..., ~padded] > 0)


def test_recording_leaves_no_trace(tmp_path):
    """Outputs are the same with the recorder, its hooks are gone after it, and the export
    of a model that was explained is byte-identical to one that never was."""
    model = sharp_model(SMALL)
    config = checkpoint_config(SMALL, (128, 128), None)
    export_onnx(model, config, tmp_path / "before.onnx", ExportOptions())
    frame = np.random.default_rng(1).integers(0, 255, (100, 128, 3), dtype=np.uint8)
    plain = predict_frames(model, [frame], SPEC, conf=0.0)[0]
    ex = explain(model, frame, SPEC, queries="all")
    assert ex.decoder.shape == (SMALL.num_queries, SMALL.nheads, 4, 4)
    order = np.argsort(-ex.detections["scores"], kind="stable")
    np.testing.assert_array_equal(ex.detections["scores"][order], plain["scores"])
    np.testing.assert_array_equal(ex.detections["boxes"][order], plain["boxes"])
    hooked = [m for m in model.modules() if m._forward_hooks or m._forward_pre_hooks]
    assert hooked == []
    export_onnx(model, config, tmp_path / "after.onnx", ExportOptions())
    assert (tmp_path / "before.onnx").read_bytes() == (tmp_path / "after.onnx").read_bytes()


def test_explain_command_writes_views_and_index(work, tmp_path):
    image = work / "data" / "val" / "000000.jpg"
    out = tmp_path / "ex"
    assert main(["explain", str(work / "m.pth"), str(image), "--queries", "2,5", "--points", "10,20", "60,90",
                 "--heads", "--out", str(out)]) == 0
    views = json.loads((out / "explain.json").read_text())
    assert [v["query"] for v in views["decoder"]] == [2, 5]
    assert [v["point"] for v in views["encoder"]] == [[10, 20], [60, 90]]
    files = [v["file"] for v in views["decoder"] + views["encoder"]]
    index = (out / "index.html").read_text()
    for name in files:
        picture = cv2.imread(str(out / name))
        # the 128x96 frame drawn 3x larger: image, mean and 4 heads in two rows of up to 4
        assert picture.shape[0] > 2 * 288 and picture.shape[1] > 4 * 384, picture.shape
        assert f"src='{name}'" in index


@pytest.mark.parametrize("args, message", [
    (["--queries", "12"], "query indices run from 0 to 11"),
    (["--queries", "first"], "say top, all, or query indices"),
    (["--points", "500,10"], "outside the 128x96 image"),
    (["--points", "5"], "give x,y pixel pairs"),
])
def test_explain_refuses_bad_arguments_in_one_line(work, tmp_path, capsys, args, message):
    image = work / "data" / "val" / "000000.jpg"
    assert main(["explain", str(work / "m.pth"), str(image), *args, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "x").exists()


def test_queries_plot_has_a_panel_per_slot_and_counts_add_up(work, tmp_path):
    out = tmp_path / "q"
    assert main(["queries", str(work / "m.pth"), "--data", str(work / "data"), "--conf", "0.63",
                 "--out", str(out)]) == 0
    stats = json.loads((out / "queries.json").read_text())
    assert stats["images"] == 12 and stats["panels"] == SMALL.num_queries == len(stats["slots"])
    frames = [cv2.imread(str(p)) for p in sorted((work / "data" / "val").glob("*.jpg"))]
    model, _ = load_model(work / "m.pth")
    expected = sum(len(d["scores"]) for d in predict_frames(model, frames, SPEC, conf=0.63))
    assert 30 < expected < 12 * SMALL.num_queries - 30  # the threshold matters on this model
    assert stats["predictions"] == sum(s["count"] for s in stats["slots"]) == expected
    for slot in stats["slots"]:
        assert slot["small"] + slot["large_horizontal"] + slot["large_vertical"] == slot["count"]
    assert cv2.imread(str(out / "queries.png")) is not None


@needs_demo_model
def test_detecting_query_attends_to_its_object_on_the_demo_model():
    """On one-object scenes the demo model detects (IoU >= 0.5), the hottest cell of the
    detecting query's cross-attention (32 x 32 px at 128 px) overlaps the object's box far
    more often than a random cell does."""
    model, config = load_model(DEMO_CHECKPOINT)
    spec = config["preprocess"]
    rng = np.random.default_rng(5)
    hits = chance = detected = 0
    for _ in range(60):
        frame, ((_, (x, y, w, h)),) = scene(rng, *spec["imgsz"], max_objects=1)
        ex = explain(model, frame, spec, queries="top", conf=0.0)
        truth = torch.tensor([[x, y, x + w, y + h]])
        if box_iou(torch.from_numpy(ex.detections["boxes"][:1]), truth).item() < 0.5:
            continue
        detected += 1
        cells = ex.decoder[0].mean(0)
        stride = spec["imgsz"][0] / cells.shape[0]
        centres = [ex.peak(np.eye(cells.size)[i].reshape(cells.shape)) for i in range(cells.size)]
        overlaps = [abs(cx - (x + w / 2)) < stride / 2 + w / 2 and abs(cy - (y + h / 2)) < stride / 2 + h / 2
                    for cx, cy in centres]
        hits += overlaps[int(np.argmax(cells))]
        chance += np.mean(overlaps)
    assert detected >= 10, detected
    assert hits / detected >= 0.8 and hits / detected >= chance / detected + 0.3, (hits, chance, detected)
