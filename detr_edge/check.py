"""`detr-edge check`: does a deployable file still compute what its reference computes?
The reference is the PyTorch checkpoint by default, or any other model file (the ONNX file
an engine was built from, say), as Polygraphy compares any runner with any other: both are
backends (runtime.backends; train.backend for PyTorch). Every model is fed the very same
preprocessed batches as the reference and compared at three levels:

- tensors: max/mean absolute and max relative error of each float output both have, by
  name (relative error is |a - b| / max(|b|, 1e-3), so near-zero values do not dominate);
- detections: at a score threshold, each model's detections are matched one-to-one to the
  reference's (same label, IoU >= --iou, Hungarian on IoU); agreement = matched / the
  larger of the two counts, plus mean IoU, score deltas, missing and extra detections;
- task: COCO AP/AP50 (pycocotools) of the reference and of each model over every query,
  when the data has annotations.

A gate per precision (TOLERANCES) turns that into pass/fail. No torch is needed unless the
reference is a checkpoint.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import numpy as np

from detr_edge.runtime.backends import ENGINE_SUFFIXES, load_backend
from detr_edge.runtime.coco import Images, coco_metrics, match_boxes, to_coco_results
from detr_edge.runtime.errors import UserError
from detr_edge.runtime.io import atomic_path, read_image, write_json
from detr_edge.runtime.postprocess import check_conf
from detr_edge.runtime.preprocess import preprocess

log = logging.getLogger(__name__)

REL_FLOOR = 1e-3
# Gate per precision. Tensor limits: max absolute error of the raw outputs; agreement: the
# fraction of detections matched at the threshold; ap_drop: |AP delta| in points (0-100).
TOLERANCES = {
    "fp32": {"logits_max_abs": 1e-3, "boxes_max_abs": 1e-4, "agreement": 0.99, "ap_delta": 0.1},
    # FP16 on the mean error, which a few unused queries' outliers do not move and a systematic
    # error (a wrong weight, a LayerNorm in FP16) does: measured 7e-4 (logits) and 8e-5 (boxes)
    # on the demo model, 0.011 on the test model's sharpened logits (docs/export.md)
    "fp16": {"logits_mean_abs": 0.05, "boxes_mean_abs": 2e-3, "agreement": 0.97, "ap_delta": 0.5},
    # INT8 moves scores by up to ~0.2 (measured on the demo model), so detections near the
    # threshold flip either way: AP is INT8's main criterion, agreement a looser one
    "int8": {"agreement": 0.80, "ap_delta": 1.0},
}


def load_reference(path, device: str = "cpu"):
    """A model file as a backend; anything else (a checkpoint, a Hugging Face folder) as
    PyTorch, which needs torch."""
    path = Path(path)
    if path.suffix in (".onnx", *ENGINE_SUFFIXES):
        return load_backend(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    from detr_edge.train.backend import TorchBackend
    return TorchBackend(path, device)


class Comparison:
    """Running statistics of one model against the reference."""

    def __init__(self, backend):
        self.backend = backend
        self.tensors: dict[str, dict] = {}
        self.matched = self.reference = self.candidate = 0
        self.ious: list[float] = []
        self.score_deltas: list[float] = []
        self.results: list[dict] = []

    def add_tensors(self, outputs: dict, references: dict) -> None:
        """The float outputs both have, by name; outputs of one name but other shapes are not
        the same model's (another class count, another output form): one clear error."""
        for name in (n for n in references if n in outputs and np.issubdtype(references[n].dtype, np.floating)):
            out, ref = outputs[name], references[name]
            if out.shape != ref.shape:
                raise UserError(f"{self.backend.name}: its output {name} is {list(out.shape)}, the reference's "
                                f"{list(ref.shape)}: not outputs of the same model")
            diff = np.abs(out.astype(np.float64) - ref.astype(np.float64))
            stats = self.tensors.setdefault(name, {"max_abs": 0.0, "sum_abs": 0.0, "count": 0, "max_rel": 0.0})
            stats["max_abs"] = max(stats["max_abs"], float(diff.max()))
            stats["max_rel"] = max(stats["max_rel"], float((diff / np.maximum(np.abs(ref), REL_FLOOR)).max()))
            stats["sum_abs"] += float(diff.sum())
            stats["count"] += diff.size

    def add_detections(self, det: dict, ref: dict, iou_threshold: float) -> None:
        self.reference += len(ref["scores"])
        self.candidate += len(det["scores"])
        rows, cols, ious = match_boxes(ref["boxes"], ref["labels"], det["boxes"], det["labels"], iou_threshold)
        self.matched += len(rows)
        self.ious += ious.tolist()
        self.score_deltas += (det["scores"][cols].astype(np.float64) - ref["scores"][rows]).tolist()

    def summary(self) -> dict:
        tensors = {name: {"max_abs": s["max_abs"], "mean_abs": s["sum_abs"] / max(s["count"], 1),
                          "max_rel": s["max_rel"]} for name, s in self.tensors.items()}
        larger = max(self.reference, self.candidate)
        deltas = np.abs(self.score_deltas) if self.score_deltas else np.zeros(1)
        return {"tensors": tensors, "detections": {
            "reference": self.reference, "candidate": self.candidate, "matched": self.matched,
            "missing": self.reference - self.matched, "extra": self.candidate - self.matched,
            "agreement": self.matched / larger if larger else 1.0,
            "mean_iou": float(np.mean(self.ious)) if self.ious else None,
            "score_delta_mean_abs": float(deltas.mean()), "score_delta_max_abs": float(deltas.max())}}


def gate(summary: dict, tolerances: dict) -> list[str]:
    """The failed criteria of one model, as readable lines (empty = passed)."""
    failures = []
    for name in ("logits", "boxes"):
        for stat in ("max_abs", "mean_abs"):
            limit = tolerances.get(f"{name}_{stat}")
            error = summary["tensors"].get(name, {}).get(stat)
            if limit is not None and error is not None and error > limit:
                failures.append(f"{name} {stat.replace('_', ' ')} error {error:.3g} > {limit:g}")
    agreement = summary["detections"]["agreement"]
    if agreement < tolerances["agreement"]:
        failures.append(f"detection agreement {agreement:.1%} < {tolerances['agreement']:.0%}")
    delta = summary.get("coco", {}).get("AP_delta")
    if delta is not None and abs(delta) > tolerances["ap_delta"]:
        failures.append(f"|AP delta| {abs(delta):.2f} points > {tolerances['ap_delta']:g}")
    return failures


def check(reference, models: list, data, device: str = "cpu", **options) -> dict:
    """Compare each model file (or Backend) with `reference` (a checkpoint, a model file or a
    Backend; `device`: PyTorch's); returns the report (written to `out`). What it loads it
    closes; `options` are `_check`'s."""
    with contextlib.ExitStack() as loaded:
        def load(item, loader):
            return loaded.enter_context(loader(item)) if isinstance(item, (str, Path)) else item
        ref = load(reference, lambda path: load_reference(path, device))
        return _check(ref, [load(m, load_backend) for m in models], data, **options)


def _check(reference, backends: list, data, split: str = "val", conf: float = 0.5, iou: float = 0.5,
           batch_size: int = 4, limit: int | None = None, contiguous: bool = False, out=None,
           tolerances: dict | None = None, allow_empty: bool = False) -> dict:
    """`allow_empty`: a reference without a detection at `conf` leaves the gate to the other
    criteria (else the verdict is inconclusive, and fails)."""
    check_conf(conf)
    for backend in backends:
        ours, theirs = backend.meta["model"].get("num_classes"), reference.meta["model"].get("num_classes")
        if ours != theirs:
            raise UserError(f"{backend.name} has {ours} classes, the reference {reference.name} {theirs}: "
                            "not the same model")
    images = Images.load(data, split, contiguous, limit)
    comparisons = [Comparison(b) for b in backends]
    reference_results: dict[tuple, list] = {}
    specs = {tuple(b.imgsz): b.spec for b in backends}
    for imgsz in specs:
        if not reference.fits(imgsz):
            raise UserError(f"the reference {reference.name} takes {reference.imgsz[0]} x {reference.imgsz[1]}, "
                            f"a model to check {imgsz[0]} x {imgsz[1]}: compare files of one input size")
    try:
        from tqdm import tqdm
        progress = tqdm(total=len(images.paths), desc="check", unit="img", disable=None)
    except ImportError:
        progress = None
    for start in range(0, len(images.paths), batch_size):
        frames = [read_image(p) for p in images.paths[start:start + batch_size]]
        ids = images.ids[start:start + batch_size]
        for imgsz, spec in specs.items():
            batch = preprocess(frames, spec)
            ref_outputs = reference.infer(batch.images, batch.mask)
            ref_all = reference.to_detections(ref_outputs, batch, conf=0.0)
            for image_id, det in zip(ids, ref_all):
                reference_results.setdefault(imgsz, []).extend(
                    to_coco_results(det, image_id, images.label_to_cat) if images.coco else [])
            for comparison in comparisons:
                if tuple(comparison.backend.imgsz) != imgsz:
                    continue
                outputs = comparison.backend.infer(batch.images, batch.mask)
                comparison.add_tensors(outputs, ref_outputs)
                candidate_all = comparison.backend.to_detections(outputs, batch, conf=0.0)
                for image_id, det, ref in zip(ids, candidate_all, ref_all):
                    comparison.add_detections(_above(det, conf), _above(ref, conf), iou)
                    if images.coco:
                        comparison.results += to_coco_results(det, image_id, images.label_to_cat)
        if progress is not None:
            progress.update(len(frames))
    if progress is not None:
        progress.close()

    report = {"reference": {"name": reference.name, "precision": reference.precision, "AP": {}},
              "data": str(data), "images": len(images.paths), "conf": conf, "iou": iou, "models": []}
    reference_coco = {}
    if images.coco:
        for imgsz, results in reference_results.items():
            reference_coco[imgsz] = coco_metrics(images.coco, results)
        report["reference"]["AP"] = {f"{h}x{w}": {k: m[k] for k in ("AP", "AP50")} for (h, w), m in reference_coco.items()}
    all_passed = True
    for comparison in comparisons:
        backend = comparison.backend
        summary = {"file": backend.name, "backend": type(backend).__name__, "precision": backend.precision,
                   "outputs": "raw" if backend.raw else "detections", "imgsz": list(backend.imgsz),
                   **comparison.summary()}
        if images.coco:
            ref, got = reference_coco[tuple(backend.imgsz)], coco_metrics(images.coco, comparison.results)
            summary["coco"] = {"AP": 100 * got["AP"], "AP50": 100 * got["AP50"],
                               "AP_delta": 100 * (got["AP"] - ref["AP"]), "AP50_delta": 100 * (got["AP50"] - ref["AP50"])}
        limits = (tolerances or TOLERANCES).get(backend.precision, TOLERANCES["fp32"])
        failures = gate(summary, limits)
        summary["gate"] = {"tolerances": limits, "passed": not failures, "failures": failures,
                           "verdict": "fail" if failures else "pass"}
        if comparison.reference == 0:
            summary["gate"]["warning"] = (f"the reference makes no detection at score >= {conf}: the detection "
                                          "level proves nothing here")
            if not failures and not allow_empty:  # a pass that proves nothing is not a pass
                summary["gate"].update(passed=False, verdict="inconclusive")
        all_passed &= summary["gate"]["passed"]
        report["models"].append(summary)
    report["passed"] = all_passed
    if out is not None:
        write_report(report, {c.backend.name: (c.score_deltas, c.ious) for c in comparisons}, Path(out))
    return report


def detections(backend, images: Images, batch_size: int = 8) -> list[dict]:
    """Every query's detection (no threshold) of each image, through the runtime's path."""
    out = []
    for start in range(0, len(images.paths), batch_size):
        frames = [read_image(p) for p in images.paths[start:start + batch_size]]
        out += backend.detect(preprocess(frames, backend.spec), conf=0.0)
    return out


def coco_ap(backend, images: Images, batch_size: int = 8) -> float:
    """COCO AP in points (0-100) of a backend on annotated images."""
    results = [r for image_id, det in zip(images.ids, detections(backend, images, batch_size))
               for r in to_coco_results(det, image_id, images.label_to_cat)]
    return 100 * coco_metrics(images.coco, results)["AP"]


def pseudo_labelled(reference, images: Images, conf: float = 0.5) -> Images:
    """The same images with the reference's detections at `conf` as ground truth, for
    unannotated data: AP then measures agreement with the reference (100 = identical)."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    dets = detections(reference, images)
    labels = sorted({int(label) for det in dets for label in det["labels"][det["scores"] >= conf]})
    dataset = {"images": [], "annotations": [], "categories": [{"id": label + 1} for label in labels]}
    for image_id, path, det in zip(images.ids, images.paths, dets):
        dataset["images"].append({"id": image_id, "file_name": path.name})
        for score, label, (x1, y1, x2, y2) in zip(det["scores"], det["labels"], det["boxes"].astype(float)):
            if score >= conf:
                dataset["annotations"].append({"id": len(dataset["annotations"]) + 1, "image_id": image_id,
                                               "category_id": int(label) + 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                                               "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    if not dataset["annotations"]:
        raise UserError(f"the reference makes no detection at score >= {conf} on these images: "
                        "nothing to measure the INT8 loss against (use annotated --val-data)")
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return Images(images.paths, images.ids, coco, {label: label + 1 for label in labels})


def _above(det: dict, conf: float) -> dict:
    keep = det["scores"] >= conf
    return {k: v[keep] for k, v in det.items()}


def markdown(report: dict) -> str:
    rows = ["| model | precision | logits max abs | boxes max abs | agreement | missing / extra | mean IoU "
            "| max abs score delta | AP | AP delta | gate |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def num(value, fmt):
        return "n/a" if value is None else format(value, fmt)
    for m in report["models"]:
        det, coco = m["detections"], m.get("coco", {})
        rows.append(" | ".join([
            f"| {m['file']}", m["precision"], num(m["tensors"].get("logits", {}).get("max_abs"), ".2e"),
            num(m["tensors"].get("boxes", {}).get("max_abs"), ".2e"),
            f"{det['agreement']:.1%} ({det['matched']}/{max(det['reference'], det['candidate'])})",
            f"{det['missing']} / {det['extra']}", num(det["mean_iou"], ".4f"), num(det["score_delta_max_abs"], ".4f"),
            num(coco.get("AP"), ".2f"), num(coco.get("AP_delta"), "+.2f"), _verdict(m["gate"]) + " |"]))
    reference = report["reference"]
    scores = "; ".join(f"{size}: AP {100 * v['AP']:.2f}, AP50 {100 * v['AP50']:.2f}"
                       for size, v in reference["AP"].items()) or "no annotations"
    return (f"Checked against {reference['name']} ({reference['precision']}) on {report['images']} images of "
            f"`{report['data']}` (detections at score >= {report['conf']}, matched at IoU >= {report['iou']}; "
            f"reference {scores}).\n\n" + "\n".join(rows) + "\n")


def _verdict(gate: dict) -> str:
    if gate.get("verdict") == "inconclusive":
        return f"**INCONCLUSIVE**: {gate['warning']} (--allow-empty accepts it)"
    if gate["passed"]:
        return f"pass ({gate['warning']})" if "warning" in gate else "pass"
    return "**FAIL**: " + "; ".join(gate["failures"])


def write_report(report: dict, deltas: dict, out: Path) -> None:
    """report.json, report.md and deltas.png: per model file, the score deltas and IoUs
    of its matched detections (`deltas`: name -> (score deltas, IoUs))."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "report.json", report)
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(markdown(report))
    try:
        import matplotlib
    except ImportError:  # a runtime-only install: the tables, no plot
        log.info("no deltas.png: it needs matplotlib")
        return
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # its font-cache notice
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, (score_deltas, ious) in deltas.items():
        left.hist(score_deltas, bins=40, histtype="step", label=name)
        right.hist(ious, bins=40, histtype="step", label=name)
    left.set(title="score delta of matched detections (model - reference)", xlabel="delta", ylabel="detections")
    right.set(title="IoU with the matched reference detection", xlabel="IoU")
    left.legend(fontsize="small")
    fig.tight_layout()
    with atomic_path(out / "deltas.png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
