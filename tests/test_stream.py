"""The streaming runtime: real video through the pipeline, parity with the PyTorch path,
live sources that drop instead of queueing, bad inputs, memory over a long run."""
import json
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest

from detr_edge.cli import main
from detr_edge.runtime.pipeline import stream
from detr_edge.runtime.sources import SyntheticSource
from detr_edge.train.checkpoint import save_checkpoint
from detr_edge.train.config import DETRConfig, checkpoint_config

from conftest import NO_TORCH, ROOT, SHARED_DATA, sharp_model

VIDEO = SHARED_DATA / "video" / "one-by-one-person-detection.mp4"
TINY = DETRConfig(backbone="resnet18", hidden_dim=32, nheads=2, enc_layers=1, dec_layers=1, dim_feedforward=64,
                  num_queries=8, num_classes=91, dropout=0.0)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    checkpoint = root / "tiny.pth"
    save_checkpoint(checkpoint, sharp_model(TINY), checkpoint_config(TINY, (128, 160), None))
    assert main(["export", str(checkpoint), "--out", str(root / "tiny.onnx")]) == 0
    return checkpoint, root / "tiny.onnx"


def test_real_video_every_frame_once_in_order(model, tmp_path):
    if not VIDEO.exists():
        pytest.skip(f"real video not present at {VIDEO}")
    _, onnx_path = model
    save, jsonl = tmp_path / "out.mp4", tmp_path / "out.jsonl"
    assert main(["run", str(onnx_path), str(VIDEO), "--save", str(save), "--jsonl", str(jsonl), "--conf", "0.3"]) == 0
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["frame"] for r in records] == list(range(1394))
    assert sum(len(r["detections"]) for r in records) > 0
    written, source = cv2.VideoCapture(str(save)), cv2.VideoCapture(str(VIDEO))
    assert int(written.get(cv2.CAP_PROP_FRAME_COUNT)) == 1394
    assert (written.get(cv2.CAP_PROP_FRAME_WIDTH), written.get(cv2.CAP_PROP_FRAME_HEIGHT)) == \
        (source.get(cv2.CAP_PROP_FRAME_WIDTH), source.get(cv2.CAP_PROP_FRAME_HEIGHT))
    frames = 0
    while written.read()[0]:
        frames += 1
    assert frames == 1394
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left


def test_run_equals_the_pytorch_path(model, tmp_path, coco_photos):
    checkpoint, onnx_path = model
    folder = tmp_path / "photos"
    folder.mkdir()
    for photo in coco_photos[:4]:
        (folder / photo.name).write_bytes(photo.read_bytes())
    assert main(["run", str(onnx_path), str(folder), "--jsonl", str(tmp_path / "run.jsonl"), "--conf", "0.3"]) == 0
    assert main(["predict", str(checkpoint), *map(str, sorted(folder.iterdir())), "--out", str(tmp_path / "pred"),
                 "--conf", "0.3"]) == 0
    ours = [json.loads(line)["detections"] for line in (tmp_path / "run.jsonl").read_text().splitlines()]
    theirs = [image["detections"] for image in json.loads((tmp_path / "pred" / "predictions.json").read_text())["images"]]
    assert len(ours) == 4 and sum(map(len, theirs)) >= 4
    for a, b in zip(ours, theirs):
        assert [d["label"] for d in a] == [d["label"] for d in b]
        np.testing.assert_allclose([d["score"] for d in a], [d["score"] for d in b], atol=1e-4)
        np.testing.assert_allclose([d["box"] for d in a], [d["box"] for d in b], atol=0.05)


class SlowBackend:
    """The real backend, slowed by `delay` seconds a frame: a model slower than the camera."""

    def __init__(self, backend, delay: float = 0.02):
        self.backend, self.delay = backend, delay

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def infer(self, images, mask):
        time.sleep(self.delay)
        return self.backend.infer(images, mask)


def test_live_source_drops_stale_frames_and_keeps_latency_bounded(model):
    from detr_edge.runtime.backends import load_backend
    backend = SlowBackend(load_backend(model[1]))
    frame = np.full((240, 320, 3), 127, np.uint8)
    source = SyntheticSource([frame], count=400, fps=500)  # a frame every 2 ms, inference every ~22 ms
    results = stream(backend, source, conf=0.0)
    indices = [r.index for r in results]
    stats = results.stats
    # frames are dropped instead of queued (a growing queue would drop none): latency stays
    # bounded by construction, which this asserts without timing anything
    assert stats.dropped > 200 and stats.frames + stats.dropped == 400
    assert indices == sorted(indices) and len(indices) == stats.frames


def _video_frames(path) -> int:
    """Frames a player decodes (not the container's count)."""
    capture, frames = cv2.VideoCapture(str(path)), 0
    while capture.read()[0]:
        frames += 1
    return frames


def test_a_slow_model_loses_no_frame_of_a_file(model, tmp_path):
    """41 frames of an animated GIF through a model slower than the 0.1 s the capture thread
    once waited before the end marker pushed the oldest frame out."""
    from PIL import Image, ImageDraw

    from detr_edge.runtime.backends import load_backend
    from detr_edge.runtime.run import run
    frames = []
    for i in range(41):
        image = Image.new("RGB", (320, 240), (40, 90, 160))
        ImageDraw.Draw(image).rectangle([6 * i, 60, 6 * i + 60, 140], fill=(230, 200, 30))
        frames.append(image)
    gif = tmp_path / "moving.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=40, loop=0)
    save, jsonl = tmp_path / "out.mp4", tmp_path / "out.jsonl"
    with load_backend(model[1]) as backend:
        stats = run(SlowBackend(backend, 0.15), str(gif), conf=0.3, save=str(save), jsonl=str(jsonl), quiet=True)
    assert [json.loads(line)["frame"] for line in jsonl.read_text().splitlines()] == list(range(41))
    assert _video_frames(save) == 41 and stats.frames == 41 and stats.dropped == 0


def test_a_folder_of_mixed_sizes_gives_every_photo_a_frame(model, tmp_path, coco_photos):
    """128 real photos of many sizes (odd ones too) -> 128 frames, letterboxed into the first's size."""
    folder = tmp_path / "photos"
    folder.mkdir()
    sizes = set()
    for i in range(128):
        image = cv2.imread(str(coco_photos[i % len(coco_photos)]))
        scale = (1.0, 0.6, 0.35)[i * 3 // 128]
        image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        sizes.add(image.shape[:2])
        cv2.imwrite(str(folder / f"{i:03d}.jpg"), image)
    save, jsonl = tmp_path / "out.mp4", tmp_path / "out.jsonl"
    assert main(["run", str(model[1]), str(folder), "--save", str(save), "--jsonl", str(jsonl)]) == 0
    assert len(sizes) > 20 and len(jsonl.read_text().splitlines()) == 128
    height, width = cv2.imread(str(folder / "000.jpg")).shape[:2]
    written = cv2.VideoCapture(str(save))
    assert (written.get(cv2.CAP_PROP_FRAME_HEIGHT), written.get(cv2.CAP_PROP_FRAME_WIDTH)) == \
        (height - height % 2, width - width % 2)  # 4:2:0 video has even sides
    assert _video_frames(save) == 128


@pytest.mark.parametrize("stop, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_cleanly_with_outputs_of_one_length(model, tmp_path, stop, code):
    """Ctrl-C, and SIGTERM as docker stop, systemd and timeout send it: the video playable,
    the JSONL exactly as long, no temporary file left, exit 128 + the signal."""
    if not VIDEO.exists():
        pytest.skip(f"real video not present at {VIDEO}")
    save, jsonl = tmp_path / "out.mp4", tmp_path / "out.jsonl"
    # a shell starts background jobs with SIGINT ignored, and children inherit that (Python then
    # installs no KeyboardInterrupt handler): give the child the terminal's default, as a user has
    proc = subprocess.Popen([sys.executable, "-m", "detr_edge", "run", str(model[1]), str(VIDEO), "--save", str(save),
                             "--jsonl", str(jsonl)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in proc.stdout:  # stop once frames flow
        if line.startswith("frame 100"):
            proc.send_signal(stop)
            break
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code and "Traceback" not in err, err
    assert f"(stopped by {stop.name})" in out
    lines = jsonl.read_text().splitlines()
    assert 100 <= len(lines) < 1394 and _video_frames(save) == len(lines)
    assert not list(tmp_path.glob(".*"))


RUN_WITHOUT_TORCH = NO_TORCH + """
from detr_edge.cli import main
sys.exit(main(["run", sys.argv[1], sys.argv[2], "--max-frames", "3", "--jsonl", sys.argv[3]]))
"""


def test_run_needs_no_torch(model, tmp_path, coco_photos):
    proc = subprocess.run([sys.executable, "-c", RUN_WITHOUT_TORCH, str(model[1]), str(coco_photos[0].parent),
                           str(tmp_path / "r.jsonl")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 3
