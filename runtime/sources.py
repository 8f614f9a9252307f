"""Frame sources through OpenCV: a video file, a camera index, an RTSP/HTTP URL, a
GStreamer pipeline (Jetson CSI cameras), or an image folder.

File sources (video files, folders) give every frame, in order, and never reconnect. Live
sources (cameras, streams, pipelines) are marked `live`: the pipeline keeps only the
newest frame. A live source that stops delivering is reopened with back-off (0.5 s
doubling to 8 s between tries) for at most `reconnect` seconds, then ends; the gap it
left is reported with the first frame after it."""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import cv2
import numpy as np

from .errors import UserError

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
# a working Jetson CSI camera pipeline (JetPack's OpenCV has GStreamer; PyPI's has not)
CSI_PIPELINE = ("nvarguscamerasrc sensor-id=0 ! video/x-raw(memory:NVMM), width=1280, height=720, framerate=30/1 "
                "! nvvidconv ! video/x-raw, format=BGRx ! videoconvert ! video/x-raw, format=BGR ! appsink drop=1")


class Source:
    """`read() -> (BGR frame, timestamp in seconds) or None at the end`."""
    live = False
    fps = 0.0
    name = ""
    failure = ""  # why a live source ended: it did not come back
    _gap = 0.0

    def read(self):
        raise NotImplementedError

    def take_gap(self) -> float:
        """Seconds without frames before the frame just read, if the source had to be
        reopened for it; 0.0 otherwise (asked once per frame)."""
        gap, self._gap = self._gap, 0.0
        return gap

    def halt(self) -> None:
        """Stop waiting (reconnecting): the stream is closing."""

    def close(self) -> None:
        pass


class VideoSource(Source):
    """`timeout` (seconds): how long opening a stream or waiting for its next frame may take."""

    def __init__(self, target, live: bool, api=cv2.CAP_ANY, reconnect_s: float = 30.0, timeout: float = 10.0):
        self.target, self.live, self.api, self.reconnect_s, self.timeout = target, live, api, reconnect_s, timeout
        self.name, self._halted = str(target), threading.Event()
        start = time.monotonic()
        self.capture = self._open()
        if not self.capture.isOpened():
            if isinstance(target, int):
                raise UserError(f"camera {target} not found (no /dev/video{target} that OpenCV can open)")
            if live and time.monotonic() - start >= 0.9 * timeout:
                raise UserError(f"{self.name}: timed out after {timeout:g} s without a video (--timeout sets the "
                                "wait)")
            raise UserError(f"{self.name}: cannot open it as a video source")
        self.fps = self.capture.get(cv2.CAP_PROP_FPS) or 0.0
        self.index, self.last = 0, time.monotonic()
        if not live:  # a file that opens but holds no decodable frame is not a video
            ok, self._first = self.capture.read()
            if not ok:
                self.capture.release()
                raise UserError(f"{self.name}: not a readable video (no frame could be decoded)")

    def _open(self):
        if isinstance(self.target, str) and "://" in self.target:  # a stream: bounded waits, not FFmpeg's 30 s
            ms = int(self.timeout * 1000)
            return cv2.VideoCapture(self.target, cv2.CAP_FFMPEG, [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms,
                                                                  cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms])
        return cv2.VideoCapture(self.target, self.api)

    def read(self):
        if not self.live:
            frame, self._first = (self._first, None) if self._first is not None else (self.capture.read()[1], None)
            if frame is None:
                return None
            self.index += 1
            return frame, (self.index - 1) / self.fps if self.fps else time.monotonic()
        ok, frame = self.capture.read()
        if not ok:
            return self._reconnect()
        self.last = time.monotonic()
        return frame, self.last

    def _reconnect(self):
        """Back-off reopening of a dropped live source, for at most `reconnect_s` seconds."""
        deadline, wait = time.monotonic() + self.reconnect_s, 0.5
        while time.monotonic() < deadline:
            log.warning("%s: no frame; reconnecting in %.1f s", self.name, wait)
            if self._halted.wait(min(wait, max(deadline - time.monotonic(), 0.0))):
                return None
            self.capture.release()
            self.capture = self._open()
            ok, frame = self.capture.read() if self.capture.isOpened() else (False, None)
            if ok:
                now = time.monotonic()
                self._gap, self.last = now - self.last, now
                log.warning("%s: back after %.1f s without frames", self.name, self._gap)
                return frame, now
            wait = min(wait * 2, 8.0)
        self.failure = (f"{self.name}: no frame for {time.monotonic() - self.last:.0f} s; gave up after "
                        f"{self.reconnect_s:g} s of reconnecting (--reconnect sets how long)")
        return None

    def halt(self) -> None:
        self._halted.set()

    def close(self) -> None:
        self.capture.release()


class FolderSource(Source):
    def __init__(self, folder: Path):
        self.paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.paths:
            raise UserError(f"{folder}: no images in this folder")
        self.name, self.index, self.read_any = str(folder), 0, False

    def read(self):
        while self.index < len(self.paths):
            path = self.paths[self.index]
            self.index += 1
            frame = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if frame is not None:
                self.read_any = True
                return frame, float(self.index - 1)
            log.warning("%s: not a readable image, skipped", path)
        if not self.read_any:
            count = len(self.paths)
            raise UserError(f"{self.name}: no readable image ({'none of its' if count > 1 else 'not its'} "
                            f"{count} image file{'s' if count > 1 else ''})")
        return None


def has_gstreamer() -> bool:
    info = cv2.getBuildInformation()
    line = next((ln for ln in info.splitlines() if "GStreamer" in ln), "")
    return "YES" in line


def open_source(spec, timeout: float = 10.0, reconnect: float | None = None) -> Source:
    """'video.mp4', '0' (camera), 'rtsp://...', 'nvarguscamerasrc ! ... ! appsink', 'frames/'.
    `timeout`: seconds a stream may take to open or to send its next frame. `reconnect`:
    seconds a live source that dropped is retried (default 5 for a camera, 30 for a
    stream or pipeline; `float('inf')`: for ever)."""
    if isinstance(spec, Source):
        return spec
    if not timeout > 0:
        raise UserError(f"--timeout {timeout:g}: seconds, more than 0")
    if reconnect is not None and not reconnect >= 0:
        raise UserError(f"--reconnect {reconnect:g}: seconds, 0 or more (inf: for ever)")
    text = str(spec)
    if text.isdigit():
        return VideoSource(int(text), live=True, reconnect_s=5.0 if reconnect is None else reconnect)
    retry = 30.0 if reconnect is None else reconnect
    if "!" in text:
        if not has_gstreamer():
            raise UserError("this OpenCV has no GStreamer (PyPI's opencv-python); on Jetson use JetPack's "
                            "OpenCV (python3-opencv) in a venv made with --system-site-packages")
        return VideoSource(text, live=True, api=cv2.CAP_GSTREAMER, reconnect_s=retry)
    if "://" in text:
        return VideoSource(text, live=True, timeout=timeout, reconnect_s=retry)
    path = Path(text)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    if path.is_dir():
        return FolderSource(path)
    return VideoSource(str(path), live=False)


class SyntheticSource(Source):
    """`count` frames cycled from `frames`, as fast as they are asked for (or at `fps`),
    stamped with the time they were made: with `live`, a camera faster than any model."""

    def __init__(self, frames: list[np.ndarray], count: int, fps: float = 0.0, live: bool = True):
        self.frames, self.count, self.fps, self.live = frames, count, fps, live
        self.index, self.name = 0, "synthetic"

    def read(self):
        if self.index >= self.count:
            return None
        if self.fps:
            time.sleep(1.0 / self.fps)
        frame = self.frames[self.index % len(self.frames)]
        self.index += 1
        return frame, time.monotonic()
