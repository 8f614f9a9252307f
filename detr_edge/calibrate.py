"""`detr-edge calibrate`: a calibration pass over the data per method (by default two:
entropy for TensorRT, min-max for the CPU) -> the TensorRT-flavour and CPU-flavour Q/DQ
files, the TensorRT implicit-calibration cache, optionally the sensitivity search, and a
report (JSON + Markdown) with file sizes, AP and latency of FP32 against INT8. The pieces
live in calibration/; this wires them to the checker's AP."""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from detr_edge.calibration.data import Samples
from detr_edge.calibration.quantize import FLAVOURS, QuantOptions, ensure_ranges, quantize
from detr_edge.calibration.search import latency_ms, search
from detr_edge.calibration.trt_cache import scales_from_ranges, version_tag, write_cache
from detr_edge.runtime.backends import load_backend
from detr_edge.runtime.errors import UserError
from detr_edge.runtime.io import atomic_path, write_json

from detr_edge.runtime.coco import Images

from .check import coco_ap, pseudo_labelled

log = logging.getLogger(__name__)


def calibrate(model, data, flavours=("trt", "cpu"), samples: int = 256, every: int = 1,
              options: QuantOptions | None = None, val_data=None, auto: bool = False, max_ap_drop: float = 1.0,
              trt_version: str | None = None, val_limit: int | None = None, against_fp32: bool = False,
              load=None) -> dict:
    """`model`: the FP32 .onnx file, or its loaded backend. `against_fp32`: measure AP against
    the FP32 file's own detections even on annotated data (what `deploy` gates on:
    agreement with the reference, not task accuracy). `trt_version` (full, e.g. 8.5.2):
    also write trtexec's implicit-calibration cache for it. Each file is loaded once, by
    `load(path) -> backend` when given (deploy's), and closed by whoever loaded it."""
    if trt_version is not None:
        version_tag(trt_version)  # refuse a bad version before the slow part
    with contextlib.ExitStack() as loaded:
        load = load or (lambda path: loaded.enter_context(load_backend(path)))
        fp32 = load(model) if isinstance(model, (str, Path)) else model
        return _calibrate(fp32, data, flavours, samples, every, options, val_data, auto, max_ap_drop, trt_version,
                          val_limit, against_fp32, load)


def _calibrate(fp32, data, flavours, samples, every, options, val_data, auto, max_ap_drop, trt_version, val_limit,
               against_fp32, load) -> dict:
    from onnxruntime.quantization.calibrate import load_tensors_data

    model = fp32.path
    options = options or QuantOptions()
    if fp32.precision != "fp32":
        raise UserError(f"{model}: calibrate the FP32 file, not a {fp32.precision} one")
    if auto and val_data is None:
        raise UserError("--auto needs --val-data (held-out images to measure the AP on)")
    stem = model.with_suffix("")  # model.onnx -> model; trt8.5.onnx -> trt8.5 (not trt8)
    ranges = {flavour: ranges_file(stem, flavour, options) for flavour in FLAVOURS}
    cache = Path(f"{stem}.calib.cache")
    for path in set(ranges.values()):
        path.unlink(missing_ok=True)  # a fresh calibration each run: the ranges of these data
    reader = Samples(data, fp32.spec, samples, every, batch=fp32.batch or 1)
    report = {"model": str(model), "data": str(data), "method": {f: options.method_for(f) for f in flavours},
              "op_types": list(options.op_types),
              "exclude": list(options.exclude), "files": {}, "ap": {}, "latency_ms": {"fp32": latency_ms(fp32)},
              "max_ap_drop": max_ap_drop}
    evaluate = None
    if val_data is not None:
        images = Images.load(val_data, limit=val_limit)
        if images.coco is None or against_fp32:
            images = pseudo_labelled(fp32, images)
            report["ap_reference"] = "the FP32 file's own detections at score >= 0.5 (unannotated --val-data)"
        report["ap"]["fp32"] = coco_ap(fp32, images)

        def evaluate(backend):
            return coco_ap(backend, images)
    outs = {flavour: Path(f"{stem}{FLAVOURS[flavour]}") for flavour in flavours}
    for flavour, out in outs.items():
        if auto:
            ensure_ranges(model, ranges[flavour], options.method_for(flavour), reader)
            result = search(model, out, flavour, options, ranges[flavour], evaluate, report["ap"]["fp32"], max_ap_drop)
            report.setdefault("search", {})[flavour] = result
        else:  # a pass over the data unless the other flavour's method made these ranges
            quantize(model, out, flavour, options, ranges[flavour], reader)
        int8 = load(out)
        report["files"][flavour] = {"file": str(out), "MiB": round(out.stat().st_size / 2**20, 2),
                                    "excluded_nodes": int8.meta["export"]["int8"]["excluded_nodes"]}
        report["latency_ms"][f"int8 {flavour}"] = latency_ms(int8)
        if evaluate is not None:
            report["ap"][f"int8 {flavour}"] = evaluate(int8)
    report["samples"] = reader.count
    report["files"]["fp32"] = {"file": str(model), "MiB": round(model.stat().st_size / 2**20, 2)}
    cache.unlink(missing_ok=True)  # never a cache of earlier ranges beside these files
    report["trt_cache"] = None
    if trt_version is not None:
        ensure_ranges(model, ranges["trt"], options.method_for("trt"), reader)  # --flavour cpu: maybe absent
        write_cache(cache, scales_from_ranges(load_tensors_data(ranges["trt"]).data), trt_version)
        report["trt_cache"] = {"file": str(cache), "trt_version": trt_version}
    write_json(Path(f"{stem}.int8.report.json"), report)
    with atomic_path(Path(f"{stem}.int8.report.md")) as tmp:
        tmp.write_text(markdown(report))
    return report


def ranges_file(stem: Path, flavour: str, options: QuantOptions) -> Path:
    """`model.calib.json`: the TensorRT flavour's ranges (the trtexec cache's scales), and the
    CPU flavour's where both use one method; `model.calib-cpu.json` where they differ."""
    same = options.method_for("cpu") == options.method_for("trt")
    return Path(f"{stem}.calib.json" if flavour == "trt" or same else f"{stem}.calib-cpu.json")


def misses(report: dict) -> list[str]:
    """One line per INT8 file whose AP drop exceeds the target (needs --val-data's AP)."""
    base, target = report["ap"].get("fp32"), report["max_ap_drop"]
    return [f"{Path(report['files'][key.split()[-1]]['file']).name}: AP {ap:.2f}, {ap - base:+.2f} against FP32, "
            f"misses the target of -{target:g}" for key, ap in report["ap"].items()
            if key != "fp32" and base is not None and base - ap > target]


def markdown(report: dict) -> str:
    methods = ", ".join(f"{method} ({flavour})" for flavour, method in report["method"].items())
    rows = [f"INT8 calibration of `{report['model']}`: ranges {methods}, {report['samples']} samples "
            f"from `{report['data']}`, quantized op types {', '.join(report['op_types'])}.", "",
            "| file | size (MiB) | nodes kept float | AP | AP delta | latency (ms, this CPU) | speed-up |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    base_ap, base_ms = report["ap"].get("fp32"), report["latency_ms"]["fp32"]
    for key in ["fp32", *(f"int8 {f}" for f in report["files"] if f != "fp32")]:
        entry = report["files"][key.split()[-1]]
        ap = report["ap"].get(key)
        ms = report["latency_ms"][key]
        rows.append(f"| {Path(entry['file']).name} | {entry['MiB']} | {len(entry.get('excluded_nodes', []))} | "
                    f"{'n/a' if ap is None else f'{ap:.2f}'} | "
                    f"{'n/a' if ap is None or key == 'fp32' else f'{ap - base_ap:+.2f}'} | {ms:.1f} | "
                    f"{base_ms / ms:.2f}x |")
    if report["ap"]:
        missed = misses(report)
        rows += ["", f"Target: AP within {report['max_ap_drop']:g} of FP32 (--max-ap-drop): "
                 + ("met by every file." if not missed else "**missed**: " + "; ".join(missed) + ".")]
    for flavour, result in report.get("search", {}).items():
        rows += ["", f"Sensitivity search ({flavour}): target AP drop <= {result['max_drop']}; "
                 f"{'within' if result['within_target'] else 'NOT within'} target; kept float: "
                 f"{', '.join(result['kept_float_groups']) or 'nothing'}.", "",
                 "| kept float | AP | AP drop | latency (ms) |", "| --- | --- | --- | --- |"]
        rows += [f"| {', '.join(s['kept_float']) or 'nothing'} | {s['AP']:.2f} | {s['AP_drop']:+.2f} | "
                 f"{s['latency_ms']:.1f} |" for s in result["steps"]]
    return "\n".join(rows) + "\n"
