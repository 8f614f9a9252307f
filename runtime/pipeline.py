"""The streaming pipeline: one capture thread per source, one inference thread that
batches frames of every source into one call, and the consumer (sinks, or the caller of
`stream()`) in its own, joined by bounded queues, so decoding, inference and
drawing/encoding overlap.

File sources (videos, folders): every frame, in order (the capture waits while its queue
is full). Live sources (cameras, streams): the capture never waits; a full queue drops its
oldest frame, so inference always takes the newest one and latency stays bounded; drops
are counted.

Batching, as DeepStream's nvstreammux and ultralytics' multi-source streams do it: each
inference call takes up to `batch` frames, one per source with a frame ready, round after
round, starting after the source the last call ended with, so no source starves another.
A fixed-batch model's batch is filled (the backend pads when fewer frames are ready).

A source that cannot open, or fails while running (a live one that did not come back
within its reconnect time), is named in one line and the others go on (with `strict`, a
source that cannot open refuses the run at start); with a single source its error is the
run's.
"""
from __future__ import annotations

import collections
import logging
import os
import queue
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .errors import UserError
from .preprocess import preprocess
from .sources import Source, open_source

log = logging.getLogger(__name__)
_END = object()


@dataclass
class FrameResult:
    index: int            # position in its source (gaps where a live source's frames were dropped)
    timestamp: float      # seconds: video time for files, capture time for live sources
    frame: np.ndarray     # the BGR frame
    detections: dict      # 'scores', 'labels', 'boxes' (xyxy, frame pixels); 'ids' with tracking
    latency_ms: float     # capture -> detections ready
    source: str = ""      # the source, as given
    stream: int = 0       # its position among the sources given
    gap_s: float = 0.0    # a live source that dropped and came back: seconds without frames before this one


@dataclass
class SourceStats:
    name: str
    frames: int = 0
    dropped: int = 0
    reconnects: int = 0
    gap_s: float = 0.0    # seconds without frames, over all its reconnects
    error: str = ""       # why it failed, if it did (the run went on without it)

    def summary(self) -> dict:
        return {"source": self.name, "frames": self.frames, "dropped": self.dropped, "reconnects": self.reconnects,
                "gap_s": round(self.gap_s, 2), **({"error": self.error} if self.error else {})}


@dataclass
class Stats:
    frames: int = 0
    interrupted: int = 0  # the signal (SIGINT, SIGTERM) that stopped the run early, if one did
    started: float = field(default_factory=time.monotonic)
    ended: float = 0.0
    sources: list = field(default_factory=list)  # SourceStats, one per source given, in order
    batches: int = 0      # inference calls
    stages: dict = field(default_factory=lambda: {"capture": [], "preprocess": [], "infer": [],
                                                  "postprocess": [], "sink": [], "latency": []})

    def add(self, stage: str, seconds: float) -> None:
        values = self.stages[stage]
        values.append(seconds * 1000)
        if len(values) > 20000:  # bounded memory on endless streams: keep the recent half
            del values[:10000]

    @property
    def dropped(self) -> int:
        return sum(s.dropped for s in self.sources)

    @property
    def failed(self) -> list:
        return [s for s in self.sources if s.error]

    @property
    def fps(self) -> float:
        return self.frames / max((self.ended or time.monotonic()) - self.started, 1e-9)

    def summary(self) -> dict:
        return {"frames": self.frames, "dropped": self.dropped, "fps": round(self.fps, 2),
                "batch": round(self.frames / max(self.batches, 1), 2),
                "sources": [s.summary() for s in self.sources],
                "ms": {k: {p: round(float(np.percentile(v, q)), 2) for p, q in (("p50", 50), ("p90", 90), ("p99", 99))}
                       for k, v in self.stages.items() if v}}

    def format(self) -> str:
        s = self.summary()
        lines = [f"{s['frames']} frames, {s['dropped']} dropped, {s['fps']:.1f} FPS end to end"
                 + (f" ({len(self.sources)} sources, {s['batch']:.2f} frames per inference call)"
                    if len(self.sources) > 1 else "")
                 + (f" (stopped by {signal.Signals(self.interrupted).name})" if self.interrupted else "")]
        if len(self.sources) > 1 or any(src.reconnects or src.error for src in self.sources):
            for i, src in enumerate(self.sources):
                lines.append(f"  [{i}] " + (f"failed: {src.error}" if src.error and not src.frames else
                             f"{src.name}: {src.frames} frames, {src.dropped} dropped"
                             + (f", {src.reconnects} reconnects ({src.gap_s:.1f} s without frames)"
                                if src.reconnects else "") + (f"; then failed: {src.error}" if src.error else "")))
        lines += [f"  {k:12s} p50 {v['p50']:8.2f} ms  p90 {v['p90']:8.2f}  p99 {v['p99']:8.2f}"
                  for k, v in s["ms"].items()]
        return "\n".join(lines)


class _Feed:
    """One source inside a Stream: its frames waiting for inference and its tracker."""

    def __init__(self, number: int, source: Source, capacity: int, stats: SourceStats):
        self.number, self.source, self.stats = number, source, stats
        self.capacity = 1 if source.live else capacity
        self.frames = collections.deque()
        self.done, self.index, self.tracker = False, 0, None


class Stream:
    """Iterate over FrameResults of one source or a list of them through `backend`; `stats`
    while and after. Closing (or leaving a `with` block) stops the threads and the sources.

    `batch`: frames per inference call (default: a fixed-batch model's batch, else one per
    source, up to the backend's limit). `max_frames`: per source. `track`: persistent ids
    per source (runtime.track). `reconnect`: seconds a dropped live source is retried."""

    def __init__(self, backend, source, conf: float = 0.5, classes: set[int] | None = None,
                 max_frames: int | None = None, queue_size: int = 4, timeout: float = 10.0,
                 batch: int | None = None, strict: bool = False, track: bool = False,
                 reconnect: float | None = None):
        self.backend, self.conf, self.classes, self.max_frames = backend, conf, classes, max_frames
        self.track = track
        specs = list(source) if isinstance(source, (list, tuple)) else [source]
        if not specs:
            raise UserError("no source given")
        if batch is not None and batch < 1:
            raise UserError(f"--batch {batch}: at least 1")
        if track:  # the tracker library is there, before any source opens
            from .track import library
            library()
        self.stats = Stats(sources=[SourceStats(_name(s)) for s in specs])
        opened = _open_all(specs, timeout, reconnect, strict)
        for i, item in enumerate(opened):
            if isinstance(item, str):
                self.stats.sources[i].error = item
        self._feeds = [_Feed(i, s, queue_size, self.stats.sources[i]) for i, s in enumerate(opened)
                       if isinstance(s, Source)]
        self.batch = batch or backend.batch or min(len(self._feeds), backend.max_batch or len(self._feeds))
        self._next = 0  # the feed the next inference call starts with
        self._ready = threading.Condition()
        self._results = queue.Queue(maxsize=queue_size * len(self._feeds))
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._fatal = len(specs) == 1  # a source's error while running ends the run
        self._threads = [threading.Thread(target=self._guard, args=(self._capture, feed), name=f"capture-{feed.number}",
                                          daemon=True) for feed in self._feeds]
        self._threads.append(threading.Thread(target=self._guard, args=(self._infer,), name="infer", daemon=True))
        self._started = False

    @property
    def sources(self) -> list:
        """The Source of each source given, None for one that did not open."""
        by_number = {feed.number: feed.source for feed in self._feeds}
        return [by_number.get(i) for i in range(len(self.stats.sources))]

    @property
    def source(self) -> Source:
        """The first source that opened (the only one of a single-source stream)."""
        return self._feeds[0].source

    # --- threads -------------------------------------------------------------------------
    def _guard(self, body, *args) -> None:
        try:
            body(*args)
        except BaseException as exc:  # handed to the consumer, which raises it
            self._error = exc
            self._stop.set()
            self._put(self._results, _END, force=True)

    def _put(self, target: queue.Queue, item, force: bool = False) -> bool:
        """Put `item`, waiting while the queue is full; False if the stream stops first.
        `force` (an error, the consumer gone): evict the oldest item instead of waiting."""
        while not self._stop.is_set() or force:
            try:
                target.put(item, timeout=0.1)
                return True
            except queue.Full:
                if force:
                    try:
                        target.get_nowait()
                    except queue.Empty:
                        pass
        return False

    def _capture(self, feed: _Feed) -> None:
        try:
            while not self._stop.is_set() and (self.max_frames is None or feed.index < self.max_frames):
                start = time.monotonic()
                item = feed.source.read()
                if item is None:
                    if feed.source.failure:  # a live source that did not come back
                        raise UserError(feed.source.failure)
                    break
                captured = time.monotonic()
                self.stats.add("capture", captured - start)
                gap = feed.source.take_gap()
                if gap:
                    feed.stats.reconnects += 1
                    feed.stats.gap_s += gap
                with self._ready:
                    if feed.source.live and len(feed.frames) >= feed.capacity:  # newest frame wins
                        gap += feed.frames.popleft()[4]  # and keeps a dropped frame's gap
                        feed.stats.dropped += 1
                    while len(feed.frames) >= feed.capacity and not self._stop.is_set():
                        self._ready.wait(0.1)
                    feed.frames.append((feed.index, item[1], item[0], captured, gap))
                    self._ready.notify_all()
                feed.index += 1
        except Exception as exc:
            if self._fatal:
                raise
            feed.stats.error = _naming(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, feed.stats.name)
            log.warning("%s; the other sources go on", feed.stats.error)
        finally:  # the inference thread ends a feed once its last frame is taken
            with self._ready:
                feed.done = True
                self._ready.notify_all()

    def _gather(self) -> list:
        """Up to `batch` (feed, packet) pairs, fairly; [] when every source has ended."""
        with self._ready:
            while not any(feed.frames for feed in self._feeds):
                if self._stop.is_set() or all(feed.done for feed in self._feeds):
                    return []
                self._ready.wait(0.1)
            count, start = len(self._feeds), self._next
            order = [self._feeds[(start + k) % count] for k in range(count)]
            picked = []
            while len(picked) < self.batch and any(feed.frames for feed in order):
                for k, feed in enumerate(order):
                    if feed.frames and len(picked) < self.batch:
                        picked.append((feed, feed.frames.popleft()))
                        self._next = (start + k + 1) % count
            self._ready.notify_all()  # room in the queues: file captures go on
            return picked

    def _infer(self) -> None:
        while True:
            picked = self._gather()
            if not picked:
                self._put(self._results, _END)
                return
            detections = self._detect([packet[2] for _, packet in picked])
            results = []
            for (feed, (index, timestamp, frame, captured, gap)), found in zip(picked, detections):
                if self.classes is not None:
                    keep = np.isin(found["labels"], list(self.classes))
                    found = {k: v[keep] for k, v in found.items()}
                if self.track:  # a live source's time: the motion model steps over dropped frames
                    found = self._tracker(feed).update(found, timestamp if feed.source.live else None)
                results.append(FrameResult(index, timestamp, frame, found, 0.0, feed.stats.name, feed.number, gap))
            done = time.monotonic()
            self.stats.batches += 1
            for (_, packet), result in zip(picked, results):
                result.latency_ms = (done - packet[3]) * 1000
                self.stats.add("latency", done - packet[3])
                if not self._put(self._results, result):
                    return

    def _detect(self, frames: list) -> list:
        """One batch's detections: preprocessed, inferred and decoded here, or by a served model
        (a `remote` backend: runtime.backends.triton)."""
        if getattr(self.backend, "remote", False):
            start = time.monotonic()
            found = self.backend.detect_frames(frames, self.conf)
            self.stats.add("infer", time.monotonic() - start)
            return found
        t0 = time.monotonic()
        batch = preprocess(frames, self.backend.spec)
        t1 = time.monotonic()
        outputs = self.backend.infer(batch.images, batch.mask)
        t2 = time.monotonic()
        found = self.backend.to_detections(outputs, batch, self.conf)
        self.stats.add("preprocess", t1 - t0)
        self.stats.add("infer", t2 - t1)
        self.stats.add("postprocess", time.monotonic() - t2)
        return found

    def _tracker(self, feed: _Feed):
        if feed.tracker is None:
            from .track import Tracker
            feed.tracker = Tracker(feed.source.fps or 30.0)
        return feed.tracker

    # --- consumer ------------------------------------------------------------------------
    def __iter__(self):
        if self._started:
            raise UserError("a Stream is iterated once")
        self._started = True
        self.stats.started = time.monotonic()
        for thread in self._threads:
            thread.start()
        try:
            while True:
                item = self._results.get()
                if item is _END:
                    break
                self.stats.frames += 1
                self.stats.sources[item.stream].frames += 1
                yield item
        finally:
            self.close()
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        if not self.stats.ended:
            self.stats.ended = time.monotonic()
        self._stop.set()
        for feed in self._feeds:
            feed.source.halt()  # a reconnecting source stops waiting
        deadline = time.monotonic() + 5
        for thread in self._threads:
            if thread.ident is not None:  # started
                thread.join(timeout=max(deadline - time.monotonic(), 0.0))
        for feed, thread in zip(self._feeds, self._threads):
            if not thread.is_alive():  # one still inside read() keeps its capture (a daemon: ends with us)
                feed.source.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _name(spec) -> str:
    return spec.name if isinstance(spec, Source) else str(spec)


def _naming(message: str, name: str) -> str:
    """`message`, led by the source's name unless it names it already."""
    return message if name in message else f"{name}: {message}"


def _open_all(specs: list, timeout: float, reconnect: float | None, strict: bool) -> list:
    """Each source opened (all at once: a stream's open may take `timeout`), or the one line
    that says why it failed. One source, or `strict`: a failure is the run's."""
    if len(specs) == 1:
        return [open_source(specs[0], timeout, reconnect)]
    with ThreadPoolExecutor(len(specs)) as pool:
        futures = [pool.submit(open_source, spec, timeout, reconnect) for spec in specs]
    opened = []
    for spec, future in zip(specs, futures):
        try:
            opened.append(future.result())
        except Exception as exc:  # UserError, or what OpenCV or the OS raised: the source's failure
            opened.append(_naming(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, _name(spec)))
    errors = [item for item in opened if isinstance(item, str)]
    if errors and (strict or len(errors) == len(specs)):
        for source in opened:
            if isinstance(source, Source):
                source.close()
        raise UserError(errors[0] + (" (--strict: every source must open)" if strict else
                                     f" (and every other of the {len(specs)} sources failed too)"))
    for message in errors:
        log.warning("%s; the other sources go on", message)
    return opened


def stream(model, source, conf: float = 0.5, backend: str = "auto", **options):
    """The Python API: an iterator of FrameResult for a model file (or Backend) and one
    source or a list of them (results of every source, each source's in order).

        for result in stream("model.onnx", ["cam.mp4", "rtsp://10.0.0.5/live"]):
            print(result.source, result.index, result.detections["labels"])
    """
    from .backends import load_backend
    engine = load_backend(model, backend) if isinstance(model, (str, os.PathLike)) else model  # a Backend already
    return Stream(engine, source, conf, **options)
