"""`detr-edge run`: the streaming runtime from the command line (numpy, OpenCV and the
backend only; never torch)."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import time
from pathlib import Path

from .backends import load_backend
from .errors import UserError
from .pipeline import Stream
from .postprocess import check_conf
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


VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".m4v")


def run(model, sources, backend: str = "auto", conf: float = 0.5, classes: str | None = None, show: bool = False,
        save: str | None = None, jsonl: str | None = None, max_frames: int | None = None, quiet: bool = False,
        timeout: float = 10.0, batch: int | None = None, strict: bool = False, track: bool = False,
        reconnect: float | None = None):
    """`model`: a file, or a Backend (or a served model's TritonClient) already loaded, left
    open. `sources`: one, or a list (then `save` is a folder that gets one video per source)."""
    count = len(sources) if isinstance(sources, (list, tuple)) else 1
    if save and count > 1 and Path(save).suffix.lower() in VIDEO_SUFFIXES:
        raise UserError(f"--save {save}: with {count} sources, a folder (one video per source), not a file")
    with load_backend(model, backend) if isinstance(model, (str, os.PathLike)) else contextlib.nullcontext(model) as engine:
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
            for sink in sinks:  # first: closing the sources may wait (a stream reconnecting)
                sink.close(ok)
            stream.close()
    return stream.stats
