"""`detr-edge run` and `detr-edge bench`: the streaming runtime from the command line
(numpy, OpenCV and the backend only; never torch)."""
from __future__ import annotations

import contextlib
import signal
import statistics
import threading
import time

import numpy as np

from .backends import load_backend
from .errors import UserError
from .pipeline import Stream
from .postprocess import check_conf
from .preprocess import preprocess
from .sinks import JsonlSink, VideoSink, WindowSink, annotate


def class_filter(text: str | None, classes: list[str]) -> set[int] | None:
    """'person,car' or '1,3' -> label ids; None keeps every class."""
    if not text:
        return None
    wanted = set()
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part.isdigit() and int(part) < len(classes):
            wanted.add(int(part))
        elif part in classes:
            wanted.add(classes.index(part))
        else:
            raise UserError(f"--classes: {part!r} is neither a class name of this model nor a class id")
    return wanted


def run(model, source, backend: str = "auto", conf: float = 0.5, classes: str | None = None, show: bool = False,
        save: str | None = None, jsonl: str | None = None, max_frames: int | None = None, quiet: bool = False,
        timeout: float = 10.0):
    """`model`: a file, or a Backend already loaded (left open)."""
    with contextlib.nullcontext(model) if hasattr(model, "infer") else load_backend(model, backend) as engine:
        return _run(engine, source, conf, classes, show, save, jsonl, max_frames, quiet, timeout)


class _Stop:
    """SIGINT (Ctrl-C) and SIGTERM (docker stop, systemd, timeout) end a run as the end of
    its source does: raised as KeyboardInterrupt, but held back while one frame's outputs
    are written, so the JSONL and the video always hold the same frames. Main thread only
    (Python runs signal handlers there); elsewhere the handlers stay as they were."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signal, self.holding, self.previous = 0, False, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for number, handler in self.previous.items():
            signal.signal(number, handler)

    def _handle(self, number, frame):
        self.signal = number
        if not self.holding:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def held(self):
        self.holding = True
        try:
            yield
        finally:
            self.holding = False
        if self.signal:
            raise KeyboardInterrupt


def _run(engine, source, conf, classes, show, save, jsonl, max_frames, quiet, timeout):
    stream = Stream(engine, source, check_conf(conf), class_filter(classes, engine.classes), max_frames,
                    timeout=timeout)
    sinks = []
    ok = False
    with _Stop() as stop:
        try:
            video = VideoSink(save, stream.source.fps) if save else None
            records = JsonlSink(jsonl, engine.classes) if jsonl else None
            window = WindowSink(f"detr-edge: {stream.source.name}") if show else None
            sinks = [s for s in (video, records, window) if s is not None]
            for result in stream:
                start = time.monotonic()
                image = annotate(result, engine.classes, stream.stats.fps) if video or window else None
                with stop.held():
                    if records:
                        records.write(result)
                    if video:
                        video.write(image)
                if window and not window.write(image):
                    break
                stream.stats.add("sink", time.monotonic() - start)
                if not quiet and result.index % 100 == 0:
                    print(f"frame {result.index}: {len(result.detections['scores'])} detections, "
                          f"{stream.stats.fps:.1f} FPS", flush=True)
            ok = True
        except KeyboardInterrupt:  # stopped: keep what was written, properly closed
            ok, stream.stats.interrupted = True, stop.signal or signal.SIGINT
        finally:
            stop.holding = True  # a second signal waits until the files are closed whole
            stream.close()
            for sink in sinks:
                sink.close(ok)
    return stream.stats


def model_alone(engine, frame: np.ndarray, iters: int, warmup: int = 5) -> list[float]:
    """Per-call latency (ms) of preprocess + infer + postprocess on one frame."""
    times = []
    for i in range(warmup + iters):
        start = time.perf_counter()
        batch = preprocess([frame], engine.spec)
        engine.to_detections(engine.infer(batch.images, batch.mask), batch)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1000)
    return times


def bench(model, backend: str = "auto", iters: int = 100, source=None, max_frames: int | None = None) -> dict:
    """Model alone (latency percentiles, throughput) and, with a source, the full pipeline
    over it, in one run."""
    with load_backend(model, backend) as engine:
        return _bench(engine, str(model), iters, source, max_frames)


def _bench(engine, model: str, iters: int, source, max_frames) -> dict:
    stream = Stream(engine, source, max_frames=max_frames) if source is not None else None
    frame = None
    if stream is not None:  # a real frame of the source for the model-alone figure
        first = stream.source.read() if not stream.source.live else None
        frame = first[0] if first else None
        stream.close()
        stream = Stream(engine, source, max_frames=max_frames)
    if frame is None:
        frame = np.random.default_rng(0).integers(0, 255, (*engine.imgsz, 3), np.uint8)
    times = model_alone(engine, frame, iters)
    report = {"model": str(model), "backend": repr(engine), "iters": iters,
              "model_alone": {"p50_ms": float(np.percentile(times, 50)), "p90_ms": float(np.percentile(times, 90)),
                              "p99_ms": float(np.percentile(times, 99)), "fps": 1000 / statistics.mean(times)}}
    if stream is not None:
        for _ in stream:
            pass
        report["pipeline"] = stream.stats.summary()
        report["pipeline_vs_model"] = report["pipeline"]["fps"] / report["model_alone"]["fps"]
    return report


def format_bench(report: dict) -> str:
    alone = report["model_alone"]
    lines = [f"{report['backend']}",
             f"  model alone  p50 {alone['p50_ms']:.2f} ms  p90 {alone['p90_ms']:.2f}  p99 {alone['p99_ms']:.2f}  "
             f"{alone['fps']:.1f} FPS ({report['iters']} iterations, preprocess + infer + postprocess)"]
    if "pipeline" in report:
        pipe = report["pipeline"]
        lines.append(f"  pipeline     {pipe['frames']} frames, {pipe['dropped']} dropped, {pipe['fps']:.1f} FPS "
                     f"= {report['pipeline_vs_model']:.0%} of the model alone")
    return "\n".join(lines)
