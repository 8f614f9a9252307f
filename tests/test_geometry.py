"""The demo model on the deployment's geometry: frames of real cameras' shapes letterboxed
into its square input. Boxes come back relative to the unpadded image (the official
convention, the runtime's postprocessing); a model that never saw padding in training
shrinks them along the padded axis. Trained on letterboxed frames, it finds as much, as
well, on 16:9 and portrait frames as on square ones."""
import numpy as np

from detr_edge.runtime.coco import find_split
from detr_edge.train.checkpoint import load_model
from detr_edge.train.data import CocoDetection, Transform
from detr_edge.train.evaluate import evaluate
from detr_edge.train.synth import write_split

from conftest import DEMO_CHECKPOINT, needs_demo_model


@needs_demo_model
def test_demo_boxes_on_letterboxed_16_9_and_3_4_frames_are_as_good_as_on_square_ones(tmp_path):
    """180 new scenes (a seed the demo's data never used), 60 per shape: the recall at IoU
    >= 0.5 of the detections at score >= 0.5 within 5 points of the square frames', and the
    mean IoU of those matched boxes within 0.05."""
    model, config = load_model(DEMO_CHECKPOINT)
    write_split(tmp_path, "cameras", 180, (128, 128), np.random.default_rng(1234), max_objects=3,
                aspects=((1, 1), (16, 9), (3, 4)))
    dataset = CocoDetection(*find_split(tmp_path, "cameras"), Transform("edge", config["preprocess"]["imgsz"],
                                                                        train=False))
    metrics = evaluate(model, dataset)
    print({k: round(v, 3) for k, v in metrics.items() if k.startswith(("recall", "mean_iou"))})
    for shape in ("16:9", "3:4"):
        assert abs(metrics[f"recall_{shape}"] - metrics["recall_1:1"]) <= 0.05, metrics
        assert abs(metrics[f"mean_iou_{shape}"] - metrics["mean_iou_1:1"]) <= 0.05, metrics
    assert metrics["recall_1:1"] > 0.6  # a model that detects
