"""`detr-edge bench`: the model alone against the whole pipeline, and N streams batched
against N single-stream pipelines, in one run on one machine (figures side by side: this
kind of machine is shared and noisy, so ratios within a run are what compares)."""
from __future__ import annotations

import statistics
import threading
import time

import numpy as np

from .backends import load_backend
from .errors import UserError
from .pipeline import Stream
from .preprocess import preprocess
from .sources import open_source


def model_alone(engine, frames, iters: int, warmup: int = 5) -> list[float]:
    """Per-call latency (ms) of preprocess + infer + postprocess on one frame, or on a
    list of frames as one batch."""
    frames = frames if isinstance(frames, list) else [frames]
    times = []
    for i in range(warmup + iters):
        start = time.perf_counter()
        batch = preprocess(frames, engine.spec)
        engine.to_detections(engine.infer(batch.images, batch.mask), batch)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1000)
    return times


def bench(model, backend: str = "auto", iters: int = 100, source=None, max_frames: int | None = None,
          streams: list[int] | None = None, rounds: int = 1) -> dict:
    """Model alone (latency percentiles, throughput) and, with a source, the full pipeline
    over it; with `streams` (e.g. [1, 2, 4]), each count of the source run batched and as
    that many single-stream pipelines side by side, `rounds` times (medians reported)."""
    if streams and source is None:
        raise UserError("--streams needs --source (a video file or folder: each stream reads it)")
    first = _first_frame(source) if source is not None else None
    if streams and first is None:
        raise UserError(f"--streams: {source} is live; the streams benchmark reads a file source N times")
    with load_backend(model, backend) as engine:
        frame = first if first is not None else noise_frame(engine)
        report = {"model": str(model), "backend": repr(engine), "iters": iters,
                  "model_alone": alone(engine, [frame], iters)}
        if source is not None:
            with Stream(engine, source, max_frames=max_frames) as run:
                for _ in run:
                    pass
            report["pipeline"] = run.stats.summary()
            report["pipeline_vs_model"] = report["pipeline"]["fps"] / report["model_alone"]["fps"]
        if streams:
            report["streams"] = [_streams(engine, frame, source, count, max_frames, iters, rounds) for count in streams]
        return report


def _first_frame(source) -> np.ndarray | None:
    """The first frame of a file source, for the model-alone figures; None for a live one."""
    opened = open_source(source)
    try:
        first = None if opened.live else opened.read()
    finally:
        opened.close()
    return None if first is None else first[0]


def noise_frame(engine) -> np.ndarray:
    """A frame of the model's input size (latency does not depend on the pixels)."""
    return np.random.default_rng(0).integers(0, 255, (*engine.imgsz, 3), np.uint8)


def alone(engine, frames: list, iters: int) -> dict:
    """The model alone on `frames` as one batch: latency percentiles (ms) and images/s."""
    times = model_alone(engine, frames, iters)
    return {"p50_ms": float(np.percentile(times, 50)), "p90_ms": float(np.percentile(times, 90)),
            "p99_ms": float(np.percentile(times, 99)), "fps": len(frames) * 1000 / statistics.mean(times)}


def _streams(engine, frame, source, count: int, max_frames, iters: int, rounds: int) -> dict:
    """`count` copies of a file source: the model alone at batch `count`, one batched
    pipeline, and `count` single-stream pipelines sharing the model, run at once."""
    alone_fps, batched, singles = [], [], []
    for _ in range(rounds):
        alone_fps.append(alone(engine, [frame] * count, iters)["fps"])
        with Stream(engine, [source] * count, max_frames=max_frames) as run:
            for _ in run:
                pass
        batched.append(_figures([run], run.stats.started, run.stats.ended))
        singles.append(_singles(engine, source, count, max_frames))
    row = {"streams": count, "rounds": rounds, "model_alone_fps": statistics.median(alone_fps),
           "batched": _median(batched), "singles": _median(singles)}
    row["batched_vs_model"] = row["batched"]["fps"] / row["model_alone_fps"]
    row["batched_vs_singles"] = row["batched"]["fps"] / row["singles"]["fps"]
    return row


def _singles(engine, source, count: int, max_frames) -> dict:
    """`count` single-stream pipelines at once, each as a user would run one (batch 1);
    sharing the model where its backend takes concurrent calls, else each its own."""
    engines = [engine] * count if engine.concurrent else [load_backend(engine.path) for _ in range(count)]
    runs = [Stream(e, source, max_frames=max_frames, batch=1) for e in engines]
    errors = []

    def consume(run):
        try:
            for _ in run:
                pass
        except Exception as exc:  # raised below, not lost in a thread
            errors.append(exc)
    threads = [threading.Thread(target=consume, args=(run,)) for run in runs]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    end = time.monotonic()
    for own in () if engine.concurrent else engines:
        own.close()
    if errors:
        raise errors[0]
    return _figures(runs, start, end)


def _figures(runs: list, start: float, end: float) -> dict:
    frames = sum(r.stats.frames for r in runs)
    latency = [v for r in runs for v in r.stats.stages["latency"]] or [0.0]
    return {"frames": frames, "fps": frames / max(end - start, 1e-9),
            "latency_p50_ms": float(np.percentile(latency, 50)), "latency_p90_ms": float(np.percentile(latency, 90))}


def _median(figures: list) -> dict:
    return {key: statistics.median(f[key] for f in figures) for key in figures[0]}


def format_bench(report: dict) -> str:
    alone = report["model_alone"]
    lines = [f"{report['backend']}",
             f"  model alone  p50 {alone['p50_ms']:.2f} ms  p90 {alone['p90_ms']:.2f}  p99 {alone['p99_ms']:.2f}  "
             f"{alone['fps']:.1f} FPS ({report['iters']} iterations, preprocess + infer + postprocess)"]
    if "pipeline" in report:
        pipe = report["pipeline"]
        lines.append(f"  pipeline     {pipe['frames']} frames, {pipe['dropped']} dropped, {pipe['fps']:.1f} FPS "
                     f"= {report['pipeline_vs_model']:.0%} of the model alone")
    if "streams" in report:
        lines.append("  streams  model alone at batch N  |  N streams batched: FPS, latency p50/p90  |  "
                     "N single pipelines at once: FPS, latency p50/p90")
        for row in report["streams"]:
            b, s = row["batched"], row["singles"]
            lines.append(f"  {row['streams']:7d}  {row['model_alone_fps']:8.1f} FPS            |  {b['fps']:7.1f} FPS "
                         f"({row['batched_vs_model']:4.0%} of alone, {row['batched_vs_singles']:.2f}x singles), "
                         f"{b['latency_p50_ms']:.0f}/{b['latency_p90_ms']:.0f} ms  |  {s['fps']:7.1f} FPS, "
                         f"{s['latency_p50_ms']:.0f}/{s['latency_p90_ms']:.0f} ms")
        lines.append(f"  (medians of {report['streams'][0]['rounds']} rounds; frames of every stream counted)")
    return "\n".join(lines)
