"""`detr-edge`: one command line over the stages (the train stage's commands are in
train_cli.py). Only argparse and the error type are imported up front, so `--help` and the
runtime commands never pay for (or need) torch."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import signal
import sys
import threading
from pathlib import Path

from detr_edge.runtime.errors import UserError
from detr_edge import train_cli

# a missing optional dependency -> the extra that brings it
_EXTRAS = {"torch": "train", "torchvision": "train", "safetensors": "train", "matplotlib": "train",
           "onnx": "export", "onnxslim": "export", "onnxruntime": "onnxruntime", "pycocotools": "calibration",
           "tensorrt": "tensorrt", "polygraphy": "tensorrt"}


def _register(sub) -> None:
    from detr_edge.export.trt_plan import TARGETS
    p = sub.add_parser("export", help="(export) checkpoint -> ONNX (FP32, and FP16 with LayerNorm/Softmax kept FP32)")
    p.add_argument("checkpoint", help="ours, the official release's, or a Hugging Face DETR folder")
    p.add_argument("--out", help="ONNX file to write (default: beside the checkpoint, <name>.onnx; "
                                 "FP16 as <name>.fp16.onnx)")
    p.add_argument("--imgsz", help="input size H x W or S, multiples of 32 (default: the checkpoint's)")
    batch = p.add_mutually_exclusive_group()
    batch.add_argument("--batch", type=int, default=1, help="fixed batch size (default 1)")
    batch.add_argument("--dynamic-batch", action="store_true", help="batch dimension left free")
    p.add_argument("--target", choices=list(TARGETS), default="ort",
                   help="the consumer; picks the opset: 16 for trt8.5 (LayerNorm decomposed), 17 otherwise")
    p.add_argument("--opset", type=int, help="override the target's opset (checked against what it parses)")
    p.add_argument("--postprocess", action="store_true",
                   help="add in-graph postprocessing: outputs scores, labels, boxes_xyxy (input pixels), top-k")
    p.add_argument("--max-det", type=int, default=100, help="K of the in-graph top-k (default 100, at most N)")
    p.add_argument("--precision", default="fp32", help="comma list of fp32, fp16 (default fp32)")
    p.add_argument("--keep-fp32-ops", help="FP16: op types kept FP32 (default LayerNormalization,Softmax)")
    p.add_argument("--keep-fp32-names", help="FP16: node-name substrings kept FP32 "
                                             "(default /norm,/backbone.1/,/detections/)")
    p.set_defaults(func=_export)

    p = sub.add_parser("check", help="accuracy of model files against a reference (the PyTorch checkpoint, or any "
                                     "model file): tensors, detections, COCO AP, pass/fail gate")
    p.add_argument("reference", nargs="?", help="the reference: a checkpoint (PyTorch), .onnx or .engine")
    p.add_argument("--reference", dest="reference_option", metavar="REFERENCE", help="the same, as an option")
    p.add_argument("--against", nargs="+", required=True, metavar="MODEL",
                   help="ONNX files and TensorRT engines (.engine, with their .engine.json) to check")
    p.add_argument("--data", required=True, help="image folder, COCO layout root, or instances json")
    p.add_argument("--split", default="val", help="split of a COCO layout root (default val)")
    p.add_argument("--contiguous-ids", action="store_true", help="the checkpoint was trained with contiguous ids")
    p.add_argument("--conf", type=float, default=0.5, help="score threshold of the detection level (default 0.5)")
    p.add_argument("--iou", type=float, default=0.5, help="IoU for two detections to agree (default 0.5)")
    p.add_argument("--limit", type=int, help="check only the first N images")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--allow-empty", action="store_true", help="a reference without a detection at --conf passes on "
                                                              "the other criteria (default: inconclusive, exit 1)")
    p.add_argument("--out", default="check-out", help="folder for report.json, report.md, deltas.png")
    p.set_defaults(func=_check)

    p = sub.add_parser("calibrate", help="(calibration) FP32 ONNX -> INT8 Q/DQ ONNX for TensorRT (*.int8.onnx) "
                                         "and for CPUs (*.int8-cpu.onnx), TensorRT calibration cache, report")
    p.add_argument("model", help="the FP32 .onnx written by detr-edge export")
    p.add_argument("--data", required=True, help="calibration images: a folder, a COCO json, or a video file")
    p.add_argument("--samples", type=int, default=256, help="frames to calibrate on (default 256)")
    p.add_argument("--every", type=int, default=1, help="video: take every k-th frame (default 1)")
    p.add_argument("--method", choices=["entropy", "percentile", "minmax"],
                   help="calibration ranges of both flavours (default: entropy for trt, as TensorRT's "
                        "EntropyCalibration2; minmax for cpu, as onnxruntime's quantize_static)")
    p.add_argument("--flavour", default="trt,cpu", help="comma list: trt (symmetric int8), cpu (uint8 activations)")
    p.add_argument("--exclude", help="node-name substrings kept float (default /bbox_embed/: the box head)")
    p.add_argument("--vnni", action="store_true", help="the CPU flavour runs only on CPUs with VNNI (AVX512-VNNI, "
                                                       "AVX-VNNI): 8-bit weights instead of the 7 that cannot "
                                                       "saturate onnxruntime's AVX2 kernels")
    p.add_argument("--val-data", help="held-out images for the AP of FP32 vs INT8 (COCO json/root: real AP; "
                                      "a folder: AP against the FP32 file's own detections)")
    p.add_argument("--val-limit", type=int, help="use only the first N held-out images")
    p.add_argument("--auto", action="store_true", help="sensitivity search: keep the most AP-costly node "
                                                       "groups float until the AP drop is within --max-ap-drop")
    p.add_argument("--max-ap-drop", type=float, default=1.0,
                   help="the target, in AP points against FP32 (default 1.0): with --val-data, a file that misses "
                        "it exits 1; with --auto, the search's goal")
    p.add_argument("--quantize-attention", action="store_true",
                   help="TensorRT flavour: also quantize the MatMuls between two activations (Q.K^T, softmax.V)")
    p.add_argument("--trt-version", help="also write <name>.calib.cache for trtexec --int8 --calib on this exact "
                                         "TensorRT version (e.g. 8.5.2, 8.6.2, 10.3.0: TensorRT ignores a cache "
                                         "whose header names another version)")
    p.set_defaults(func=_calibrate)

    p = sub.add_parser("build", help="(export) ONNX (fp32/fp16/int8) -> TensorRT engine + sidecar .engine.json")
    p.add_argument("model", help="model.onnx, model.fp16.onnx or model.int8.onnx")
    p.add_argument("--out", help="engine file (default: beside the ONNX, .engine)")
    p.add_argument("--workspace", type=float, default=4.0, help="GiB of builder workspace (default 4)")
    p.add_argument("--batch", help="min,opt,max batch of a dynamic-batch file's optimization profile (e.g. 1,4,8)")
    p.add_argument("--timing-cache", help="timing cache file: read if present, written after the build")
    p.add_argument("--dla", type=int, help="DLA core (Jetson Orin; FP16/INT8 files only)")
    p.add_argument("--gpu-fallback", action="store_true", help="with --dla: layers DLA cannot run go to the GPU")
    p.add_argument("--opt-level", type=int, choices=range(6), help="builder optimization level 0-5")
    p.add_argument("--weakly-typed", action="store_true",
                   help="TensorRT 10: weakly typed network with FP16/INT8 builder flags instead of STRONGLY_TYPED")
    p.add_argument("--legacy-int8-calibrator", action="store_true",
                   help="TensorRT 8.x/10.x: INT8 by implicit calibration of the FP32 file (needs --calib-data)")
    p.add_argument("--calib-data", help="images/COCO json/video for --legacy-int8-calibrator")
    p.add_argument("--calib-samples", type=int, default=256, help="frames for --legacy-int8-calibrator (default 256)")
    p.add_argument("--plan", action="store_true", help="print the plan the build applies (JSON: flags, FP32 layers, "
                                                       "profile, calibration, DLA) and build nothing; no TensorRT needed")
    p.add_argument("--trt-version", help="with --plan: the TensorRT version to plan for (default: the installed one)")
    p.set_defaults(func=_build)

    p = sub.add_parser("run", help="(runtime) real-time detection on a video, camera, stream or image folder")
    p.add_argument("model", help=".onnx or .engine (its metadata gives input size, classes, preprocessing); "
                                 "with --triton, the served model's name (deploy --triton writes 'detr')")
    p.add_argument("source", nargs="*", help="one or more: video file, camera index (0), rtsp:// or http:// URL, "
                                             "GStreamer pipeline, image folder; several are batched into one model")
    p.add_argument("--sources", help="a text file of sources, one a line (# comments), after those given")
    p.add_argument("--backend", choices=["auto", "onnxruntime", "tensorrt"], default="auto")
    p.add_argument("--triton", metavar="URL", help="run the model a Triton server serves (host:port for HTTP, "
                                                   "grpc://host:port for gRPC): detr-edge serve, deploy --triton")
    p.add_argument("--conf", type=float, default=0.5, help="score threshold (default 0.5)")
    p.add_argument("--classes", help="keep only these classes (names or ids, comma list)")
    p.add_argument("--show", action="store_true", help="show frames in a window (q or Esc quits)")
    p.add_argument("--save", help="annotated video file (.mp4); with several sources a folder, one video each")
    p.add_argument("--jsonl", help="detections per frame as JSON lines, each with its source")
    p.add_argument("--max-frames", type=int, help="stop after N frames of each source")
    p.add_argument("--batch", type=int, help="frames per inference call (default: the model's fixed batch, else one "
                                             "per source)")
    p.add_argument("--track", action="store_true", help="persistent ids per source (ByteTrack; the track extra)")
    p.add_argument("--strict", action="store_true", help="refuse to start unless every source opens")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds a stream (rtsp://, http://) may take to open or to send a frame (default 10)")
    p.add_argument("--reconnect", type=float, help="seconds a dropped live source is retried before it ends (default "
                                                   "30 for streams, 5 for cameras; inf: for ever)")
    p.set_defaults(func=_run)

    p = sub.add_parser("serve", help="(serving) NVIDIA Triton Inference Server on a deployment's model repository "
                                     "(deploy --triton), until Ctrl-C")
    p.add_argument("deploy_dir", help="the deploy --out folder (or its triton/ repository)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0: every interface)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.set_defaults(func=_serve)

    p = sub.add_parser("bench", help="(runtime) latency and throughput of a model alone, of the full "
                                     "pipeline over a source, and of N streams batched, in one run")
    p.add_argument("model")
    p.add_argument("--backend", choices=["auto", "onnxruntime", "tensorrt"], default="auto")
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--source", help="also run the whole pipeline over this source")
    p.add_argument("--max-frames", type=int, help="pipeline: at most N frames (of each stream)")
    p.add_argument("--streams", help="also N copies of --source batched against N single-stream pipelines run at "
                                     "once, for each N of a list (e.g. 1,2,4)")
    p.add_argument("--rounds", type=int, default=1, help="--streams: rounds, each N in turn (medians reported)")
    p.set_defaults(func=_bench)

    p = sub.add_parser("deploy", help="checkpoint -> FP32/FP16/INT8 ONNX (+ TensorRT engines on a GPU), "
                                      "each checked against PyTorch with a gate, benchmarked, reported")
    p.add_argument("checkpoint")
    p.add_argument("--imgsz", help="input size H x W or S (default: the checkpoint's)")
    p.add_argument("--precision", default="fp32,fp16,int8", help="comma list of fp32, fp16, int8")
    p.add_argument("--calib-data", help="INT8 calibration images: folder, COCO json or video")
    p.add_argument("--calib-samples", type=int, default=256)
    p.add_argument("--val-data", required=True, help="annotated set (COCO json/root) or image folder for the checks")
    p.add_argument("--target", choices=list(TARGETS), default="ort")
    p.add_argument("--fixed-batch", action="store_true", help="batch 1 files instead of dynamic batch")
    p.add_argument("--max-ap-drop", type=float, default=1.0, help="INT8 search target when INT8 fails its gate")
    p.add_argument("--triton", action="store_true", help="also write a Triton model repository (DIR/triton): the "
                                                         "raw networks and `detr`, the end-to-end detector")
    p.add_argument("--triton-instances", type=int, default=1, help="instances of the detector (default 1)")
    p.add_argument("--triton-threads", type=int, default=0, help="onnxruntime threads per instance (default 0: one "
                                                                 "per core; on a CPU server, 1 with an instance per core)")
    p.add_argument("--triton-max-batch", type=int, default=8, help="the detector's largest batch (default 8)")
    p.add_argument("--no-triton-dynamic-batching", action="store_true",
                   help="the detector runs each request as it comes (default: Triton batches concurrent requests)")
    p.add_argument("--out", default="deploy-out")
    p.set_defaults(func=_deploy)

    p = sub.add_parser("info", help="architecture, classes, parameters and input size of a "
                                    "checkpoint, ONNX file or engine")
    p.add_argument("file", help="checkpoint (.pth), Hugging Face DETR folder, .onnx, or .engine (its sidecar)")
    p.set_defaults(func=_info)


def _info(args) -> None:
    from .info import format_info, info
    print(format_info(info(args.file)))


def _split(text):
    return tuple(part.strip() for part in text.split(",") if part.strip()) if text else None


def _export(args) -> None:
    from pathlib import Path

    from detr_edge.runtime.metadata import parse_imgsz

    from detr_edge.calibration.precision import KEEP_FP32_NAMES, KEEP_FP32_OPS
    from detr_edge.export.fp16 import convert_fp16
    from detr_edge.export.onnx_export import ExportOptions, export_onnx, resolve_opset

    precisions = _split(args.precision)
    unknown = set(precisions or ()) - {"fp32", "fp16"}
    if not precisions or unknown:
        raise UserError(f"--precision {args.precision!r}: a comma list of fp32, fp16 (int8: detr-edge calibrate)")
    options = ExportOptions(imgsz=parse_imgsz(args.imgsz) if args.imgsz else None, batch=args.batch,
                            dynamic_batch=args.dynamic_batch, target=args.target, opset=args.opset,
                            postprocess=args.postprocess, max_det=args.max_det)
    resolve_opset(options.target, options.opset)  # refuse before the slow part
    if args.max_det < 1:
        raise UserError(f"--max-det {args.max_det} must be >= 1")
    from detr_edge.train.checkpoint import load_model
    from detr_edge.train.config import OFFICIAL_IMGSZ

    checkpoint = Path(args.checkpoint)
    model, config = load_model(checkpoint, imgsz=options.imgsz or OFFICIAL_IMGSZ)
    out = Path(args.out) if args.out else checkpoint.parent / f"{checkpoint.stem if checkpoint.is_file() else checkpoint.name}.onnx"
    if out.suffix != ".onnx":
        raise UserError(f"--out {out}: the file name must end in .onnx")
    export_onnx(model.eval(), config, out, options, source=checkpoint.name)
    try:
        if "fp16" in precisions:
            fp16 = out.with_suffix(".fp16.onnx")
            convert_fp16(out, fp16, _split(args.keep_fp32_ops) or KEEP_FP32_OPS,
                         _split(args.keep_fp32_names) or KEEP_FP32_NAMES)
            print(fp16)
    finally:
        if "fp32" not in precisions:  # only the FP16 file was asked for, whether or not it was made
            out.unlink()
    if "fp32" in precisions:
        print(out)


def _calibrate(args) -> None:
    from detr_edge.calibration.quantize import DEFAULT_EXCLUDE, QuantOptions

    from .calibrate import calibrate, markdown, misses

    flavours = _split(args.flavour)
    if not flavours or set(flavours) - {"trt", "cpu"}:
        raise UserError(f"--flavour {args.flavour!r}: a comma list of trt, cpu")
    options = QuantOptions(method=args.method, exclude=_split(args.exclude) or DEFAULT_EXCLUDE, vnni=args.vnni,
                           attention=args.quantize_attention)
    report = calibrate(args.model, args.data, flavours, args.samples, args.every, options, args.val_data,
                       args.auto, args.max_ap_drop, args.trt_version, args.val_limit)
    print(markdown(report))
    missed = misses(report)
    if missed:
        raise GateFailed("INT8 " + "; ".join(missed) + " (--auto keeps the costliest parts float until it is met)")


def _build(args) -> None:
    from detr_edge.export.trt_build import build
    from detr_edge.export.trt_plan import BuildOptions, plan

    batch = None
    if args.batch:
        try:
            batch = tuple(int(v) for v in args.batch.split(","))
        except ValueError:
            batch = ()
        if len(batch) != 3 or not 1 <= batch[0] <= batch[1] <= batch[2]:
            raise UserError(f"--batch {args.batch!r}: min,opt,max with 1 <= min <= opt <= max")
    if args.gpu_fallback and args.dla is None:
        raise UserError("--gpu-fallback goes with --dla")
    options = BuildOptions(workspace_gib=args.workspace, batch=batch, timing_cache=args.timing_cache, dla=args.dla,
                           gpu_fallback=args.gpu_fallback, opt_level=args.opt_level, weakly_typed=args.weakly_typed,
                           legacy_int8=args.legacy_int8_calibrator, calib_data=args.calib_data,
                           calib_samples=args.calib_samples)
    if args.plan:
        text = json.dumps(plan(args.model, args.trt_version or _installed_tensorrt(), options), indent=2)
        print(re.sub(r"\[([-\d\s,]+)\]", lambda m: f"[{', '.join(m[1].split())}]".replace(",,", ","), text))  # shapes on one line
        return
    if args.trt_version:
        raise UserError("--trt-version goes with --plan: a build uses the installed TensorRT")
    sidecar = build(args.model, args.out, options)
    print(f"{sidecar['engine']['precision']} engine for {sidecar['engine']['gpu']}, "
          f"TensorRT {sidecar['engine']['tensorrt_version']}")


def _installed_tensorrt() -> str:
    try:
        import tensorrt
    except ImportError:
        raise UserError("no TensorRT here: --plan needs --trt-version (e.g. 8.5.2 for JetPack 5, 10.3.0 for "
                        "JetPack 6.1/6.2)") from None
    return tensorrt.__version__


def _run(args) -> None:
    from detr_edge.runtime.run import run
    sources = args.source + (_source_list(args.sources) if args.sources else [])
    if not sources:
        raise UserError("run needs a source: a video, camera index, URL, pipeline or folder (or --sources FILE)")
    model = args.model
    if args.triton:
        from detr_edge.runtime.backends.triton import TritonClient
        model = TritonClient(args.triton, args.model, args.timeout)
    with contextlib.closing(model) if args.triton else contextlib.nullcontext():
        stats = run(model, sources if len(sources) > 1 else sources[0], args.backend, args.conf, args.classes,
                    args.show, args.save, args.jsonl, args.max_frames, timeout=args.timeout, batch=args.batch,
                    strict=args.strict, track=args.track, reconnect=args.reconnect)
    print(stats.format())
    for path in (args.save, args.jsonl):
        if path and os.path.exists(path):
            print(f"wrote {path}")
    if stats.interrupted:
        raise Stopped(stats.interrupted)
    if stats.failed:  # the others ran to their end; say which did not, and exit 1
        raise GateFailed(f"{len(stats.failed)} of {len(stats.sources)} sources failed: "
                         + "; ".join(s.error for s in stats.failed))


def _source_list(path: str) -> list:
    """--sources FILE: one source a line; blank lines and # comments skipped."""
    try:
        lines = open(path).read().splitlines()
    except OSError as exc:
        raise UserError(f"--sources {path}: {exc.strerror}") from None
    sources = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not sources:
        raise UserError(f"--sources {path}: no source in it")
    return sources


def _bench(args) -> None:
    from detr_edge.runtime.bench import bench, format_bench
    print(format_bench(bench(args.model, args.backend, args.iters, args.source, args.max_frames,
                             _counts(args.streams) if args.streams else None, args.rounds)))


def _counts(text: str) -> list:
    """--streams 1,2,4 -> [1, 2, 4]."""
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise UserError(f"--streams {text}: stream counts, e.g. 1,2,4")
    return counts


def _deploy(args) -> None:
    from detr_edge.runtime.metadata import parse_imgsz

    from .deploy import deploy, markdown
    summary = deploy(args.checkpoint, args.out, parse_imgsz(args.imgsz) if args.imgsz else None,
                     _split(args.precision) or (), args.calib_data, args.val_data, args.target, not args.fixed_batch,
                     args.calib_samples, args.max_ap_drop, args.triton,
                     triton_options=_detector_options(args) if args.triton else None)
    print(markdown(summary))
    print(f"report: {args.out}/report.md, report.json, report.html; steps run: {', '.join(summary['steps']['ran']) or 'none (all up to date)'}")
    if not summary["passed"]:
        failed = sorted({r["precision"] for r in summary["artifacts"] if not r["passed"]})
        raise GateFailed(f"deployment gate failed for {', '.join(failed)}")


def _detector_options(args):
    from .repository import DetectorOptions
    if args.triton_instances < 1 or args.triton_max_batch < 1 or args.triton_threads < 0:
        raise UserError("--triton-instances and --triton-max-batch: 1 or more; --triton-threads: 0 or more")
    return DetectorOptions(instances=args.triton_instances, max_batch=args.triton_max_batch,
                           dynamic_batching=not args.no_triton_dynamic_batching, threads=args.triton_threads)


def _serve(args) -> None:
    from .serve import serve
    repository = Path(args.deploy_dir)
    repository = repository / "triton" if (repository / "triton").is_dir() else repository
    serve(repository, args.host, args.http_port, args.grpc_port, args.metrics_port)


def _check(args) -> None:
    from .check import check, markdown

    if (args.reference is None) == (args.reference_option is None):
        raise UserError("check needs one reference: a checkpoint, .onnx or .engine, positional or --reference")
    report = check(args.reference or args.reference_option, args.against, args.data, split=args.split, conf=args.conf,
                   iou=args.iou, batch_size=args.batch_size, limit=args.limit, contiguous=args.contiguous_ids,
                   out=args.out, allow_empty=args.allow_empty)
    print(markdown(report))
    print(f"report: {args.out}/report.md, report.json, deltas.png")
    if not report["passed"]:
        failed = [f"{m['file']} ({m['gate']['verdict']}" + (f": {m['gate']['warning']}; --allow-empty accepts it)"
                                                            if m["gate"]["verdict"] == "inconclusive" else ")")
                  for m in report["models"] if not m["gate"]["passed"]]
        raise GateFailed(f"accuracy gate not passed: {', '.join(failed)}")


class GateFailed(Exception):
    """A command that ran and failed (a gate not passed, sources that failed while the
    others ran): exit code 1 (bad input is 2)."""


class Stopped(KeyboardInterrupt):
    """Stopped by a signal: exit 128 + its number, as a shell reports it (130 Ctrl-C, 143 SIGTERM)."""

    def __init__(self, number: int = signal.SIGINT):
        super().__init__(number)
        self.number = number


def _on_sigterm(number, frame):
    raise Stopped(number)


def _quiet_opencv() -> None:
    """OpenCV's own log lines (a missing camera prints a dozen) say less than our one line;
    OPENCV_LOG_LEVEL set by the user still wins."""
    os.environ.setdefault("OPENCV_LOG_LEVEL", "OFF")
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET
    log = getattr(getattr(sys.modules.get("cv2"), "utils", None), "logging", None)
    if log is not None:  # cv2 already imported (the Python API, tests): it read the level at import
        log.setLogLevel(getattr(log, "LOG_LEVEL_" + os.environ["OPENCV_LOG_LEVEL"].upper(), log.LOG_LEVEL_SILENT))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="detr-edge", description="DETR from checkpoint to real-time "
                                     "detection on NVIDIA GPUs and Jetson. Stages in brackets.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train_cli.register(sub)
    _register(sub)
    return parser


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="detr-edge: %(message)s")
    _quiet_opencv()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "run" and not any(e.startswith("-") for e in extra):
        args.source += extra  # sources after options (`run m.onnx a.mp4 --save out/ b.mp4`): argparse leaves them
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None  # systemd, docker stop
    try:
        args.func(args)
    except UserError as exc:
        print(f"detr-edge: error: {exc}", file=sys.stderr)
        return 2
    except GateFailed as exc:
        print(f"detr-edge: {exc}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as exc:
        root = (exc.name or "").split(".")[0]
        if root not in _EXTRAS:
            raise
        print(f"detr-edge: error: '{args.command}' needs {root}: pip install 'detr-edge[{_EXTRAS[root]}]'",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        number = getattr(exc, "number", signal.SIGINT)
        print(f"detr-edge: stopped by {signal.Signals(number).name}", file=sys.stderr)
        return 128 + number
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
