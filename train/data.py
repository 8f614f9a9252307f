"""COCO-format detection data as a torch Dataset (the files and class mapping are
runtime.coco's), the paper's augmentation and the edge recipe (torchvision.transforms.v2
with tv_tensors.BoundingBoxes), and batching with padding + mask as in the official code.

Targets follow the official convention: `labels` are category ids (num_classes = max
id + 1) unless `contiguous=True` remaps them to 0..C-1; `boxes` are cxcywh normalised
by the (unpadded) image size; crowd boxes are excluded.
"""
from __future__ import annotations

import random
from pathlib import Path

import cv2
import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.ops import box_convert
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from detr_edge.runtime.coco import CocoAnnotations
from detr_edge.runtime.errors import UserError
from detr_edge.runtime.metadata import IMAGENET_MEAN, IMAGENET_STD, preprocess_spec
from detr_edge.runtime.preprocess import preprocess

OFFICIAL_SCALES = list(range(480, 801, 32))


class RandomSizeCrop(torch.nn.Module):
    """The official RandomSizeCrop: a crop of random height/width in [min, max] pixels
    (bounded by the image); with `fraction=True`, min and max are fractions of each side."""

    def __init__(self, min_size: float, max_size: float, fraction: bool = False):
        super().__init__()
        self.min_size, self.max_size, self.fraction = min_size, max_size, fraction

    def _side(self, length: int) -> int:
        low, high = ((self.min_size * length, self.max_size * length) if self.fraction
                     else (self.min_size, self.max_size))
        return random.randint(min(length, max(1, int(low))), min(length, max(1, int(high))))

    def forward(self, sample: dict) -> dict:
        height, width = sample["image"].shape[-2:]
        crop_w, crop_h = self._side(width), self._side(height)
        top, left = random.randint(0, height - crop_h), random.randint(0, width - crop_w)
        return {**sample, "image": TF.crop(sample["image"], top, left, crop_h, crop_w),
                "boxes": TF.crop(sample["boxes"], top, left, crop_h, crop_w)}


def _finish_geometry():
    return [v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes(min_size=1.0)]


def official_augment(scales=OFFICIAL_SCALES, max_size=1333, crop=(384, 600)) -> v2.Compose:
    """Flip, then either a multi-scale resize or resize -> random crop -> multi-scale resize."""
    return v2.Compose([
        v2.RandomHorizontalFlip(),
        v2.RandomChoice([
            v2.RandomShortestSize(scales, max_size=max_size),
            v2.Compose([v2.RandomShortestSize([400, 500, 600]), RandomSizeCrop(*crop),
                        v2.RandomShortestSize(scales, max_size=max_size)]),
        ]),
        *_finish_geometry(),
    ])


def edge_augment(zoom: float = 0.5) -> v2.Compose:
    """Flip and, with probability `zoom`, a random crop of 50-100% of each side (a zoom-in);
    the fixed-size letterbox comes after (in `Transform`), so training sees the deployment
    geometry."""
    return v2.Compose([
        v2.RandomHorizontalFlip(),
        *([v2.RandomApply([RandomSizeCrop(0.5, 1.0, fraction=True)], p=zoom)] if zoom > 0 else []),
        *_finish_geometry(),
    ])


class Transform:
    """(BGR frame, xyxy pixel boxes, labels) -> (image [3,h,w], mask [h,w], target).

    recipe 'edge': optional augmentation, then the runtime's letterbox to imgsz (the very
    function deployment uses). recipe 'official': augmentation at free size, ImageNet
    normalisation, no padding (the collate pads)."""

    def __init__(self, recipe: str, imgsz=None, train: bool = True, zoom: float = 0.5):
        if recipe not in ("edge", "official"):
            raise UserError(f"unknown recipe {recipe!r}: edge or official")
        if recipe == "edge" and imgsz is None:
            raise UserError("the edge recipe needs the input size (imgsz)")
        self.recipe, self.train = recipe, train
        self.spec = preprocess_spec(imgsz) if imgsz is not None else None
        if not 0 <= zoom <= 1:
            raise UserError(f"zoom {zoom} is a probability: 0 to 1")
        self.augment = (edge_augment(zoom) if recipe == "edge" else official_augment()) if train else None

    def __call__(self, frame: np.ndarray, boxes: np.ndarray, labels: np.ndarray):
        if self.augment is not None:
            rgb = torch.from_numpy(np.ascontiguousarray(frame[..., ::-1])).permute(2, 0, 1)
            sample = self.augment({"image": tv_tensors.Image(rgb),
                                   "boxes": tv_tensors.BoundingBoxes(torch.as_tensor(boxes, dtype=torch.float32),
                                                                     format="XYXY", canvas_size=rgb.shape[-2:]),
                                   "labels": torch.as_tensor(labels, dtype=torch.int64)})
            image, xyxy, labels = sample["image"], sample["boxes"].as_subclass(torch.Tensor), sample["labels"]
        else:
            image, xyxy, labels = None, torch.as_tensor(boxes, dtype=torch.float32), torch.as_tensor(labels)
        if self.recipe == "edge":
            frame = frame if image is None else np.ascontiguousarray(image.permute(1, 2, 0).numpy()[..., ::-1])
            batch = preprocess([frame], self.spec)
            pixels, mask = torch.from_numpy(batch.images[0]), torch.from_numpy(batch.mask[0])
            height, width = frame.shape[:2]
        else:
            if image is None:
                image = torch.from_numpy(np.ascontiguousarray(frame[..., ::-1])).permute(2, 0, 1)
            pixels = TF.normalize(TF.to_dtype(image, torch.float32, scale=True), IMAGENET_MEAN, IMAGENET_STD)
            pixels = pixels.as_subclass(torch.Tensor)
            height, width = pixels.shape[-2:]
            mask = torch.zeros(height, width, dtype=torch.bool)
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        target = {"labels": labels.to(torch.int64),
                  "boxes": box_convert(xyxy.reshape(-1, 4), "xyxy", "cxcywh") / scale,
                  "size": torch.tensor([height, width])}
        return pixels, mask, target


class CocoDetection(CocoAnnotations, torch.utils.data.Dataset):
    """A COCO instances json + image folder (runtime.coco) as a torch Dataset of transformed
    images and targets."""

    def __init__(self, images: str | Path, annotations: str | Path, transform: Transform | None = None,
                 contiguous: bool = False):
        super().__init__(images, annotations, contiguous)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, index: int):
        """-> (BGR frame, xyxy pixel boxes [n,4], labels [n]) with crowd boxes dropped."""
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        path = self.images / info["file_name"]
        frame = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if frame is None:
            raise UserError(f"{path}: missing or unreadable image")
        height, width = frame.shape[:2]
        anns = [a for a in self.coco.imgToAnns[image_id] if not a.get("iscrowd", 0)]
        boxes = np.array([a["bbox"] for a in anns], np.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
        labels = np.array([self.cat_to_label[a["category_id"]] for a in anns], np.int64)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        return frame, boxes[keep], labels[keep]

    def __getitem__(self, index: int):
        image, mask, target = self.transform(*self.load(index))
        target["image_id"] = torch.tensor(self.ids[index])
        return image, mask, target


def collate(batch):
    """Pad to the largest image of the batch (zeros, after normalisation) and extend each
    mask with True over the padding: the official NestedTensor batching."""
    images, masks, targets = zip(*batch)
    height = max(i.shape[-2] for i in images)
    width = max(i.shape[-1] for i in images)
    out = torch.zeros(len(images), 3, height, width)
    out_mask = torch.ones(len(images), height, width, dtype=torch.bool)
    for i, (image, mask) in enumerate(zip(images, masks)):
        h, w = image.shape[-2:]
        out[i, :, :h, :w] = image
        out_mask[i, :h, :w] = mask
    return out, out_mask, list(targets)


def pad_targets(targets: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch's targets as tensors padded to its fullest image's count T (at least 1):
    labels [B,T], cxcywh boxes [B,T,4] (padding: a centred half-size box, a valid one),
    valid [B,T]; on the targets' device, with no host synchronisation."""
    count = max(1, *(len(t["labels"]) for t in targets))
    device = targets[0]["boxes"].device
    labels = torch.zeros(len(targets), count, dtype=torch.int64, device=device)
    boxes = torch.full((len(targets), count, 4), 0.5, device=device)
    valid = torch.zeros(len(targets), count, dtype=torch.bool, device=device)
    for b, t in enumerate(targets):
        n = len(t["labels"])
        labels[b, :n], boxes[b, :n], valid[b, :n] = t["labels"], t["boxes"], True
    return labels, boxes, valid
