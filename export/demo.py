"""`make demo`: the tour a new user runs first, on embedded data (no download).

Synthesize the shapes dataset, train the CPU preset on it for a bounded time (a finished
demo checkpoint is reused), evaluate it with pycocotools, show what the checkpoint holds,
run the PyTorch reference path on a validation image, export FP32 and FP16 ONNX,
calibrate INT8 (TensorRT and CPU flavours) on the training images, check all four
files against PyTorch on the validation set, and stream the synthetic video (and the real
one from ../shared/data when present) through the FP32 file.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cli import main as cli

# The demo recipe (docs/training.md has the measurements behind it).
TRAIN = ["--preset", "detr_r18_tiny", "--imgsz", "128", "--batch-size", "16", "--lr", "2e-4",
         "--lr-backbone", "2e-4", "--warmup", "200", "--groups", "4", "--epochs", "100",
         "--eval-every", "2", "--save-every", "500"]


REAL_VIDEO = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "video" / "one-by-one-person-detection.mp4"
VARIANTS = (".onnx", ".fp16.onnx", ".int8.onnx", ".int8-cpu.onnx")


def run(out: Path, minutes: float) -> int:
    data, run_dir = out / "data", out / "train"
    checkpoint = run_dir / "best.pth"
    onnx = out / "model.onnx"
    steps = []
    if not (data / "annotations" / "instances_val.json").exists():
        steps.append(["data", "synth", str(data), "--imgsz", "128", "--max-objects", "3"])
    if checkpoint.exists():
        print(f"reusing the finished demo checkpoint {checkpoint} (delete {run_dir} to train again)")
    else:
        steps.append(["train", "--data", str(data), "--out", str(run_dir), *TRAIN, "--time-limit", str(minutes)])
    val_image = data / "val" / "000000.jpg"
    steps += [["eval", str(checkpoint), "--data", str(data), "--out", str(out / "metrics.json")],
              ["info", str(checkpoint)],
              ["predict", str(checkpoint), str(val_image), "--out", str(out / "predict"), "--conf", "0.5"],
              ["export", str(checkpoint), "--out", str(onnx), "--dynamic-batch", "--precision", "fp32,fp16"],
              ["info", str(onnx.with_suffix(".fp16.onnx"))],
              ["calibrate", str(onnx), "--data", str(data / "train"), "--samples", "128",
               "--val-data", str(data / "annotations" / "instances_val.json")],
              ["check", str(checkpoint), "--against", *[str(onnx.with_suffix(s)) for s in VARIANTS],
               "--data", str(data), "--out", str(out / "check")]]
    videos = [data / "shapes.mp4"] + ([REAL_VIDEO] if REAL_VIDEO.exists() else [])
    steps += [["run", str(onnx), str(video), "--save", str(out / "stream" / f"{video.stem}.mp4"),
               "--jsonl", str(out / "stream" / f"{video.stem}.jsonl")] for video in videos]
    for step in steps:
        print(f"\n$ detr-edge {' '.join(step)}", flush=True)
        if cli(step):
            return 1
    print(f"\ndemo done:\n  data        {data}/ (COCO format; video {data / 'shapes.mp4'})"
          f"\n  checkpoint  {checkpoint} (training log {run_dir / 'metrics.csv'}, {run_dir / 'eval.csv'})"
          f"\n  metrics     {out / 'metrics.json'}\n  predictions {out / 'predict'}/"
          f"\n  ONNX        {', '.join(str(onnx.with_suffix(s)) for s in VARIANTS)}"
          f"\n  INT8 report {onnx.with_suffix('.int8.report.md')}"
          f"\n  check       {out / 'check' / 'report.md'}"
          f"\n  streaming   {out / 'stream'}/ (annotated mp4 and JSON lines per video)")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m export.demo")
    parser.add_argument("--out", type=Path, default=Path("demo-out"))
    parser.add_argument("--minutes", type=float, default=10.0, help="training time budget (default 10)")
    args = parser.parse_args()
    sys.exit(run(args.out, args.minutes))
