"""The streaming pipeline: capture and inference run in their own threads, the consumer
(sinks, or the caller of `stream()`) in its own, joined by bounded queues, so decoding,
inference and drawing/encoding overlap.

File sources: every frame, in order (the capture blocks when the queue is full).
Live sources: the capture never waits; a full queue drops its oldest frame, so inference
always takes the newest one and latency stays bounded; drops are counted.
"""
from __future__ import annotations

import queue
import signal
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from .errors import UserError
from .preprocess import preprocess
from .sources import open_source

_END = object()


@dataclass
class FrameResult:
    index: int            # position in the source (gaps where a live source's frames were dropped)
    timestamp: float      # seconds: video time for files, capture time for live sources
    frame: np.ndarray     # the BGR frame
    detections: dict      # 'scores', 'labels', 'boxes' (xyxy, frame pixels)
    latency_ms: float     # capture -> detections ready


@dataclass
class Stats:
    frames: int = 0
    dropped: int = 0
    interrupted: int = 0  # the signal (SIGINT, SIGTERM) that stopped the run early, if one did
    started: float = field(default_factory=time.monotonic)
    ended: float = 0.0
    stages: dict = field(default_factory=lambda: {"capture": [], "preprocess": [], "infer": [],
                                                  "postprocess": [], "sink": [], "latency": []})

    def add(self, stage: str, seconds: float) -> None:
        values = self.stages[stage]
        values.append(seconds * 1000)
        if len(values) > 20000:  # bounded memory on endless streams: keep the recent half
            del values[:10000]

    @property
    def fps(self) -> float:
        return self.frames / max((self.ended or time.monotonic()) - self.started, 1e-9)

    def summary(self) -> dict:
        return {"frames": self.frames, "dropped": self.dropped, "fps": round(self.fps, 2),
                "ms": {k: {p: round(float(np.percentile(v, q)), 2) for p, q in (("p50", 50), ("p90", 90), ("p99", 99))}
                       for k, v in self.stages.items() if v}}

    def format(self) -> str:
        s = self.summary()
        lines = [f"{s['frames']} frames, {s['dropped']} dropped, {s['fps']:.1f} FPS end to end"
                 + (f" (stopped by {signal.Signals(self.interrupted).name})" if self.interrupted else "")]
        lines += [f"  {k:12s} p50 {v['p50']:8.2f} ms  p90 {v['p90']:8.2f}  p99 {v['p99']:8.2f}"
                  for k, v in s["ms"].items()]
        return "\n".join(lines)


class Stream:
    """Iterate over FrameResults of `source` through `backend`; `stats` while and after.
    Closing (or leaving a `with` block) stops the threads and the source."""

    def __init__(self, backend, source, conf: float = 0.5, classes: set[int] | None = None,
                 max_frames: int | None = None, queue_size: int = 4, timeout: float = 10.0):
        self.backend, self.conf, self.classes, self.max_frames = backend, conf, classes, max_frames
        self.source = open_source(source, timeout)
        self.stats = Stats()
        self._frames = queue.Queue(maxsize=1 if self.source.live else queue_size)
        self._results = queue.Queue(maxsize=queue_size)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._threads = [threading.Thread(target=self._guard, args=(self._capture,), name="capture", daemon=True),
                         threading.Thread(target=self._guard, args=(self._infer,), name="infer", daemon=True)]
        self._started = False

    # --- threads -------------------------------------------------------------------------
    def _guard(self, body) -> None:
        try:
            body()
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

    def _capture(self) -> None:
        index = 0
        try:
            while not self._stop.is_set() and (self.max_frames is None or index < self.max_frames):
                start = time.monotonic()
                item = self.source.read()
                if item is None:
                    break
                captured = time.monotonic()
                self.stats.add("capture", captured - start)
                packet = (index, item[1], item[0], captured)
                index += 1
                if self.source.live:  # newest frame wins: drop the stale one
                    try:
                        self._frames.put_nowait(packet)
                    except queue.Full:
                        try:
                            self._frames.get_nowait()
                            self.stats.dropped += 1
                        except queue.Empty:
                            pass
                        self._frames.put_nowait(packet)
                elif not self._put(self._frames, packet):
                    break
        finally:  # the end waits its turn behind the frames: never displaces one
            self._put(self._frames, _END)

    def _infer(self) -> None:
        spec = self.backend.spec
        while True:
            try:
                packet = self._frames.get(timeout=0.1)
            except queue.Empty:
                if self._stop.is_set():
                    return
                continue
            if packet is _END:
                self._put(self._results, _END)
                return
            index, timestamp, frame, captured = packet
            t0 = time.monotonic()
            batch = preprocess([frame], spec)
            t1 = time.monotonic()
            outputs = self.backend.infer(batch.images, batch.mask)
            t2 = time.monotonic()
            detections = self.backend.to_detections(outputs, batch, self.conf)[0]
            if self.classes is not None:
                keep = np.isin(detections["labels"], list(self.classes))
                detections = {k: v[keep] for k, v in detections.items()}
            t3 = time.monotonic()
            self.stats.add("preprocess", t1 - t0)
            self.stats.add("infer", t2 - t1)
            self.stats.add("postprocess", t3 - t2)
            self.stats.add("latency", t3 - captured)
            if not self._put(self._results, FrameResult(index, timestamp, frame, detections, (t3 - captured) * 1000)):
                return

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
                yield item
        finally:
            self.close()
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        if not self.stats.ended:
            self.stats.ended = time.monotonic()
        self._stop.set()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout=5)
        self.source.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def stream(model, source, conf: float = 0.5, backend: str = "auto", **options):
    """The Python API: an iterator of FrameResult for a model file (or Backend) and a source.

        for result in stream("model.onnx", "video.mp4"):
            print(result.index, result.detections["labels"])
    """
    from .backends import load_backend
    engine = model if hasattr(model, "infer") else load_backend(model, backend)  # a Backend already
    return Stream(engine, source, conf, **options)
