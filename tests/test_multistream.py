"""Many sources, one model: every frame of each file source once and in order, tagged with
its source; batched detections equal one-by-one ones; fair scheduling; a bad source named
while the others run; a real RTSP server stopped and started again mid-stream."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import cv2
import numpy as np
import pytest

from detr_edge.cli import main
from detr_edge.runtime.backends import load_backend
from detr_edge.runtime.errors import UserError
from detr_edge.runtime.pipeline import Stream, stream
from detr_edge.runtime.preprocess import preprocess
from detr_edge.runtime.sources import SyntheticSource
from detr_edge.train.checkpoint import save_checkpoint
from detr_edge.train.config import checkpoint_config
from detr_edge.train.synth import write_video

from conftest import ROOT, SHARED_DATA, sharp_model
from test_stream import TINY, SlowBackend, _video_frames

VIDEO = SHARED_DATA / "video" / "one-by-one-person-detection.mp4"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A small sharp model exported twice: dynamic batch, and a fixed batch of 4."""
    root = tmp_path_factory.mktemp("multi")
    checkpoint = root / "tiny.pth"
    save_checkpoint(checkpoint, sharp_model(TINY), checkpoint_config(TINY, (128, 160), None))
    assert main(["export", str(checkpoint), "--out", str(root / "dynamic.onnx"), "--dynamic-batch"]) == 0
    assert main(["export", str(checkpoint), "--out", str(root / "batch4.onnx"), "--batch", "4"]) == 0
    return {"checkpoint": checkpoint, "dynamic": root / "dynamic.onnx", "batch4": root / "batch4.onnx"}


@pytest.fixture(scope="module")
def synthetic_video(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("synth") / "shapes.mp4", 90, (240, 320), np.random.default_rng(3))


def _photo_folder(path, coco_photos, count=4):
    path.mkdir()
    for photo in coco_photos[:count]:
        (path / photo.name).write_bytes(photo.read_bytes())
    return path


def _same(a: dict, b: dict) -> None:
    assert a["labels"].tolist() == b["labels"].tolist()
    np.testing.assert_allclose(a["scores"], b["scores"], atol=1e-4)
    np.testing.assert_allclose(a["boxes"], b["boxes"], atol=0.05)


def test_three_sources_every_frame_once_in_order_with_its_source(models, synthetic_video, tmp_path, coco_photos):
    if not VIDEO.exists():
        pytest.skip(f"real video not present at {VIDEO}")
    folder = _photo_folder(tmp_path / "photos", coco_photos)
    sources = [str(VIDEO), str(synthetic_video), str(folder)]
    out, jsonl = tmp_path / "videos", tmp_path / "all.jsonl"
    assert main(["run", str(models["dynamic"]), *sources, "--save", str(out), "--jsonl", str(jsonl),
                 "--conf", "0.3"]) == 0
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    lengths = {str(VIDEO): 1394, str(synthetic_video): 90, str(folder): 4}
    for k, source in enumerate(sources):
        mine = [r for r in records if r["source"] == source]
        assert [r["frame"] for r in mine] == list(range(lengths[source]))
        assert {r["stream"] for r in mine} == {k}
    assert len(records) == sum(lengths.values()) and not any("gap_s" in r for r in records)  # files never reconnect
    videos = sorted(out.iterdir())
    assert [v.name for v in videos] == ["0-one-by-one-person-detection.mp4", "1-shapes.mp4", "2-photos.mp4"]
    assert [_video_frames(v) for v in videos] == list(lengths.values())
    # the photos' detections equal PyTorch's, through `predict`
    assert main(["predict", str(models["checkpoint"]), *map(str, sorted(folder.iterdir())),
                 "--out", str(tmp_path / "pred"), "--conf", "0.3"]) == 0
    theirs = [image["detections"] for image in
              json.loads((tmp_path / "pred" / "predictions.json").read_text())["images"]]
    ours = [r["detections"] for r in records if r["source"] == str(folder)]
    assert sum(map(len, theirs)) >= 4
    for a, b in zip(ours, theirs):
        assert [d["label"] for d in a] == [d["label"] for d in b]
        np.testing.assert_allclose([d["score"] for d in a], [d["score"] for d in b], atol=1e-4)
        np.testing.assert_allclose([d["box"] for d in a], [d["box"] for d in b], atol=0.05)


@pytest.mark.parametrize("stop, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_a_signal_closes_every_source_s_video_as_long_as_its_json_lines(models, synthetic_video, tmp_path, stop, code):
    if not VIDEO.exists():
        pytest.skip(f"real video not present at {VIDEO}")
    out, jsonl = tmp_path / "videos", tmp_path / "o.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "detr_edge", "run", str(models["dynamic"]), str(VIDEO), str(VIDEO),
                             "--save", str(out), "--jsonl", str(jsonl)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in proc.stdout:  # stop once frames flow
        if " frame 100:" in line:
            proc.send_signal(stop)
            break
    out_text, err = proc.communicate(timeout=60)
    assert proc.returncode == code and "Traceback" not in err, err
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    for k, video in enumerate(sorted(out.iterdir())):
        frames = [r["frame"] for r in records if r["stream"] == k]
        assert 100 <= len(frames) < 1394 and frames == list(range(len(frames)))
        assert _video_frames(video) == len(frames)
    assert not list(tmp_path.glob(".*")) and not list(out.glob(".*"))


@pytest.mark.parametrize("kind, count", [("dynamic", 4), ("batch4", 4), ("batch4", 3)],
                         ids=["dynamic-4-streams", "fixed-4-4-streams", "fixed-4-3-streams-padded"])
def test_a_batch_gives_each_frame_its_own_detections(models, coco_photos, kind, count):
    """The field failure: batch > 1 returning the first image's detections for all."""
    backend = load_backend(models[kind])
    photos = [cv2.imread(str(p)) for p in coco_photos[:8]]
    sources = [SyntheticSource(photos[k::4], count=6, live=False) for k in range(count)]
    with Stream(backend, sources, conf=0.3) as run:
        results = list(run)
    # four frames a call (a fixed batch of 4 is filled from 3 streams), a call or two more if a capture was late
    assert len(results) == 6 * count and run.stats.batches <= -(-6 * count // 4) + 2
    assert sum(len(r.detections["scores"]) for r in results) > 20
    for r in results:
        alone = backend.detect(preprocess([r.frame], backend.spec), 0.3)[0]
        _same(r.detections, alone)
    firsts = [r.detections["boxes"].tolist() for r in results if r.index == 0]
    assert len({json.dumps(f) for f in firsts}) == count  # different photos, different detections


def test_scheduling_is_fair_and_live_sources_take_their_newest_frame(models):
    backend = SlowBackend(load_backend(models["dynamic"]), 0.01)
    frame = np.full((120, 160, 3), 90, np.uint8)
    files = [SyntheticSource([frame], count=count, live=False) for count in (60, 30, 45)]
    camera = SyntheticSource([frame], count=2000, fps=1000)  # faster than any model: it drops
    results = list(stream(backend, [*files, camera], conf=0.0, batch=2))
    by_stream = {k: [r.index for r in results if r.stream == k] for k in range(4)}
    assert by_stream[0] == list(range(60)) and by_stream[1] == list(range(30)) and by_stream[2] == list(range(45))
    # round robin: in the first 40 results (20 calls of 2), the file sources within 2 of each other
    # (the camera takes its turn when it has a frame ready: most turns)
    first = [r.stream for r in results[:40]]
    shares = [first.count(k) for k in range(3)]
    assert max(shares) - min(shares) <= 2 and min(shares) >= 8, first
    live = by_stream[3]
    assert live == sorted(live) and len(live) < 2000


def test_memory_stays_flat_over_four_streams_of_thousands_of_frames(models):
    """4 streams x 3,000 frames batched: RSS grows by less than 50 MB after warm-up."""
    backend = load_backend(models["dynamic"])
    frames = [np.random.default_rng(i).integers(0, 255, (120, 160, 3), np.uint8) for i in range(4)]
    page = os.sysconf("SC_PAGE_SIZE")

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    sources = [SyntheticSource(frames[k:] + frames[:k], count=3000, live=False) for k in range(4)]
    marks = {}
    for count, result in enumerate(stream(backend, sources, conf=0.3), 1):
        if count in (2000, 12000):
            marks[count] = rss()
    assert marks[12000] - marks[2000] < 50e6, marks


def test_a_bad_source_is_named_in_one_line_while_the_others_run(models, synthetic_video, tmp_path, capsys):
    (tmp_path / "notes.mp4").write_text("not a video\n" * 100)
    jsonl = tmp_path / "o.jsonl"
    args = ["run", str(models["dynamic"]), str(synthetic_video), str(tmp_path / "missing.mp4"),
            str(tmp_path / "notes.mp4"), "7", "--jsonl", str(jsonl)]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "3 of 4 sources failed" in err
    for name in ("missing.mp4: no such file or folder", "notes.mp4: cannot open it as a video", "camera 7 not found"):
        assert name in err
    assert "Traceback" not in err
    frames = [json.loads(line)["frame"] for line in jsonl.read_text().splitlines()]
    assert frames == list(range(90))
    # --strict: refused at start, nothing written
    jsonl.unlink()
    assert main([*args, "--strict"]) == 2
    err = capsys.readouterr().err
    assert "--strict: every source must open" in err and not jsonl.exists()


class FailingSource(SyntheticSource):
    """A source that breaks after `after` frames, as a camera unplugged mid-run."""

    def __init__(self, frames, after: int):
        super().__init__(frames, count=10 * after, live=False)
        self.after, self.name = after, "flaky-camera"

    def read(self):
        if self.index == self.after:
            raise UserError("lost the device (unplugged)")
        return super().read()


def test_a_source_that_fails_while_running_leaves_the_others_running(models, synthetic_video, caplog):
    frame = np.full((120, 160, 3), 90, np.uint8)
    with Stream(load_backend(models["dynamic"]), [str(synthetic_video), FailingSource([frame], 5)]) as run:
        results = list(run)
    assert [r.index for r in results if r.stream == 0] == list(range(90))
    assert [r.index for r in results if r.stream == 1] == list(range(5))
    assert run.stats.sources[1].error == "flaky-camera: lost the device (unplugged)"
    assert [s.name for s in run.stats.failed] == ["flaky-camera"]
    assert "flaky-camera: lost the device (unplugged); the other sources go on" in caplog.text


def test_sources_from_a_file_and_the_python_api(models, synthetic_video, tmp_path):
    listing = tmp_path / "cameras.txt"
    listing.write_text(f"# two views of one file\n{synthetic_video}\n\n{synthetic_video}\n")
    jsonl = tmp_path / "o.jsonl"
    assert main(["run", str(models["batch4"]), "--sources", str(listing), "--jsonl", str(jsonl),
                 "--max-frames", "10"]) == 0
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert sorted((r["stream"], r["frame"]) for r in records) == [(k, i) for k in range(2) for i in range(10)]
    # sources after options, as users write them
    assert main(["run", str(models["dynamic"]), str(synthetic_video), "--max-frames", "4", "--jsonl",
                 str(tmp_path / "mixed.jsonl"), str(synthetic_video)]) == 0
    records = [json.loads(line) for line in (tmp_path / "mixed.jsonl").read_text().splitlines()]
    assert sorted((r["stream"], r["frame"]) for r in records) == [(k, i) for k in range(2) for i in range(4)]
    results = list(stream(models["dynamic"], [str(synthetic_video)] * 2, max_frames=5))
    assert sorted((r.stream, r.index) for r in results) == [(k, i) for k in range(2) for i in range(5)]


def test_a_live_rtsp_source_that_drops_comes_back(models, tmp_path):
    """A real RTSP server (GStreamer's, from Debian) stopped mid-stream and started again 2 s
    later: one reconnect, the gap on the first frame after it, in its JSON line too."""
    from rtsp import RtspServer

    from detr_edge.runtime.sinks import JsonlSink
    backend = load_backend(models["dynamic"])
    records = JsonlSink(tmp_path / "o.jsonl", backend.classes)
    deadline = time.monotonic() + 120  # a run that never sees the server come back fails, not hangs
    with RtspServer() as server:
        run = Stream(backend, server.url, conf=0.3, timeout=3, reconnect=30)
        before, after, gaps = 0, 0, []
        with run:
            for result in run:
                records.write(result)
                if result.gap_s:
                    gaps.append(result.gap_s)
                if gaps:
                    after += 1
                if after == 20 or time.monotonic() > deadline:
                    break
                if not gaps:
                    before += 1
                    if before == 20:  # stop it mid-stream, start it again 2 s later
                        server.stop()
                        threading.Timer(2.0, server.start).start()
    records.close()
    assert before >= 20 and after == 20, (before, after, run.stats.sources[0])
    assert len(gaps) == 1 and 1.5 <= gaps[0] < 30, gaps
    assert run.stats.sources[0].reconnects == 1 and not run.stats.sources[0].error
    lines = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [round(r["gap_s"], 3) for r in lines if "gap_s" in r] == [round(gaps[0], 3)]
    assert {r["source"] for r in lines} == {server.url}


def test_track_gives_each_source_its_own_ids(models, synthetic_video, tmp_path):
    """--track through the pipeline: the ids a Tracker gives each source's detections on its
    own, in the JSON lines and drawn on each source's video (tracking quality: test_tracking)."""
    from detr_edge.runtime.track import Tracker
    out, jsonl = tmp_path / "videos", tmp_path / "o.jsonl"
    assert main(["run", str(models["dynamic"]), str(synthetic_video), str(synthetic_video), "--track",
                 "--conf", "0.3", "--save", str(out), "--jsonl", str(jsonl)]) == 0
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    plain = list(stream(models["dynamic"], str(synthetic_video), conf=0.3))
    tracker = Tracker(15)
    expected = [tracker.update(r.detections)["ids"].tolist() for r in plain]
    assert sum(map(len, expected)) > 50
    for k in range(2):  # both sources: the same ids, each from its own tracker
        mine = sorted((r for r in records if r["stream"] == k), key=lambda r: r["frame"])
        assert [[d["id"] for d in r["detections"]] for r in mine] == expected
    assert [_video_frames(v) for v in sorted(out.iterdir())] == [90, 90]
