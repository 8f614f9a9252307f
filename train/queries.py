"""Query specialisation, the paper's Fig. 7: each of the N query slots, over a validation
set, predicts boxes in its own region and of its own sizes and shapes.

Each prediction above the threshold is a point at its box centre in the unit square of
its image, coloured as in the paper: green for small boxes, red for large horizontal
ones, blue for large vertical ones. Per-slot statistics go to JSON.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from detr_edge.runtime.coco import Images
from detr_edge.runtime.errors import UserError
from detr_edge.runtime.io import atomic_path, read_image, write_json
from detr_edge.runtime.metadata import preprocess_spec
from detr_edge.runtime.preprocess import preprocess

from .checkpoint import load_model
from .detr import DETR, class_scores

LARGE_AREA = 0.1  # box area over this share of the image counts as large (paper: no figure given)
COLOURS = {"small": "#2ca02c", "large horizontal": "#d62728", "large vertical": "#1f77b4"}


def kind(width: float, height: float) -> str:
    if width * height < LARGE_AREA:
        return "small"
    return "large horizontal" if width >= height else "large vertical"


@torch.no_grad()
def collect(model: DETR, paths: list[Path], spec: dict, conf: float, batch_size: int = 8) -> list[np.ndarray]:
    """-> per query slot, an array [n, 4] of the (cx, cy, w, h) boxes, in units of the image,
    that it predicted with a score >= conf."""
    model.eval()
    found = [[] for _ in range(model.config.num_queries)]
    for start in tqdm(range(0, len(paths), batch_size), desc="queries", unit="batch", leave=False):
        batch = preprocess([read_image(p) for p in paths[start:start + batch_size]], spec)
        out = model(torch.from_numpy(batch.images), torch.from_numpy(batch.mask))
        scores = class_scores(out["pred_logits"])[0]
        for image, slot in (scores >= conf).nonzero().tolist():
            found[slot].append(out["pred_boxes"][image, slot].numpy())  # boxes are relative to the unpadded image
    return [np.array(boxes, np.float32).reshape(-1, 4) for boxes in found]


def statistics(found: list[np.ndarray], images: int, conf: float) -> dict:
    slots = []
    for slot, boxes in enumerate(found):
        kinds = [kind(w, h) for w, h in boxes[:, 2:]]
        slots.append({"slot": slot, "count": len(boxes), "fires": round(len(boxes) / max(images, 1), 4),
                      "mean_center": [round(float(v), 4) for v in boxes[:, :2].mean(0)] if len(boxes) else None,
                      "mean_size": [round(float(v), 4) for v in boxes[:, 2:].mean(0)] if len(boxes) else None,
                      **{name.replace(" ", "_"): kinds.count(name) for name in COLOURS}})
    return {"images": images, "conf": conf, "large_area": LARGE_AREA,
            "predictions": sum(s["count"] for s in slots), "slots": slots}


def plot(found: list[np.ndarray], path: Path, title: str) -> int:
    """A grid of one small unit-square panel per slot (y down, as in the image).
    Returns the number of panels drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = math.ceil(math.sqrt(len(found)))
    rows = math.ceil(len(found) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.4 * cols, 1.4 * rows + 0.6), squeeze=False)
    for ax in axes.flat[len(found):]:
        ax.remove()
    for slot, (ax, boxes) in enumerate(zip(axes.flat, found)):
        colours = [COLOURS[kind(w, h)] for w, h in boxes[:, 2:]]
        ax.scatter(boxes[:, 0], boxes[:, 1], s=3, c=colours, alpha=0.6, linewidths=0)
        ax.set(xlim=(0, 1), ylim=(1, 0), xticks=[], yticks=[], aspect="equal")
        ax.set_title(f"{slot}: {len(boxes)}", fontsize=7, pad=2)
    handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=k) for k, c in COLOURS.items()]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return len(fig.axes)


def run(checkpoint, data, out_dir, split="val", conf=0.5, imgsz=None, limit=None, batch_size=8) -> dict:
    model, config = load_model(checkpoint)
    spec = preprocess_spec(imgsz) if imgsz else config["preprocess"]
    paths = Images.load(data, split, limit=limit).paths
    if not paths:
        raise UserError(f"{data}: no images")
    found = collect(model, paths, spec, conf, batch_size)
    stats = statistics(found, len(paths), conf)
    out_dir = Path(out_dir)
    stats["panels"] = plot(found, out_dir / "queries.png",
                           f"{Path(checkpoint).name}: box centres per query slot, {len(paths)} images, score >= {conf}")
    write_json(out_dir / "queries.json", stats)
    return stats
