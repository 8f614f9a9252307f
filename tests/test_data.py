"""COCO-format loading on the real coco-tiny file, the augmentations, batching, synth data."""
import json

import cv2
import pytest
import torch
from torchvision.ops import box_convert

from detr_edge.cli import main
from detr_edge.runtime.errors import UserError
from detr_edge.runtime.metadata import preprocess_spec
from detr_edge.runtime.preprocess import preprocess
from detr_edge.runtime.coco import find_split
from detr_edge.train.data import CocoDetection, Transform, collate
from detr_edge.train.synth import CLASSES, synthesize

from conftest import COCO_TINY


@pytest.fixture(scope="module")
def coco_tiny():
    ann = COCO_TINY / "instances_val2017.json"
    if not ann.exists():
        pytest.skip(f"real data not present at {ann}")
    return COCO_TINY / "val2017", ann


def test_coco_tiny_counts_and_crowd_boxes(coco_tiny):
    dataset = CocoDetection(*coco_tiny)
    raw = json.loads(coco_tiny[1].read_text())
    assert len(dataset) == 50 and len(raw["annotations"]) == 382
    crowd = [a for a in raw["annotations"] if a["iscrowd"]]
    assert len(crowd) == 5
    loaded = sum(len(dataset.load(i)[1]) for i in range(len(dataset)))
    assert loaded == 382 - 5  # every non-crowd box, no crowd box
    assert dataset.num_classes == 91 and dataset.classes[1] == "person" and dataset.classes[12] == "N/A"
    contiguous = CocoDetection(*coco_tiny, contiguous=True)
    assert contiguous.num_classes == len(raw["categories"]) == 80  # every category of the file, used or not
    assert contiguous.label_to_cat[0] == min(c["id"] for c in raw["categories"])


@pytest.mark.parametrize("recipe", ["edge", "official"])
def test_boxes_stay_inside_images_over_many_augmentations(coco_tiny, recipe):
    torch.manual_seed(0)
    import random
    random.seed(0)
    dataset = CocoDetection(*coco_tiny, Transform(recipe, (256, 320), train=True))
    for trial in range(120):
        image, mask, target = dataset[trial % len(dataset)]
        xyxy = box_convert(target["boxes"], "cxcywh", "xyxy")
        assert (xyxy >= -1e-5).all() and (xyxy <= 1 + 1e-5).all(), (trial, xyxy)
        assert (xyxy[:, 2:] > xyxy[:, :2]).all()
        assert len(target["labels"]) == len(target["boxes"])
        height, width = target["size"].tolist()
        if recipe == "edge":
            assert image.shape == (3, 256, 320) and (~mask).sum() > 0
        else:
            assert 480 <= min(height, width) <= 800 and max(height, width) <= 1333
            assert image.shape[-2:] == (height, width)


def test_edge_eval_transform_is_the_runtime_preprocessing(coco_tiny):
    dataset = CocoDetection(*coco_tiny, Transform("edge", (256, 320), train=False))
    frame, boxes, _ = dataset.load(3)
    image, mask, target = dataset[3]
    batch = preprocess([frame], preprocess_spec((256, 320)))
    assert torch.equal(image, torch.from_numpy(batch.images[0])) and torch.equal(mask, torch.from_numpy(batch.mask[0]))
    height, width = frame.shape[:2]
    expected = box_convert(torch.from_numpy(boxes), "xyxy", "cxcywh") / torch.tensor([width, height, width, height])
    assert torch.allclose(target["boxes"], expected)


def test_zoom_zero_only_flips(coco_tiny):
    """`--zoom 0`: every training sample is the evaluation sample or its mirror image."""
    torch.manual_seed(0)
    evaluation = CocoDetection(*coco_tiny, Transform("edge", (256, 320), train=False))
    training = CocoDetection(*coco_tiny, Transform("edge", (256, 320), train=True, zoom=0.0))
    flips = 0
    for index in range(20):
        (plain, _, expected), (image, _, target) = evaluation[index], training[index]
        if torch.equal(image, plain):
            assert torch.allclose(target["boxes"], expected["boxes"])
        else:  # mirrored: the letterboxed content and the box centres flip within the unpadded width
            cx = target["boxes"][:, 0]
            assert torch.allclose(cx, 1 - expected["boxes"][:, 0], atol=1e-5)
            assert torch.allclose(target["boxes"][:, 1:], expected["boxes"][:, 1:], atol=1e-5)
            flips += 1
    assert 0 < flips < 20
    with pytest.raises(UserError, match="probability"):
        Transform("edge", (256, 320), train=True, zoom=1.5)


def test_collate_pads_with_mask():
    a = (torch.ones(3, 4, 6), torch.zeros(4, 6, dtype=torch.bool), {})
    b = (torch.ones(3, 5, 3), torch.zeros(5, 3, dtype=torch.bool), {})
    images, mask, _ = collate([a, b])
    assert images.shape == (2, 3, 5, 6)
    assert mask[0, 4].all() and not mask[0, :4].any() and mask[1, :, 3:].all() and not mask[1, :, :3].any()
    assert (images[mask.unsqueeze(1).expand_as(images)] == 0).all()


def test_find_split_layouts(tmp_path, coco_tiny):
    assert find_split(COCO_TINY, "val") == coco_tiny
    with pytest.raises(UserError, match="no annotations/instances_train"):
        find_split(COCO_TINY, "train")


def test_synth_is_deterministic_and_well_formed(tmp_path):
    a = synthesize(tmp_path / "a", train=6, val=2, size=(96, 128), video_frames=12, seed=3)
    b = synthesize(tmp_path / "b", train=6, val=2, size=(96, 128), video_frames=12, seed=3)
    assert a["train"].read_text() == b["train"].read_text()
    assert (tmp_path / "a/train/000004.jpg").read_bytes() == (tmp_path / "b/train/000004.jpg").read_bytes()
    data = json.loads(a["train"].read_text())
    assert [c["name"] for c in data["categories"]] == list(CLASSES)
    assert data["annotations"] and all(1 <= len([x for x in data["annotations"] if x["image_id"] == im["id"]]) <= 5
                                       for im in data["images"])
    for ann in data["annotations"]:
        x, y, w, h = ann["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 128 and y + h <= 96 and w > 5 and h > 5
    dataset = CocoDetection(*find_split(tmp_path / "a", "train"))
    assert dataset.num_classes == len(CLASSES) + 1  # id 0 unused: max id + 1
    video = cv2.VideoCapture(str(a["video"]))
    assert int(video.get(cv2.CAP_PROP_FRAME_COUNT)) == 12 and video.read()[1].shape == (240, 320, 3)


def test_synth_cameras_come_in_the_shapes_of_real_cameras(tmp_path):
    from detr_edge.runtime.coco import CAMERA_ASPECTS, aspect_name
    paths = synthesize(tmp_path, train=10, val=5, size=(128, 128), video_frames=3, seed=3, aspects=CAMERA_ASPECTS)
    shapes = {split: [(im["height"], im["width"]) for im in json.loads(paths[split].read_text())["images"]]
              for split in ("train", "val", "cameras")}
    assert shapes["train"] == [(128, 128), (96, 128), (72, 128), (128, 96), (128, 72)] * 2  # the long side kept
    assert shapes["cameras"] == shapes["train"][:5] and shapes["val"] == [(128, 128)] * 5
    assert [aspect_name(h, w) for h, w in shapes["cameras"]] == ["1:1", "4:3", "16:9", "3:4", "9:16"]
    assert aspect_name(720, 1280) == "16:9" and aspect_name(1080, 1440) == "4:3" and aspect_name(2000, 1000) == "9:16"
    for name, size in (("shapes-16x9", (180, 320)), ("shapes-9x16", (320, 180))):
        video = cv2.VideoCapture(str(tmp_path / f"{name}.mp4"))
        assert video.read()[1].shape[:2] == size and (tmp_path / f"{name}.gt.txt").stat().st_size
    assert main(["data", "synth", str(tmp_path / "x"), "--aspects", "16:9,0:1"]) == 2


def test_synth_validation_scenes_and_videos_do_not_depend_on_the_training_split(tmp_path):
    """More or denser training scenes (the demo's 8,000 of up to 10 shapes) leave the scenes
    that runs are scored on as they were, so runs on either data are compared on the same images."""
    from detr_edge.runtime.coco import CAMERA_ASPECTS
    kw = dict(val=3, size=(64, 80), video_frames=4, seed=5, aspects=CAMERA_ASPECTS)
    a = synthesize(tmp_path / "a", train=4, **kw)
    b = synthesize(tmp_path / "b", train=9, train_objects=8, **kw)
    c = synthesize(tmp_path / "c", train=9, **kw)
    for split in ("val", "cameras"):
        assert a[split].read_text() == b[split].read_text()
        assert all((tmp_path / "a" / split / f.name).read_bytes() == f.read_bytes()
                   for f in (tmp_path / "b" / split).iterdir())
    for name in ("shapes", "shapes-16x9", "shapes-9x16"):
        assert (tmp_path / f"a/{name}.gt.txt").read_text() == (tmp_path / f"b/{name}.gt.txt").read_text()
        frames = [cv2.VideoCapture(str(tmp_path / f"{run}/{name}.mp4")).read()[1] for run in "ab"]
        assert (frames[0] == frames[1]).all()
    train = [json.loads(paths["train"].read_text())["images"] for paths in (a, b, c)]
    assert train[2][:4] == train[0] and (tmp_path / "a/train/000003.jpg").read_bytes() == (
        tmp_path / "c/train/000003.jpg").read_bytes()  # the first scenes of a longer split are the same
    assert (tmp_path / "a/val/000000.jpg").read_bytes() != (tmp_path / "a/cameras/000000.jpg").read_bytes()


def test_synth_training_frames_may_take_other_shapes_than_the_cameras(tmp_path, capsys):
    """`--train-aspects` (the demo's: half the training frames square) changes the training
    frames' shapes alone: `val` and `cameras` stay the images runs are scored on."""
    from detr_edge.runtime.coco import CAMERA_ASPECTS
    kw = dict(train=4, val=3, size=(128, 128), video_frames=0, seed=5, aspects=CAMERA_ASPECTS)
    a = synthesize(tmp_path / "a", **kw)
    b = synthesize(tmp_path / "b", train_aspects=((1, 1), (16, 9)), **kw)
    assert [(im["height"], im["width"]) for im in json.loads(b["train"].read_text())["images"]] == [
        (128, 128), (72, 128)] * 2
    assert all(a[split].read_text() == b[split].read_text() for split in ("val", "cameras"))
    assert main(["data", "synth", str(tmp_path / "x"), "--train-aspects", "1:1,4"]) == 2
    assert capsys.readouterr().err.strip() == "detr-edge: error: --train-aspects 1:1,4: expected W:H pairs such as 16:9,3:4"
    assert main(["data", "synth", str(tmp_path / "x"), "--aspects", "none", "--train-aspects", "1:1"]) == 2


def test_synth_training_scenes_may_be_denser_than_the_validation_ones(tmp_path, capsys):
    paths = synthesize(tmp_path, train=40, val=10, size=(64, 64), video_frames=0, seed=3, max_objects=1,
                       train_objects=6)
    counts = {}
    for split in ("train", "val"):
        data = json.loads(paths[split].read_text())
        per_image = [sum(a["image_id"] == im["id"] for a in data["annotations"]) for im in data["images"]]
        counts[split] = (min(per_image), max(per_image))
    assert counts["val"] == (1, 1) and counts["train"][0] >= 1 and 4 <= counts["train"][1] <= 6
    for flag in ("--train-objects", "--max-objects"):
        assert main(["data", "synth", str(tmp_path / "x"), flag, "0"]) == 2
        assert capsys.readouterr().err.strip() == f"detr-edge: error: {flag} 0: must be at least 1"
