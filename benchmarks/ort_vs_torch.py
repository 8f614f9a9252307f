"""Median latency of PyTorch eager (`torch.no_grad()`) versus onnxruntime FP32 (the
runtime's backend, on the file `detr-edge export` writes) for one model, measured side by
side in one run (benchmarks/timing.py: the two take turns in blocks, so machine noise hits
both alike).

Default: detr_r50 (random weights: latency does not depend on them), 640x640, batch 1,
2 threads, a real letterboxed photo when ../shared/data is present.

It also prints the floor: the model's FLOPs (torch.utils.flop_counter) over this
machine's FP32 matrix-multiply rate (benchmarks/floor.py), so a ratio can be read
against what the hardware allows.

    .venv/bin/python benchmarks/ort_vs_torch.py [--preset detr_r50] [--imgsz 640] [--iters 20] [--threads 2]
"""
import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import onnxruntime
import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.floor import gemm_rate  # noqa: E402
from benchmarks.timing import describe, interleaved  # noqa: E402
from detr_edge.export.onnx_export import ExportOptions, export_onnx  # noqa: E402
from detr_edge.runtime.backends.ort import OnnxRuntimeBackend  # noqa: E402
from detr_edge.runtime.metadata import parse_imgsz, preprocess_spec  # noqa: E402
from detr_edge.runtime.preprocess import preprocess  # noqa: E402
from detr_edge.train.config import checkpoint_config, preset  # noqa: E402
from detr_edge.train.detr import DETR  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="detr_r50")
    parser.add_argument("--imgsz", default="640")
    parser.add_argument("--iters", type=int, default=20, help="timed runs of each")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    imgsz = parse_imgsz(args.imgsz)
    config, _ = preset(args.preset)
    torch.manual_seed(0)
    model = DETR(config).eval()
    photos = sorted((ROOT.parent / "shared" / "data" / "coco-tiny" / "val2017").glob("*.jpg"))
    frame = cv2.imread(str(photos[0])) if photos else np.random.default_rng(0).integers(0, 255, (480, 640, 3), np.uint8)
    batch = preprocess([frame], preprocess_spec(imgsz))
    images, mask = torch.from_numpy(batch.images), torch.from_numpy(batch.mask)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(model, checkpoint_config(config, imgsz, None), path, ExportOptions(imgsz=imgsz))
        backend = OnnxRuntimeBackend(path, providers=["CPUExecutionProvider"], threads=args.threads)
        with torch.no_grad():
            ref = model(images, mask)["pred_logits"].numpy()
        error = float(np.abs(backend.infer(batch.images, batch.mask)["logits"] - ref).max())

        def pytorch():
            with torch.no_grad():
                model(images, mask)
        times = interleaved({"pytorch": pytorch, "onnxruntime": lambda: backend.infer(batch.images, batch.mask)},
                            args.iters)
    median = {k: statistics.median(v) * 1000 for k, v in times.items()}
    print(f"{args.preset} {imgsz[0]}x{imgsz[1]} batch 1, {args.threads} threads, {args.iters} runs each in turns "
          f"(torch {torch.__version__}, onnxruntime {onnxruntime.__version__}); max |logits diff| {error:.2e}")
    for name in median:
        print(f"  {name:12s} {describe(times[name])}")
    print(f"  onnxruntime speed-up over PyTorch eager: {median['pytorch'] / median['onnxruntime']:.2f}x")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(images, mask)
    gflop, rate = counter.get_total_flops() / 1e9, gemm_rate(args.threads)
    print(f"  floor: {gflop:.1f} GFLOP at this machine's FP32 MatMul rate of {rate:.0f} GFLOP/s = "
          f"{gflop / rate * 1000:.0f} ms; onnxruntime runs at {gflop / median['onnxruntime'] * 1000:.0f} GFLOP/s "
          f"({gflop / rate * 1000 / median['onnxruntime']:.0%} of it), PyTorch eager at "
          f"{gflop / median['pytorch'] * 1000:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
