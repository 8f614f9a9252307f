"""Many cameras, one model, on this machine: for N = 1, 2, 4 file streams, the model alone
at batch N, N streams batched through one pipeline, and N single-stream pipelines run at
once (sharing the model), in rounds that take turns (`detr-edge bench --streams`, medians
of the rounds); then the memory of a long run of 4 batched streams (RSS after warm-up and
at the end). Prints the CPU, the figures side by side, and the issue's two targets.

    .venv/bin/python benchmarks/multistream.py --checkpoint demo-out/train/best.pth
    .venv/bin/python benchmarks/multistream.py --model m.onnx --source video.mp4
"""
import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from detr_edge.cli import main as cli  # noqa: E402
from detr_edge.runtime.backends import load_backend  # noqa: E402
from detr_edge.runtime.bench import bench, format_bench  # noqa: E402
from detr_edge.runtime.pipeline import stream  # noqa: E402
from detr_edge.runtime.sources import SyntheticSource  # noqa: E402
from detr_edge.train.synth import write_video  # noqa: E402


def cpu() -> str:
    """The CPU's name and the vector extensions that matter to onnxruntime's kernels."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    family = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("cpu family")), "?")
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model\t")), "?")
    vectors = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni") if f in flags]
    return f"{os.cpu_count()} cores, {name} (family {family} model {model}), {', '.join(vectors) or 'no AVX2'}"


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory(model: Path, source: Path, streams: int, frames: int, warmup: int) -> tuple[int, int]:
    """RSS (bytes) after `warmup` results and after all `streams` x `frames` of the batched run."""
    capture, pictures = cv2.VideoCapture(str(source)), []
    while len(pictures) < 64:
        ok, picture = capture.read()
        if not ok:
            break
        pictures.append(picture)
    marks = []
    with load_backend(model) as backend:
        sources = [SyntheticSource(pictures[k:] + pictures[:k], count=frames, live=False) for k in range(streams)]
        for count, _ in enumerate(stream(backend, sources, conf=0.5), 1):
            if count in (warmup, streams * frames):
                marks.append(rss())
    return marks[0], marks[1]


def main():
    parser = argparse.ArgumentParser()
    given = parser.add_mutually_exclusive_group(required=True)
    given.add_argument("--checkpoint", help="exported here to a dynamic-batch ONNX file")
    given.add_argument("--model", help="a dynamic-batch .onnx (or .engine)")
    parser.add_argument("--source", help="a file source (default: a 300-frame synthetic video, 240 x 320)")
    parser.add_argument("--streams", default="1,2,4")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=100, help="model-alone calls per round and N")
    parser.add_argument("--memory-frames", type=int, default=3000, help="frames of each of 4 streams (0: skip)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else Path(tmp, "model.onnx")
        if args.checkpoint:
            assert cli(["export", args.checkpoint, "--out", str(model), "--dynamic-batch"]) == 0
        source = Path(args.source) if args.source else write_video(Path(tmp, "shapes.mp4"), 300, (240, 320),
                                                                   np.random.default_rng(0))
        counts = [int(n) for n in args.streams.split(",")]
        print(f"machine: {cpu()}")
        print(f"model: {args.checkpoint or args.model}; source: {args.source or 'synthetic video, 300 frames, 240 x 320'}")
        report = bench(model, iters=args.iters, source=str(source), streams=counts, rounds=args.rounds)
        print(format_bench(report))
        row = report["streams"][-1]
        print(f"target: {row['streams']} streams batched at >= 90% of the model alone at batch {row['streams']}: "
              f"{row['batched_vs_model']:.0%}; and above {row['streams']} single pipelines at once: "
              f"{row['batched_vs_singles']:.2f}x")
        if args.memory_frames:
            warm, end = memory(model, source, 4, args.memory_frames, warmup=2000)
            print(f"memory: 4 streams x {args.memory_frames} frames batched: RSS {warm / 2**20:.0f} MiB after 2000 "
                  f"frames, {end / 2**20:.0f} MiB at the end: {(end - warm) / 2**20:+.1f} MiB (target: < 50 MB)")


if __name__ == "__main__":
    main()
