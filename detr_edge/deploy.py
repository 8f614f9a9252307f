"""`detr-edge deploy`: checkpoint -> every requested precision, checked, with a gate.

export -> FP16 ONNX -> INT8 (calibrated; the sensitivity search when INT8 fails its gate)
-> TensorRT engines when TensorRT and a GPU are here -> check every artifact against
PyTorch -> bench every artifact -> DIR/report.md, report.json, report.html.

Resumable: each step records the fingerprint of what it consumed (file hashes, options,
and the environment that can change its output: the versions of detr-edge, torch,
onnxruntime and TensorRT, and the GPU) in DIR/deploy-state.json; a rerun skips every step
whose outputs exist and whose fingerprint did not change. Each artifact is loaded once.
"""
from __future__ import annotations

import contextlib
import hashlib
import html
import json
import logging
from dataclasses import asdict
from pathlib import Path

from detr_edge.repository import DetectorOptions, write_triton
from detr_edge.runtime.errors import UserError
from detr_edge.runtime.io import atomic_path, write_json

log = logging.getLogger(__name__)
SUFFIX = {"fp32": ".onnx", "fp16": ".fp16.onnx", "int8": ".int8.onnx", "int8-cpu": ".int8-cpu.onnx"}


def _digest(path: Path) -> str:
    if path.is_dir():
        return hashlib.sha256("".join(sorted(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
                                             for p in path.rglob("*") if p.is_file())).encode()).hexdigest()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def environment() -> dict:
    """What changes a step's output besides its inputs and options."""
    import onnxruntime
    import torch

    from detr_edge import __version__
    from detr_edge.runtime.cuda import device_info
    env = {"detr_edge": __version__, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
           "tensorrt": None, "gpu": None}
    with contextlib.suppress(Exception):  # no TensorRT, no GPU: None
        env["tensorrt"] = __import__("tensorrt").__version__
    with contextlib.suppress(Exception):
        env["gpu"] = device_info()["gpu"]
    return env


class Steps:
    """Fingerprinted steps: `run(name, inputs, options, outputs, body)` calls `body` only
    when an output is missing or an input, an option or the environment changed since the
    last run."""

    def __init__(self, state_path: Path, env: dict):
        self.path, self.env = state_path, env
        self.state = json.loads(state_path.read_text()) if state_path.exists() else {}
        self.ran, self.skipped = [], []

    def run(self, name: str, inputs: list, options: dict, outputs: list, body):
        key = hashlib.sha256(json.dumps({"inputs": [_digest(Path(p)) for p in inputs], "options": options,
                                         "environment": self.env}, sort_keys=True, default=str).encode()).hexdigest()
        if self.state.get(name, {}).get("key") == key and all(Path(p).exists() for p in outputs):
            self.skipped.append(name)
            return self.state[name].get("result")
        result = body()
        self.state[name] = {"key": key, "result": result}
        write_json(self.path, self.state)
        self.ran.append(name)
        return result


def deploy(checkpoint, out, imgsz=None, precisions=("fp32", "fp16", "int8"), calib_data=None, val_data=None,
           target: str = "ort", dynamic_batch: bool = True, calib_samples: int = 256, max_ap_drop: float = 1.0,
           triton: bool = False, bench_iters: int = 30, triton_options: DetectorOptions | None = None) -> dict:
    """`triton`: also a Triton model repository (DIR/triton): the raw networks, and `detr`,
    the end-to-end detector on the fastest artifact that passed its gate (`triton_options`)."""
    checkpoint, out = Path(checkpoint), Path(out)
    if not checkpoint.exists():
        raise UserError(f"{checkpoint}: no such file")
    unknown = set(precisions) - {"fp32", "fp16", "int8"}
    if unknown or not precisions:
        raise UserError(f"--precision: a comma list of fp32, fp16, int8 (not {', '.join(sorted(unknown))})")
    if "int8" in precisions and not calib_data:
        raise UserError("int8 needs --calib-data (images, a COCO json or a video)")
    if not val_data:
        raise UserError("--val-data is needed: every artifact is checked against PyTorch on it")
    out.mkdir(parents=True, exist_ok=True)
    with Loaded() as loaded:
        return _deploy(checkpoint, out, Steps(out / "deploy-state.json", environment()), loaded, imgsz, precisions,
                       calib_data, val_data, target, dynamic_batch, calib_samples, max_ap_drop,
                       triton and (triton_options or DetectorOptions()), bench_iters)


class Loaded(contextlib.ExitStack):
    """Each artifact loaded once (`get`), closed at the end or when its file is remade (`forget`)."""

    def __init__(self):
        super().__init__()
        self.backends: dict[Path, object] = {}

    def get(self, path):
        from .check import load_reference
        path = Path(path)
        if path not in self.backends:
            self.backends[path] = self.enter_context(load_reference(path))
        return self.backends[path]

    def forget(self, paths) -> None:
        for path in map(Path, paths):
            if path in self.backends:
                self.backends.pop(path).close()


def _deploy(checkpoint: Path, out: Path, steps: Steps, loaded: Loaded, imgsz, precisions, calib_data, val_data,
            target, dynamic_batch, calib_samples, max_ap_drop, triton, bench_iters) -> dict:
    from detr_edge.export.fp16 import convert_fp16
    from detr_edge.export.onnx_export import ExportOptions, export_onnx

    from .calibrate import calibrate
    from .check import TOLERANCES, check

    model = out / "model.onnx"

    def do_export():
        from detr_edge.train.checkpoint import load_model
        from detr_edge.train.config import OFFICIAL_IMGSZ
        net, config = load_model(checkpoint, imgsz=imgsz or OFFICIAL_IMGSZ)
        export_onnx(net.eval(), config, model, ExportOptions(imgsz=imgsz, dynamic_batch=dynamic_batch, target=target),
                    source=checkpoint.name)
    steps.run("export", [checkpoint], {"imgsz": imgsz, "target": target, "dynamic_batch": dynamic_batch}, [model],
              do_export)
    artifacts = {"fp32": model}
    if "fp16" in precisions:
        artifacts["fp16"] = model.with_suffix(".fp16.onnx")
        steps.run("fp16", [model], {}, [artifacts["fp16"]], lambda: convert_fp16(model, artifacts["fp16"]) and None)
    int8_note = None
    if "int8" in precisions:
        artifacts["int8"] = model.with_suffix(".int8.onnx")
        artifacts["int8-cpu"] = model.with_suffix(".int8-cpu.onnx")
        steps.run("int8", [model, calib_data], {"samples": calib_samples}, [artifacts["int8"], artifacts["int8-cpu"]],
                  lambda: calibrate(loaded.get(model), calib_data, samples=calib_samples, load=loaded.get) and None)
    engines = _engines(steps, artifacts, precisions)
    files = list(artifacts.values()) + list(engines.values())

    def do_check():  # a model detecting nothing at 0.5 is judged on AP and tensors: the report says so
        return check(loaded.get(checkpoint), [loaded.get(f) for f in files], val_data, out=out / "check",
                     allow_empty=True)
    report = steps.run("check", [checkpoint, val_data, *files], {"tolerances": TOLERANCES}, [out / "check" / "report.json"],
                       do_check)
    failed = {m["file"] for m in report["models"] if not m["gate"]["passed"]}
    if "int8" in precisions and failed & {artifacts["int8"].name, artifacts["int8-cpu"].name}:
        log.warning("INT8 failed its gate (%s): running the sensitivity search", ", ".join(sorted(failed)))
        loaded.forget([artifacts["int8"], artifacts["int8-cpu"]])
        steps.run("int8-search", [model, calib_data, val_data], {"samples": calib_samples, "max_ap_drop": max_ap_drop},
                  [artifacts["int8"], artifacts["int8-cpu"]],
                  lambda: calibrate(loaded.get(model), calib_data, samples=calib_samples, val_data=val_data, auto=True,
                                    max_ap_drop=max_ap_drop, against_fp32=True, load=loaded.get) and None)
        loaded.forget(engines.values())
        engines = _engines(steps, artifacts, precisions)
        files = list(artifacts.values()) + list(engines.values())
        report = steps.run("check-after-search", [checkpoint, val_data, *files], {"tolerances": TOLERANCES},
                           [out / "check" / "report.json"], do_check)
        still = {m["file"] for m in report["models"] if not m["gate"]["passed"]}
        int8_note = ("INT8 failed its gate; the sensitivity search recovered it (model.int8.report.md lists "
                     "what it keeps float)" if not still & failed else
                     "INT8 failed its gate; the sensitivity search did not bring it within the gate")
    latency = steps.run("bench", files, {"iters": bench_iters}, files,
                        lambda: {Path(f).name: _latency(loaded.get(f), bench_iters) for f in files})
    samples = steps.run("samples", [checkpoint, val_data, *files], {}, [out / "samples"],
                        lambda: _samples(loaded.get(checkpoint), [loaded.get(f) for f in files], val_data,
                                         out / "samples"))
    summary = _summary(report, checkpoint, latency, artifacts, engines, int8_note)
    summary["samples"] = samples
    summary["steps"] = {"ran": steps.ran, "skipped": steps.skipped}
    if triton:
        every = {**artifacts, **engines}
        served = served_artifact(summary["artifacts"])
        summary["triton"] = steps.run("triton", list(every.values()), {"served": Path(served).name, **asdict(triton)},
                                      [out / "triton"],
                                      lambda: str(write_triton(out / "triton", every, loaded.get, served, triton)))
        summary["triton_served"] = served
    write_json(out / "report.json", summary)
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(markdown(summary))
    _html(out, summary)
    return summary


def served_artifact(rows: list) -> str:
    """The artifact the end-to-end detector serves: the fastest that passed its gate (an
    engine where there is one), FP32 if none passed."""
    passed = [r for r in rows if r["passed"]]
    pool = [r for r in passed if r["file"].endswith((".engine", ".plan"))] or passed
    return min(pool, key=lambda r: r["latency_p50_ms"])["file"] if pool else rows[0]["file"]


def _engines(steps: Steps, artifacts: dict, precisions) -> dict:
    """Engines of the TensorRT-bound files when TensorRT and a GPU are here; {} otherwise."""
    try:
        import tensorrt  # noqa: F401
        from detr_edge.runtime.cuda import device_info
        device_info()
    except Exception:
        log.warning("TensorRT or a GPU is missing here: stopping at the ONNX files (build engines with "
                    "detr-edge build on the target)")
        return {}
    from detr_edge.export.trt_build import build
    from detr_edge.export.trt_plan import engine_path
    engines = {}
    for precision in ("fp32", "fp16", "int8"):
        if precision in precisions:
            source = artifacts[precision]
            engines[f"{precision} engine"] = engine_path(source)
            steps.run(f"build {precision}", [source], {}, [engine_path(source)], lambda s=source: build(s) and None)
    return engines


def _latency(engine, iters: int) -> dict:
    from detr_edge.runtime.bench import alone, noise_frame
    return alone(engine, [noise_frame(engine)], iters)


def _samples(reference, backends: list, val_data, folder: Path, count: int = 3, conf: float = 0.5) -> list[str]:
    """A few validation images annotated by the reference (PyTorch) and by each artifact, side by side."""
    from detr_edge.runtime.coco import Images
    return [_sample(path, [reference, *backends], folder, conf) for path in Images.load(val_data, limit=count).paths]


def _sample(path: Path, backends: list, folder: Path, conf: float) -> str:
    """Each backend's detections on one image, side by side, as a jpg in `folder`."""
    import cv2
    import numpy as np

    from detr_edge.runtime.draw import draw_detections
    from detr_edge.runtime.io import read_image
    from detr_edge.runtime.preprocess import preprocess

    frame = read_image(path)
    tiles = []
    for backend in backends:
        tile = draw_detections(frame, backend.detect(preprocess([frame], backend.spec), conf)[0], backend.classes)
        cv2.putText(tile, backend.name, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
        tiles.append(tile)
    target = folder / f"{path.stem}.jpg"
    with atomic_path(target) as tmp:
        cv2.imwrite(str(tmp), np.hstack(tiles))
    return str(target.relative_to(folder.parent))


def _summary(report: dict, checkpoint: Path, latency: dict, artifacts: dict, engines: dict, int8_note) -> dict:
    rows = []
    by_file = {m["file"]: m for m in report["models"]}
    for kind, path in {**artifacts, **engines}.items():
        m = by_file[Path(path).name]
        rows.append({"artifact": kind, "file": str(path), "precision": m["precision"],
                     "AP": m.get("coco", {}).get("AP"), "AP_delta": m.get("coco", {}).get("AP_delta"),
                     "agreement": m["detections"]["agreement"], "detections": m["detections"]["reference"],
                     "latency_p50_ms": latency[Path(path).name]["p50_ms"],
                     "MiB": round(Path(path).stat().st_size / 2**20, 2), "passed": m["gate"]["passed"],
                     "failures": m["gate"]["failures"]})
    return {"checkpoint": str(checkpoint), "data": report["data"], "pytorch": report["reference"]["AP"],
            "artifacts": rows, "int8": int8_note, "engines": bool(engines),
            "passed": all(r["passed"] for r in rows)}


def markdown(summary: dict) -> str:
    pytorch = "; ".join(f"{k}: AP {100 * v['AP']:.2f}" for k, v in summary["pytorch"].items())
    lines = [f"Deployment of `{summary['checkpoint']}`, checked on `{summary['data']}` (PyTorch {pytorch}).", "",
             "| artifact | file | AP | AP delta | agreement | latency p50 (ms, this machine) | MiB | gate |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in summary["artifacts"]:
        ap = "n/a" if r["AP"] is None else f"{r['AP']:.2f}"
        delta = "n/a" if r["AP_delta"] is None else f"{r['AP_delta']:+.2f}"
        verdict = "pass" if r["passed"] else "**FAIL**: " + "; ".join(r["failures"])
        agreement = (f"{r['agreement']:.1%} of {r['detections']}" if r["detections"]
                     else "n/a: PyTorch detects nothing at 0.5")
        lines.append(f"| {r['artifact']} | {Path(r['file']).name} | {ap} | {delta} | {agreement} | "
                     f"{r['latency_p50_ms']:.1f} | {r['MiB']} | {verdict} |")
    if not any(r["detections"] for r in summary["artifacts"]):
        lines += ["", "PyTorch makes no detection at score >= 0.5 on these images: the detection level of the "
                      "gate proves nothing here; the verdicts rest on AP (and FP32's tensor errors)."]
    if not summary["engines"]:
        lines += ["", "No TensorRT engines: TensorRT or a GPU is missing here (build them on the target with "
                      "`detr-edge build`)."]
    if summary["int8"]:
        lines += ["", summary["int8"] + "."]
    if summary.get("triton"):
        lines += ["", f"Triton model repository: `{summary['triton']}` (the end-to-end detector `detr` runs "
                      f"`{Path(summary['triton_served']).name}`; `detr-edge serve` serves it)."]
    return "\n".join(lines) + "\n"


def _html(out: Path, summary: dict) -> None:
    """report.html: the table, AP and latency per artifact, the checker's delta plot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = summary["artifacts"]
    names = [r["artifact"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    left.bar(names, [r["AP"] or 0 for r in rows])
    left.set(title="AP per artifact (points)")
    right.bar(names, [r["latency_p50_ms"] for r in rows])
    right.set(title="latency p50 (ms, this machine)")
    fig.tight_layout()
    with atomic_path(out / "report.png") as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)
    table = markdown(summary).split("\n\n", 1)
    body = "".join(f"<tr>{''.join(f'<td>{html.escape(c.strip())}</td>' for c in line.strip('|').split('|'))}</tr>"
                   for line in table[1].splitlines() if line.startswith("|") and "---" not in line)
    page = (f"<html><head><meta charset='utf-8'><title>detr-edge deployment</title></head><body>"
            f"<h1>detr-edge deployment</h1><p>{html.escape(table[0])}</p><table border='1'>{body}</table>"
            f"<img src='report.png'><h2>Detections matched to PyTorch</h2><img src='check/deltas.png'>"
            f"<h2>Sample images at score &gt;= 0.5: PyTorch, then each artifact</h2>"
            + "".join(f"<p><img src='{html.escape(p)}'></p>" for p in summary.get("samples", []))
            + "</body></html>")
    with atomic_path(out / "report.html") as tmp:
        tmp.write_text(page)
