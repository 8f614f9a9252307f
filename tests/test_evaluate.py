"""COCO evaluation (pycocotools) on the real annotation file."""
import contextlib
import io

import numpy as np
import pytest

from detr_edge.runtime.coco import METRICS, coco_metrics, to_coco_results

from conftest import COCO_TINY


@pytest.fixture(scope="module")
def coco_gt():
    ann = COCO_TINY / "instances_val2017.json"
    if not ann.exists():
        pytest.skip(f"real data not present at {ann}")
    from pycocotools.coco import COCO
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(ann))


def test_ground_truth_as_detections_scores_one(coco_gt):
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in coco_gt.dataset["annotations"] if not a["iscrowd"]]
    metrics = coco_metrics(coco_gt, results)
    assert set(metrics) == set(METRICS)
    assert metrics["AP"] == pytest.approx(1.0) and metrics["AP50"] == pytest.approx(1.0)


def test_empty_predictions_score_zero(coco_gt):
    assert all(v == 0 for v in coco_metrics(coco_gt, []).values())


def test_wrong_boxes_score_below_one(coco_gt):
    results = [{"image_id": a["image_id"], "category_id": a["category_id"],
                "bbox": [a["bbox"][0] + a["bbox"][2] * 0.4, a["bbox"][1], a["bbox"][2], a["bbox"][3]], "score": 1.0}
               for a in coco_gt.dataset["annotations"] if not a["iscrowd"]]
    metrics = coco_metrics(coco_gt, results)
    assert 0 < metrics["AP"] < 0.5 and metrics["AP50"] > metrics["AP75"]


def test_to_coco_results_maps_labels_and_boxes():
    det = {"scores": np.array([0.9, 0.5]), "labels": np.array([0, 3]), "boxes": np.array([[10, 20, 30, 60], [0, 0, 1, 1.0]])}
    out = to_coco_results(det, 7, {0: 18})
    assert out == [{"image_id": 7, "category_id": 18, "bbox": [10.0, 20.0, 20.0, 40.0], "score": 0.9}]


def test_recall_by_aspect_counts_right_boxes_per_frame_shape(coco_gt):
    from detr_edge.runtime.coco import aspect_name, recall_by_aspect
    truth = [a for a in coco_gt.dataset["annotations"] if not a["iscrowd"]]
    shapes = {i: aspect_name(im["height"], im["width"]) for i, im in coco_gt.imgs.items()}
    perfect = recall_by_aspect(coco_gt, [{**a, "score": 1.0} for a in truth])
    assert set(perfect) == set(shapes.values()) and len(perfect) > 1  # photos in landscape and portrait
    for name, group in perfect.items():
        assert group["images"] == sum(1 for s in shapes.values() if s == name)
        assert group["objects"] == sum(1 for a in truth if shapes[a["image_id"]] == name)
        assert group["recall"] == 1.0 and group["mean_iou"] == pytest.approx(1.0)
    # every other object: moved by 0.4 of its width (IoU 0.6 / 1.4 < 0.5), of another class, or below conf
    spoilt = []
    for k, a in enumerate(truth):
        x, y, w, h = a["bbox"]
        if k % 2 == 0:
            spoilt.append({**a, "score": 0.9})
        else:
            spoilt.append([{**a, "bbox": [x + 0.4 * w, y, w, h], "score": 0.9}, {**a, "category_id": 999, "score": 0.9},
                           {**a, "score": 0.4}][k % 3])
    found = recall_by_aspect(coco_gt, spoilt)
    for name, group in found.items():
        kept = [k for k, a in enumerate(truth) if shapes[a["image_id"]] == name]
        assert group["recall"] == pytest.approx(sum(1 for k in kept if k % 2 == 0) / len(kept))
        assert group["mean_iou"] == pytest.approx(1.0)
