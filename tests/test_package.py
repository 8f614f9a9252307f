"""The package as a user gets it: a wheel (what `pip install .`, `pip install git+...` and
packagers build), not the editable install the Makefile makes. One namespace, every
subpackage inside; and in a clean virtual environment with onnxruntime and no torch, the
runtime-only commands run on real data."""
import subprocess
import sys
import zipfile
from pathlib import Path

import cv2
import pytest

from detr_edge.cli import main
from detr_edge.export.onnx_export import ExportOptions, export_onnx
from detr_edge.train.config import DETRConfig, checkpoint_config

from conftest import COCO_TINY, ROOT, SHARED_DATA, sharp_model

VIDEO = SHARED_DATA / "video" / "one-by-one-person-detection.mp4"
TINY = DETRConfig(backbone="resnet18", hidden_dim=32, nheads=2, enc_layers=1, dec_layers=1, dim_feedforward=64,
                  num_queries=5, num_classes=3, dropout=0.0)


def _run(command, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in command], capture_output=True, text=True, **kwargs)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", out, ROOT], timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return next(out.glob("detr_edge-*.whl"))


def test_the_wheel_holds_one_namespace_with_every_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"detr_edge", wheel.name.split("-py3")[0] + ".dist-info"}
    tracked = _run(["git", "ls-files", "*__init__.py"], cwd=ROOT).stdout.split()  # every package of the source
    expected = {str(Path(p).parent) if p.startswith("detr_edge/") else f"detr_edge/{Path(p).parent}"
                for p in tracked if not p.startswith("tests/")}
    assert expected == {str(Path(n).parent) for n in names if n.endswith("/__init__.py")}
    assert {"detr_edge/runtime/backends/trt.py", "detr_edge/runtime/coco.py", "detr_edge/__main__.py"} <= set(names)
    entry_points = zipfile.ZipFile(wheel).read(f"{wheel.name.split('-py3')[0]}.dist-info/entry_points.txt").decode()
    assert "detr-edge = detr_edge.cli:main" in entry_points


@pytest.fixture(scope="module")
def clean_venv(wheel, tmp_path_factory) -> Path:
    """A virtual environment with only the wheel and onnxruntime (and what they need)."""
    venv = tmp_path_factory.mktemp("venv")
    assert _run([sys.executable, "-m", "venv", venv]).returncode == 0
    proc = _run([venv / "bin" / "python", "-m", "pip", "install", "--quiet", wheel, "onnxruntime"], timeout=900)
    if proc.returncode:
        pytest.skip(f"cannot install the wheel's dependencies here: {proc.stderr.strip()[-300:]}")
    return venv / "bin"


@pytest.fixture(scope="module")
def files(tmp_path_factory, coco_photos) -> Path:
    """A small model's FP32 file and its two INT8 files, made with the full install."""
    root = tmp_path_factory.mktemp("files")
    export_onnx(sharp_model(TINY), checkpoint_config(TINY, (96, 160), None), root / "model.onnx",
                ExportOptions(dynamic_batch=True))
    assert main(["calibrate", str(root / "model.onnx"), "--data", str(COCO_TINY / "val2017"), "--samples", "4"]) == 0
    return root


def test_runtime_only_install_runs_without_torch(clean_venv, files, coco_photos, tmp_path):
    if not VIDEO.exists():
        pytest.skip(f"no real video at {VIDEO}")
    probe = _run([clean_venv / "python", "-c", "import detr_edge.runtime.backends, detr_edge.check\n"
                  "for name in ('torch', 'runtime', 'train', 'export', 'calibration'):\n"
                  "    try:\n        __import__(name)\n        print('importable:', name)\n"
                  "    except ImportError:\n        pass"], cwd=tmp_path)
    assert probe.returncode == 0 and probe.stdout == "", probe.stdout + probe.stderr
    detr_edge = clean_venv / "detr-edge"

    jsonl = tmp_path / "out.jsonl"
    proc = _run([detr_edge, "run", files / "model.onnx", VIDEO, "--jsonl", jsonl], cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-1000:]
    frames = int(cv2.VideoCapture(str(VIDEO)).get(cv2.CAP_PROP_FRAME_COUNT))
    assert len(jsonl.read_text().splitlines()) == frames > 1000  # one line per frame of the real video

    proc = _run([detr_edge, "check", "--reference", files / "model.onnx", "--against", files / "model.int8.onnx",
                 files / "model.int8-cpu.onnx", "--data", COCO_TINY / "val2017", "--limit", "8", "--out",
                 tmp_path / "check"], cwd=tmp_path, timeout=600)
    assert proc.returncode in (0, 1), proc.stderr[-1000:]  # 1: the gate's verdict, not a failure to run
    assert "Checked against model.onnx (fp32)" in proc.stdout
    assert "| model.int8.onnx | int8 |" in proc.stdout and "| model.int8-cpu.onnx | int8 |" in proc.stdout
    assert (tmp_path / "check" / "report.json").exists() and not (tmp_path / "check" / "deltas.png").exists()

    for command in (["info", files / "model.onnx"], ["bench", files / "model.int8-cpu.onnx", "--iters", "3"]):
        proc = _run([detr_edge, *command], cwd=tmp_path, timeout=300)
        assert proc.returncode == 0, (command, proc.stderr[-1000:])
    proc = _run([detr_edge, "export", "x.pth"], cwd=tmp_path)
    assert proc.returncode == 2 and "needs torch: pip install 'detr-edge[train]'" in proc.stderr
