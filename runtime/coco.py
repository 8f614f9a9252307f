"""COCO data and evaluation on numpy arrays, with no torch: the dataset's files and class
mapping, the images a `--data` argument names, detections turned into COCO results, and
the 12 standard metrics of pycocotools' COCOeval (pycocotools is imported when used).
Training's evaluation, the checker and INT8 calibration all score through here.

Labels follow the official convention: category ids (num_classes = max id + 1) unless
`contiguous=True` remaps them to 0..C-1.
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import UserError
from .io import coco_image_folder
from .sources import IMAGE_SUFFIXES

# frame shapes (width : height) of real cameras: square, 4:3, 16:9 and both portraits
CAMERA_ASPECTS = ((1, 1), (4, 3), (16, 9), (3, 4), (9, 16))
METRICS = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
           "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large")


def resolve_coco(data: str | Path, split: str = "val") -> tuple[Path, Path]:
    """A COCO layout root (see `find_split`) or an instances json (its image folder named
    like its suffix: instances_val2017.json -> val2017/) -> (image folder, annotation file)."""
    data = Path(data)
    if data.suffix == ".json":
        return coco_image_folder(data), data
    return find_split(data, split)


def find_split(root: str | Path, split: str) -> tuple[Path, Path]:
    """COCO layout: ROOT/annotations/instances_<split>*.json and ROOT/<split>*/ images
    (e.g. instances_val2017.json + val2017/)."""
    root = Path(root)
    found = sorted((root / "annotations").glob(f"instances_{split}*.json")) or sorted(root.glob(f"instances_{split}*.json"))
    if not found:
        raise UserError(f"{root}: no annotations/instances_{split}*.json (COCO layout expected)")
    ann = found[0]
    images = root / ann.stem[len("instances_"):]
    if not images.is_dir():
        raise UserError(f"{root}: annotation {ann.name} found but no image folder {images.name}/")
    return images, ann


class CocoAnnotations:
    """A COCO instances json and its image folder, read with pycocotools: image ids, class
    names and the label <-> category id mapping."""

    def __init__(self, images: str | Path, annotations: str | Path, contiguous: bool = False):
        from pycocotools.coco import COCO
        self.images = Path(images)
        annotations = Path(annotations)
        if not annotations.is_file():
            raise UserError(f"{annotations}: no such annotation file")
        if not self.images.is_dir():
            raise UserError(f"{self.images}: no such image folder")
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
                self.coco = COCO(str(annotations))
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{annotations}: not a COCO instances file ({exc})") from None
        self.ids = sorted(self.coco.imgs)
        cats = sorted(self.coco.cats.values(), key=lambda c: c["id"])
        if not cats:
            raise UserError(f"{annotations}: no categories")
        if contiguous:
            self.cat_to_label = {c["id"]: i for i, c in enumerate(cats)}
            self.classes = [c["name"] for c in cats]
        else:
            self.cat_to_label = {c["id"]: c["id"] for c in cats}
            self.classes = ["N/A"] * (cats[-1]["id"] + 1)
            for c in cats:
                self.classes[c["id"]] = c["name"]
        self.label_to_cat = {v: k for k, v in self.cat_to_label.items()}

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass
class Images:
    """What --data names: image paths, with pycocotools ground truth when annotated."""
    paths: list[Path]
    ids: list[int]
    coco: object = None
    label_to_cat: dict = field(default_factory=dict)

    @classmethod
    def load(cls, data, split: str = "val", contiguous: bool = False, limit: int | None = None) -> "Images":
        data = Path(data)
        if not data.exists():
            raise UserError(f"{data}: no such file or folder")
        paths = sorted(p for p in data.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if data.is_dir() else []
        if paths:  # a plain image folder: tensors and detections, no AP
            return cls(paths[:limit], list(range(len(paths[:limit]))))
        dataset = CocoAnnotations(*resolve_coco(data, split), contiguous=contiguous)
        ids = dataset.ids[:limit]
        if not ids:
            raise UserError(f"{data}: the annotation file lists no images")
        if limit:  # evaluate on the checked images only
            dataset.coco.imgs = {i: dataset.coco.imgs[i] for i in ids}
        paths = [dataset.images / dataset.coco.imgs[i]["file_name"] for i in ids]
        return cls(paths, ids, dataset.coco, dataset.label_to_cat)


def to_coco_results(detections: dict, image_id: int, label_to_cat: dict) -> list[dict]:
    """One image's detections ('scores', 'labels', 'boxes' xyxy in pixels) -> COCO results."""
    boxes = np.asarray(detections["boxes"], np.float64)
    out = []
    for score, label, (x1, y1, x2, y2) in zip(detections["scores"], detections["labels"], boxes):
        if int(label) in label_to_cat:  # a label that is no category of this dataset cannot be right
            out.append({"image_id": int(image_id), "category_id": int(label_to_cat[int(label)]),
                        "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)})
    return out


def coco_metrics(coco_gt, results: list[dict]) -> dict:
    """COCO results ({image_id, category_id, bbox xywh, score}) -> the 12 metrics.
    No detections at all scores 0 everywhere (COCOeval cannot load an empty list)."""
    from pycocotools.cocoeval import COCOeval
    if not results:
        return dict.fromkeys(METRICS, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        evaluator.params.imgIds = sorted(coco_gt.getImgIds())
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    # COCOeval reports -1 where a size range has no ground truth
    return {name: float(max(v, 0.0)) for name, v in zip(METRICS, evaluator.stats)}


def aspect_name(height: int, width: int) -> str:
    """The nearest CAMERA_ASPECTS name of a frame ('16:9', '3:4', ...): its shape class."""
    w, h = min(CAMERA_ASPECTS, key=lambda a: abs(np.log(a[0] * height / (a[1] * width))))
    return f"{w}:{h}"


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every xyxy box of `a` [N,4] with every one of `b` [M,4] -> [N,M]."""
    low = np.maximum(a[:, None, :2], b[None, :, :2])
    high = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(high - low, 0, None), axis=-1)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=-1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=-1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


def match_boxes(ref_boxes, ref_labels, boxes, labels, iou_threshold: float):
    """One-to-one matching of boxes to reference boxes of the same label, maximising the
    total IoU (scipy's linear_sum_assignment) -> (reference rows, box columns, IoUs) of the
    pairs at IoU >= iou_threshold."""
    from scipy.optimize import linear_sum_assignment
    if not len(ref_boxes) or not len(boxes):
        empty = np.zeros(0, np.int64)
        return empty, empty, np.zeros(0)
    iou = box_iou(np.asarray(ref_boxes, np.float64), np.asarray(boxes, np.float64))
    iou[np.asarray(ref_labels)[:, None] != np.asarray(labels)[None, :]] = 0.0
    rows, cols = linear_sum_assignment(-iou)
    keep = iou[rows, cols] >= iou_threshold
    return rows[keep], cols[keep], iou[rows[keep], cols[keep]]


def recall_by_aspect(coco_gt, results: list[dict], conf: float = 0.5, iou: float = 0.5) -> dict:
    """Per frame shape (aspect_name) of a dataset's images: how many objects the detections
    at score >= conf find at IoU >= iou, one-to-one and of the right class, and how well
    -> {'16:9': {'images', 'objects', 'recall', 'mean_iou'}, ...}. What COCO's AP averages
    over shapes, this keeps apart: a model whose boxes shrink on letterboxed frames shows here."""
    by_image: dict[int, list] = {}
    for r in results:
        if r["score"] >= conf:
            by_image.setdefault(r["image_id"], []).append(r)
    groups: dict[str, dict] = {}
    for image_id, info in coco_gt.imgs.items():
        truth = [a for a in coco_gt.imgToAnns[image_id] if not a.get("iscrowd", 0)]
        found = by_image.get(image_id, [])
        _, _, ious = match_boxes(_xyxy([a["bbox"] for a in truth]), [a["category_id"] for a in truth],
                                 _xyxy([r["bbox"] for r in found]), [r["category_id"] for r in found], iou)
        group = groups.setdefault(aspect_name(info["height"], info["width"]), {"images": 0, "objects": 0, "ious": []})
        group["images"] += 1
        group["objects"] += len(truth)
        group["ious"] += list(ious)
    return {name: {"images": g["images"], "objects": g["objects"], "recall": len(g["ious"]) / max(g["objects"], 1),
                   "mean_iou": float(np.mean(g["ious"])) if g["ious"] else 0.0}
            for name, g in sorted(groups.items(), key=lambda item: -item[1]["images"])}


def _xyxy(xywh) -> np.ndarray:
    boxes = np.asarray(xywh, np.float64).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], 1)
