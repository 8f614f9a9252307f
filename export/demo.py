"""`make demo`: the tour a new user runs first, on embedded defaults (no download).

Today: build the edge preset with fresh weights, write its checkpoint, show what it
holds, and run the PyTorch reference path on one image end to end. Fresh weights
detect nothing meaningful; the boxes only show the path works.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

from .cli import main as cli


def synthetic_scene(path: Path) -> Path:
    """A 480x640 scene of a few filled shapes, for clones without ../shared/data."""
    rng = np.random.default_rng(0)
    image = np.linspace(40, 200, 640, dtype=np.uint8)[None, :, None].repeat(480, 0).repeat(3, 2)
    cv2.rectangle(image, (60, 80), (220, 260), (40, 40, 220), cv2.FILLED)
    cv2.circle(image, (400, 200), 90, (220, 120, 30), cv2.FILLED)
    cv2.fillPoly(image, [np.array([[300, 440], [420, 300], [560, 440]])], (40, 200, 60))
    image = cv2.add(image, rng.integers(0, 20, image.shape, dtype=np.uint8))
    cv2.imwrite(str(path), image)
    return path


def run(out: Path, image: Path | None) -> int:
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / "detr_r18_fresh.pth"
    steps = []
    if not checkpoint.exists():
        steps.append(["init", "detr_r18", str(checkpoint)])
    image = image or synthetic_scene(out / "scene.jpg")
    steps += [["info", str(checkpoint)],
              ["predict", str(checkpoint), str(image), "--out", str(out / "predict"), "--conf", "0", "--max-det", "5"]]
    for step in steps:
        print(f"\n$ detr-edge {' '.join(step)}", flush=True)
        if cli(step):
            return 1
    print(f"\ndemo done: checkpoint {checkpoint}, annotated image and predictions.json in {out / 'predict'}/"
          "\n(fresh weights: the 5 highest-scoring boxes are drawn to show the path, not real detections)")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m export.demo")
    parser.add_argument("--out", type=Path, default=Path("demo-out"))
    parser.add_argument("--image", type=Path, help="an image to run on (default: a generated scene)")
    args = parser.parse_args()
    sys.exit(run(args.out, args.image))
