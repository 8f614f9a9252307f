"""`detr-edge run` and `detr-edge bench`: the streaming runtime from the command line
(numpy, OpenCV and the backend only; never torch)."""
from __future__ import annotations

import contextlib
import re
import signal
import statistics
import threading
import time
from pathlib import Path

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


def run(model, sources, backend: str = "auto", conf: float = 0.5, classes: str | None = None, show: bool = False,
        save: str | None = None, jsonl: str | None = None, max_frames: int | None = None, quiet: bool = False,
        timeout: float = 10.0, batch: int | None = None, strict: bool = False, track: bool = False,
        reconnect: float | None = None):
    """`model`: a file, or a Backend already loaded (left open). `sources`: one, or a list
    (then `save` is a folder that gets one video per source)."""
    count = len(sources) if isinstance(sources, (list, tuple)) else 1
    if save and count > 1 and Path(save).suffix:
        raise UserError(f"--save {save}: with {count} sources, a folder (one video per source), not a file")
    with contextlib.nullcontext(model) if hasattr(model, "infer") else load_backend(model, backend) as engine:
        stream = Stream(engine, sources, check_conf(conf), class_filter(classes, engine.classes), max_frames,
                        timeout=timeout, batch=batch, strict=strict, track=track, reconnect=reconnect)
        return _run(engine, stream, show, save, jsonl, quiet)


def video_names(names: list[str]) -> list[str]:
    """File names of the per-source videos in `--save FOLDER`: position, then what the
    source is ('0-shop.mp4', '1-camera0.mp4', '2-10.0.0.5_live.mp4')."""
    slugs = []
    for name in names:
        if name.isdigit():
            slug = f"camera{name}"
        elif "://" in name:
            slug = name.split("://", 1)[1]
        elif "!" in name:
            slug = "pipeline"
        else:
            slug = Path(name.rstrip("/\\")).stem
        slugs.append(re.sub(r"[^A-Za-z0-9.-]+", "_", slug).strip("._") or "source")
    return [f"{i}-{slug}.mp4" for i, slug in enumerate(slugs)]


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


def _run(engine, stream: Stream, show, save, jsonl, quiet):
    count = len(stream.stats.sources)
    names = ([Path(save, name) for name in video_names([s.name for s in stream.stats.sources])] if save and count > 1
             else [save])
    running = sum(source is not None for source in stream.sources)
    sinks, ok = [], False
    with _Stop() as stop:
        try:
            videos = {k: VideoSink(names[k], source.fps) for k, source in enumerate(stream.sources)
                      if source is not None} if save else {}  # no file until a frame comes
            records = JsonlSink(jsonl, engine.classes) if jsonl else None
            windows = {k: WindowSink(f"detr-edge: {source.name}") for k, source in enumerate(stream.sources)
                       if source is not None} if show else {}
            sinks = [s for s in (records, *videos.values(), *windows.values()) if s is not None]
            for result in stream:
                start = time.monotonic()
                k = result.stream
                image = annotate(result, engine.classes, stream.stats.fps / running) if save or show else None
                with stop.held():
                    if records:
                        records.write(result)
                    if save:
                        videos[k].write(image)
                if show and not windows[k].write(image):
                    break
                stream.stats.add("sink", time.monotonic() - start)
                if not quiet and result.index % 100 == 0:
                    where = f"{result.source} frame" if count > 1 else "frame"
                    print(f"{where} {result.index}: {len(result.detections['scores'])} detections, "
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
