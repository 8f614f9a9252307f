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
