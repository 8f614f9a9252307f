"""runtime/: light (no torch), and its pre/postprocessing against independent references."""
import ast
import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from detr_edge.runtime.classes import COCO_CLASSES
from detr_edge.runtime.metadata import IMAGENET_MEAN, IMAGENET_STD, parse_imgsz, preprocess_spec
from detr_edge.runtime.postprocess import postprocess
from detr_edge.runtime.preprocess import preprocess
from detr_edge.train.detr import postprocess as torch_postprocess

from conftest import COCO_TINY, NO_TORCH, ROOT

BLOCK_TORCH = NO_TORCH + """
import importlib, pkgutil
import detr_edge.runtime
names = [m.name for m in pkgutil.walk_packages(detr_edge.runtime.__path__, 'detr_edge.runtime.')]
for name in names:
    importlib.import_module(name)
print(len(names))
"""


def test_runtime_imports_without_torch():
    proc = subprocess.run([sys.executable, "-c", BLOCK_TORCH], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) >= 6  # every module was imported, not none


def reference_letterbox(frame, imgsz):
    """torchvision's resize + normalize on the same geometry (an implementation not ours)."""
    h, w = frame.shape[:2]
    scale = min(imgsz[0] / h, imgsz[1] / w)
    nh, nw = round(h * scale), round(w * scale)
    rgb = torch.from_numpy(np.ascontiguousarray(frame[..., ::-1])).permute(2, 0, 1)
    resized = TF.resize(rgb, [nh, nw], antialias=False).float() / 255
    out = torch.zeros(3, *imgsz)
    out[:, :nh, :nw] = TF.normalize(resized, list(IMAGENET_MEAN), list(IMAGENET_STD))
    return out.numpy(), (nh, nw)


def test_preprocess_matches_torchvision_on_real_photos(photos_by_aspect):
    imgsz = (480, 640)
    frames = [cv2.imread(str(p)) for p in photos_by_aspect]
    batch = preprocess(frames, preprocess_spec(imgsz))
    assert batch.images.shape == (3, 3, 480, 640) and batch.images.dtype == np.float32
    for i, frame in enumerate(frames):
        expected, (nh, nw) = reference_letterbox(frame, imgsz)
        valid = ~batch.mask[i]
        assert valid.sum() == nh * nw and valid[:nh, :nw].all()  # mask = exactly the padded area
        assert (batch.images[i][:, batch.mask[i]] == 0).all()  # padding is zero after normalisation
        diff = np.abs(batch.images[i] - expected)
        one_level = 1 / 255 / min(IMAGENET_STD)  # one uint8 step after normalisation
        assert diff.max() <= 2.5 * one_level  # OpenCV's bilinear rounds to uint8, torchvision's here not
        assert diff.mean() < 0.25 * one_level
        assert tuple(batch.sizes[i]) == frame.shape[:2]
        assert np.isclose(batch.scales[i], min(480 / frame.shape[0], 640 / frame.shape[1]))


def test_preprocess_accepts_grey_and_bgra():
    grey = np.full((50, 80), 128, np.uint8)
    batch = preprocess([grey, cv2.cvtColor(grey, cv2.COLOR_GRAY2BGRA)], preprocess_spec((64, 64)))
    np.testing.assert_array_equal(batch.images[0], batch.images[1])


def random_outputs(seed, batch=3, queries=20, classes=6):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (batch, queries, classes + 1)).astype(np.float32)
    boxes = rng.uniform(0, 1, (batch, queries, 4)).astype(np.float32)  # some extend past the frame
    sizes = np.array([[480, 640], [640, 427], [333, 500]])[:batch]
    return logits, boxes, sizes


@pytest.mark.parametrize("conf,topk", [(0.0, None), (0.3, None), (0.0, 5), (0.5, 3)])
def test_numpy_postprocess_equals_torch_twin(conf, topk):
    logits, boxes, sizes = random_outputs(0)
    ours = postprocess(logits, boxes, sizes, conf, topk)
    theirs = torch_postprocess(torch.from_numpy(logits), torch.from_numpy(boxes), torch.from_numpy(sizes), conf, topk)
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(a["labels"], b["labels"].numpy())
        np.testing.assert_allclose(a["scores"], b["scores"].numpy(), atol=1e-6)
        np.testing.assert_allclose(a["boxes"], b["boxes"].numpy(), atol=1e-4)
        assert (np.diff(a["scores"]) <= 0).all() and (a["scores"] >= conf).all()


def test_postprocess_hand_computed():
    # one query: logits [ln 1, ln 3, ln 6] -> softmax [0.1, 0.3, 0.6]; "no object" (last) dropped -> label 1, 0.3
    logits = np.log(np.array([[[1.0, 3.0, 6.0]]], np.float32))
    boxes = np.array([[[0.5, 0.5, 0.5, 0.25]]], np.float32)
    (det,) = postprocess(logits, boxes, np.array([[200, 400]]))
    assert det["labels"].tolist() == [1] and np.isclose(det["scores"][0], 0.3)
    np.testing.assert_allclose(det["boxes"][0], [100, 75, 300, 125])  # x * 400, y * 200
    # a box past the frame is clipped to it
    (det,) = postprocess(logits, np.array([[[0.9, 0.1, 0.4, 0.4]]], np.float32), np.array([[200, 400]]))
    np.testing.assert_allclose(det["boxes"][0], [280, 0, 400, 60])


def test_coco_class_names_match_the_real_annotation_file():
    path = COCO_TINY / "instances_val2017.json"
    if not path.exists():
        pytest.skip(f"real data not present at {path}")
    categories = json.loads(path.read_text())["categories"]
    assert len(COCO_CLASSES) == 91
    for cat in categories:
        assert COCO_CLASSES[cat["id"]] == cat["name"]


def test_parse_imgsz():
    from detr_edge.runtime.errors import UserError
    assert parse_imgsz("640") == (640, 640) and parse_imgsz("480x640") == (480, 640)
    for bad in ("650", "axb", "0x64", "1x2x3"):
        with pytest.raises(UserError):
            parse_imgsz(bad)


def test_the_runtime_is_python_38_code():
    """JetPack 5 ships Python 3.8 (its TensorRT bindings are built for it). vermin checks the
    runtime's syntax and standard-library use against 3.8; it does not evaluate annotations,
    so every annotated module must make them lazy (on 3.8, `list[str]` in a signature fails
    at import). vermin cannot see a 3.9 method called on a name (`name.removeprefix(...)`)."""
    for path in sorted((ROOT / "runtime").rglob("*.py")):
        tree = ast.parse(path.read_text())
        annotated = any(isinstance(node, ast.AnnAssign) or (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                        and (node.returns or any(a.annotation for a in node.args.args + node.args.kwonlyargs)))
                        for node in ast.walk(tree))
        lazy = any(isinstance(node, ast.ImportFrom) and node.module == "__future__"
                   and any(alias.name == "annotations" for alias in node.names) for node in tree.body)
        assert lazy or not annotated, f"{path}: annotations without `from __future__ import annotations`"
    proc = subprocess.run([sys.executable, "-c", "import sys, vermin; sys.exit(vermin.main())", "-t=3.8-",
                           "--no-tips", "--violations", str(ROOT / "runtime")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:]
