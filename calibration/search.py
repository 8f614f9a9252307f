"""Sensitivity search (`calibrate --auto`): which parts of DETR must stay float for INT8 to
keep the accuracy. As in ModelOpt/Polygraphy practice, quantizable nodes are grouped by
the module they belong to (backbone stem and stages, input projection, each encoder and
decoder layer, the heads); each group is quantized alone and ranked by the AP it costs;
then the most sensitive groups are kept float, one at a time, until the AP drop is within
the target. The AP comes from the caller (`evaluate(backend) -> AP in points`, each file
loaded once), so this module needs no evaluation code of its own.
"""
from __future__ import annotations

import logging
import re
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from detr_edge.runtime.backends import load_backend

from .quantize import QuantOptions, quantize

log = logging.getLogger(__name__)


def group_of(node_name: str) -> str:
    """'/model/transformer/encoder/layers.2/linear1/MatMul' -> 'encoder.2';
    '/model/backbone/backbone.0/body/layer3/layer3.1/conv2/Conv' -> 'backbone.layer3'."""
    path = node_name.replace("/model/", "/", 1)
    match = re.search(r"/transformer/(encoder|decoder)/layers\.(\d+)/", path)
    if match:
        return f"{match[1]}.{match[2]}"
    match = re.search(r"/body/(layer\d)/", path)
    if match:
        return f"backbone.{match[1]}"
    if "/body/" in path:
        return "backbone.stem"
    for head in ("input_proj", "class_embed", "bbox_embed"):
        if f"/{head}/" in path or path.startswith(f"/{head}"):
            return head
    return "other"


def node_groups(graph, op_types) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for node in graph.graph.node:
        if node.op_type in op_types:
            groups.setdefault(group_of(node.name), []).append(node.name)
    return groups


def latency_ms(backend, runs: int = 5) -> float:
    """Median latency of one batch of the model's size (1 for a dynamic-batch model)."""
    batch = backend.batch or 1
    images = np.zeros((batch, 3, *backend.imgsz), np.float32)
    mask = np.zeros((batch, *backend.imgsz), bool)
    backend.infer(images, mask)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        backend.infer(images, mask)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def search(src, dst, flavour: str, options: QuantOptions, cache, evaluate, baseline: float,
           max_drop: float = 1.0, workdir=None) -> dict:
    """Write the best file found to `dst`; return the steps (exclusions, AP, latency)."""
    import onnx
    src, dst = Path(src), Path(dst)
    workdir = Path(workdir or dst.parent)
    groups = node_groups(onnx.load(str(src)), options.op_types)
    trial = workdir / f".{dst.stem}.trial.onnx"

    def measure(kept_float: list[str], path: Path) -> dict:
        nodes = [n for g in kept_float for n in groups[g]]
        quantize(src, path, flavour, replace(options, exclude_nodes=options.exclude_nodes + nodes), cache)
        with load_backend(path) as backend:
            ap = evaluate(backend)
            step = {"kept_float": list(kept_float), "AP": ap, "AP_drop": baseline - ap, "latency_ms": latency_ms(backend)}
        log.info("kept float %s: AP %.2f (drop %.2f), %.1f ms", kept_float or "nothing", ap, baseline - ap,
                 step["latency_ms"])
        return step

    try:
        steps = [measure([], dst)]
        sensitivity = {}
        if steps[0]["AP_drop"] > max_drop:
            for name in groups:  # quantize this group alone: the AP it costs
                others = [g for g in groups if g != name]
                quantize(src, trial, flavour, replace(options, exclude_nodes=options.exclude_nodes
                                                      + [n for g in others for n in groups[g]]), cache)
                with load_backend(trial) as backend:
                    sensitivity[name] = baseline - evaluate(backend)
                log.info("sensitivity of %s: %.2f AP points", name, sensitivity[name])
            kept: list[str] = []
            for name in sorted(sensitivity, key=sensitivity.get, reverse=True):
                kept.append(name)
                steps.append(measure(kept, trial))
                if steps[-1]["AP_drop"] <= max_drop:
                    trial.replace(dst)
                    break
            else:
                log.warning("no exclusion reached the target; %s is the last try", dst)
                trial.replace(dst)
    finally:
        trial.unlink(missing_ok=True)
    final = steps[-1]
    return {"baseline_AP": baseline, "max_drop": max_drop, "groups": {g: len(n) for g, n in groups.items()},
            "sensitivity": sensitivity, "steps": steps, "kept_float_groups": final["kept_float"],
            "kept_float_nodes": [n for g in final["kept_float"] for n in groups[g]],
            "within_target": final["AP_drop"] <= max_drop}
