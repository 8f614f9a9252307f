"""`run --track`: a persistent id per object, one Tracker per video source.

Tracking-by-detection with ByteTrack from Roboflow's `trackers` package (numpy, scipy and
supervision; no torch), an optional extra: `pip install 'detr-edge[track]'`, Python 3.10+.
ByteTrack fits DETR's output: it matches the high-score boxes to the tracks' Kalman
predictions first, then lets the low-score ones (0.5 .. 0.6 at the default --conf) extend
a track the detector nearly lost, without starting new tracks from them."""
from __future__ import annotations

import math
import sys

import numpy as np

from .errors import UserError

INSTALL = "--track needs the trackers package (Python 3.10+): pip install 'detr-edge[track]'"


def library():
    """(supervision.Detections, trackers.ByteTrackTracker), or the one line that says how to
    install them: called before a run opens its sources, and by each Tracker."""
    try:
        from supervision import Detections
        from trackers import ByteTrackTracker
    except ImportError:
        raise UserError(INSTALL if sys.version_info >= (3, 10) else
                        f"{INSTALL}; this is Python {sys.version_info[0]}.{sys.version_info[1]}") from None
    return Detections, ByteTrackTracker


class Tracker:
    """ByteTrack over the runtime's detections dicts, for one source: ids start at 0 and
    never repeat within it (trackers >= 2.6 counts per instance, not per process)."""

    def __init__(self, fps: float, lost_seconds: float = 1.0, **options):
        """fps: the source's frame rate (0 or NaN, as some cameras report: 30). lost_seconds:
        how long a track the detector misses keeps its id. options: ByteTrackTracker's own
        (track_activation_threshold, high_conf_det_threshold, minimum_iou_threshold, ...)."""
        Detections, ByteTrackTracker = library()
        fps = float(fps) if fps and math.isfinite(fps) and fps > 0 else 30.0
        # the buffer is counted in frames at 30 fps, scaled by the library to frame_rate
        options.setdefault("lost_track_buffer", max(1, round(30 * lost_seconds)))
        self._tracker = ByteTrackTracker(frame_rate=fps, **options)
        self._detections = Detections

    def update(self, detections: dict, timestamp: float | None = None) -> dict:
        """One frame's {'scores', 'labels', 'boxes' xyxy} -> the detections that belong to a
        confirmed track, each array indexed alike, plus 'ids' int64 [N]; highest score first.
        A box that no track vouches for yet (an object's first frame, a low-score box that
        extends no track) is left out: --track reports tracks. timestamp: the frame's time
        in seconds, for a live source that drops frames (the motion model steps over them);
        None: one frame per call."""
        boxes = np.asarray(detections["boxes"], np.float32).reshape(-1, 4)
        count = len(boxes)
        frame = self._detections(xyxy=boxes.astype(np.float64),
                                 confidence=np.asarray(detections["scores"], np.float32).reshape(-1),
                                 class_id=np.asarray(detections["labels"]).astype(int).reshape(-1),
                                 data={"index": np.arange(count)})
        tracked = self._tracker.update(frame, timestamp=timestamp)  # every frame: tracks age on empty ones too
        index = np.zeros(0, np.int64)
        ids = np.zeros(0, np.int64)
        if count and len(tracked):
            confirmed = np.asarray(tracked.tracker_id) >= 0
            index = np.asarray(tracked.data["index"], np.int64)[confirmed]
            ids = np.asarray(tracked.tracker_id, np.int64)[confirmed]
        order = np.argsort(-np.asarray(detections["scores"])[index], kind="stable")
        index, ids = index[order], ids[order]
        out = {key: np.asarray(value)[index] if np.ndim(value) and len(value) == count else value
               for key, value in detections.items()}
        out["ids"] = ids
        return out

    def reset(self) -> None:
        """Forget every track (the source restarted); ids start again at 0."""
        self._tracker.reset()
