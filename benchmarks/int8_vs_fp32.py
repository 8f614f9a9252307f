"""Median latency of onnxruntime FP32 versus the CPU-flavour INT8 file (uint8 activations,
int8 per-channel weights) and the TensorRT-flavour INT8 file (symmetric int8, run here by
onnxruntime as a stand-in), side by side in one run (benchmarks/timing.py: the files take
turns in blocks, so machine noise hits all alike). With `--val-data` (annotated), the
COCO AP of the very files timed is printed beside their latency.

Models: a checkpoint (`--checkpoint`, e.g. the demo's best.pth) or a preset with random
weights (`--preset`; latency does not depend on the weights). Calibration frames: coco-tiny
photos from ../shared/data when present, else `--calib-data`.

    .venv/bin/python benchmarks/int8_vs_fp32.py --preset detr_r50 --imgsz 640
    .venv/bin/python benchmarks/int8_vs_fp32.py --checkpoint demo-out/train/best.pth --calib-data demo-out/data/train \
        --samples 128 --val-data demo-out/data/annotations/instances_val.json
"""
import argparse
import logging
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.floor import gemm_rate  # noqa: E402
from benchmarks.timing import describe, interleaved  # noqa: E402
from detr_edge.calibration.data import Samples  # noqa: E402
from detr_edge.calibration.quantize import QuantOptions, quantize  # noqa: E402
from detr_edge.check import coco_ap  # noqa: E402
from detr_edge.runtime.coco import Images  # noqa: E402
from detr_edge.export.onnx_export import ExportOptions, export_onnx  # noqa: E402
from detr_edge.runtime.backends.ort import OnnxRuntimeBackend  # noqa: E402
from detr_edge.runtime.metadata import parse_imgsz  # noqa: E402
from detr_edge.train.checkpoint import load_model  # noqa: E402
from detr_edge.train.config import checkpoint_config, preset  # noqa: E402
from detr_edge.train.detr import DETR  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", default="detr_r50")
    source.add_argument("--checkpoint")
    parser.add_argument("--imgsz", help="default: the checkpoint's, or 640 for a preset")
    parser.add_argument("--calib-data", default=str(ROOT.parent / "shared" / "data" / "coco-tiny" / "val2017"))
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--val-data", help="annotated set (COCO json or root): also print each file's AP")
    parser.add_argument("--iters", type=int, default=60, help="timed runs per file")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    if args.checkpoint:
        model, config = load_model(args.checkpoint)
        name = Path(args.checkpoint).name
    else:
        model_config, _ = preset(args.preset)
        torch.manual_seed(0)
        model, config, name = DETR(model_config), checkpoint_config(model_config, parse_imgsz(args.imgsz or "640"), None), args.preset
    imgsz = parse_imgsz(args.imgsz) if args.imgsz else tuple(config["preprocess"]["imgsz"])
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "model.onnx"
        export_onnx(model.eval(), config, fp32, ExportOptions(imgsz=imgsz))
        files = {"fp32": fp32}
        for flavour, suffix in (("cpu", ".int8-cpu.onnx"), ("trt", ".int8.onnx")):
            cache = Path(tmp) / f"ranges-{flavour}.json"  # each flavour's default method
            files[f"int8 {flavour}"] = fp32.with_suffix(suffix)
            reader = Samples(args.calib_data, {**config["preprocess"], "imgsz": list(imgsz)}, args.samples,
                             progress=False)
            quantize(fp32, files[f"int8 {flavour}"], flavour, QuantOptions(), cache, reader)
        backends = {k: OnnxRuntimeBackend(p, providers=["CPUExecutionProvider"], threads=args.threads)
                    for k, p in files.items()}
        sizes = {k: p.stat().st_size / 2**20 for k, p in files.items()}
        ap = {}
        if args.val_data:
            val = Images.load(args.val_data)
            ap = {k: coco_ap(b, val) for k, b in backends.items()}
            ap = {k: f"  AP {v:.2f} ({v - ap['fp32']:+.2f})" for k, v in ap.items()}
        rng = np.random.default_rng(0)
        images = rng.standard_normal((1, 3, *imgsz), dtype=np.float32)
        mask = np.zeros((1, *imgsz), bool)
        times = interleaved({k: lambda b=b: b.infer(images, mask) for k, b in backends.items()}, args.iters)
    median = {k: statistics.median(v) for k, v in times.items()}
    print(f"{name} {imgsz[0]}x{imgsz[1]} batch 1, {args.threads} threads, {args.iters} runs each in turns, "
          f"onnxruntime CPU, {args.samples} calibration samples")
    for key, value in median.items():
        print(f"  {key:9s} {describe(times[key])}  {sizes[key]:6.1f} MiB  speed-up over fp32 "
              f"{median['fp32'] / value:.2f}x{ap.get(key, '')}")
    fp32_rate, int8_rate = gemm_rate(args.threads, "fp32"), gemm_rate(args.threads, "int8")
    print(f"  this CPU's GEMM (onnxruntime, 2048^3): FP32 {fp32_rate:.0f} GFLOP/s, INT8 {int8_rate:.0f} GOP/s: "
          f"INT8 arithmetic alone is {int8_rate / fp32_rate:.2f}x FP32's")


if __name__ == "__main__":
    main()
