"""`detr-edge data synth`: an embedded, download-free COCO-format dataset of shapes, and
a short video of the same shapes moving (the demo's data). Deterministic by seed.

Four classes (square, circle, triangle, star) of varied size (small to large) and
colour, overlapping a little, on cluttered backgrounds (noise, gradients, thin lines and
small blobs that are not objects). With `aspects`, the training images and a `cameras`
split come in the frame shapes of real cameras (4:3, 16:9 and portrait beside square),
so a model letterboxed into a square input learns the padding it will be deployed with."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from detr_edge.runtime.errors import UserError
from detr_edge.runtime.io import atomic_path, write_json

CLASSES = ("square", "circle", "triangle", "star")


def frame_size(size: tuple[int, int], aspect: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of a frame of `aspect` (w, h) whose long side is `size`'s long side."""
    long, (w, h) = max(size), aspect
    return (round(long * h / w), long) if w >= h else (long, round(long * w / h))


def _polygon(kind: str, cx: float, cy: float, r: float) -> np.ndarray:
    if kind == "triangle":
        angles = np.deg2rad([-90, 30, 150])
        radii = np.full(3, r)
    elif kind == "star":
        angles = np.deg2rad(np.arange(10) * 36 - 90)
        radii = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
    else:  # square
        angles = np.deg2rad([-135, -45, 45, 135])
        radii = np.full(4, r)
    return np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1)


def draw_shape(image: np.ndarray, kind: str, cx: float, cy: float, r: float, color) -> list[float]:
    """Draw one filled shape; return its exact box [x, y, w, h] clipped to the image."""
    if kind == "circle":
        cv2.circle(image, (round(cx), round(cy)), round(r), color, cv2.FILLED, cv2.LINE_AA)
        x1, y1, x2, y2 = cx - round(r), cy - round(r), cx + round(r), cy + round(r)
    else:
        points = _polygon(kind, cx, cy, r)
        cv2.fillPoly(image, [np.round(points).astype(np.int32)], color, cv2.LINE_AA)
        (x1, y1), (x2, y2) = points.min(0), points.max(0)
    height, width = image.shape[:2]
    x1, y1, x2, y2 = max(0, x1), max(0, y1), min(width, x2), min(height, y2)
    return [float(x1), float(y1), float(x2 - x1), float(y2 - y1)]


def background(rng, height: int, width: int) -> np.ndarray:
    base = rng.integers(0, 256, 3)
    ramp = np.linspace(0, 1, width)[None, :, None] * rng.integers(-80, 80, 3)
    image = np.clip(base + ramp + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)
    for _ in range(rng.integers(2, 8)):  # clutter: thin lines and small blobs, not objects
        p1, p2 = rng.integers(0, [width, height], 2), rng.integers(0, [width, height], 2)
        cv2.line(image, tuple(map(int, p1)), tuple(map(int, p2)), tuple(map(int, rng.integers(0, 256, 3))), 1)
    for _ in range(rng.integers(2, 8)):
        c = rng.integers(0, [width, height], 2)
        cv2.circle(image, tuple(map(int, c)), int(rng.integers(1, 4)), tuple(map(int, rng.integers(0, 256, 3))), -1)
    return image


def _distinct_color(rng, image, cx, cy):
    """A colour that stands out from the background under the shape's centre."""
    under = image[int(cy), int(cx)].astype(int)
    while True:
        color = rng.integers(0, 256, 3)
        if np.abs(color - under).sum() > 150:
            return tuple(int(c) for c in color)


def scene(rng, height: int, width: int, max_objects: int = 5):
    """-> (BGR image, [(class index, [x, y, w, h])...]). Objects overlap at most a little.
    Their sizes follow the long side, so a frame of any shape letterboxed into a square
    input shows them at the same scale: what differs between shapes is the padding."""
    image = background(rng, height, width)
    objects, boxes = [], []
    long, short = max(height, width), min(height, width)
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _attempt in range(20):
            # diameter 12% .. 60% of the long side, at most 90% of the short one
            r = min(float(rng.uniform(0.06, 0.3) * long), 0.45 * short)
            cx, cy = rng.uniform(r * 0.7, width - r * 0.7), rng.uniform(r * 0.7, height - r * 0.7)
            box = np.array([cx - r, cy - r, cx + r, cy + r])
            if all(_overlap(box, other) < 0.25 for other in boxes):
                break
        else:
            continue
        kind = int(rng.integers(len(CLASSES)))
        bbox = draw_shape(image, CLASSES[kind], cx, cy, r, _distinct_color(rng, image, cx, cy))
        boxes.append(box)
        objects.append((kind, bbox))
    return image, objects


def _overlap(a, b) -> float:
    """Intersection over the smaller box: small shapes may touch big ones, never hide in them."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return iw * ih / min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))


def write_split(out: Path, split: str, count: int, size: tuple[int, int], rng, max_objects: int = 5,
                aspects=None) -> Path:
    """`count` scenes of `size` (H, W), or with `aspects`, of those frame shapes in turn."""
    folder = out / split
    folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(count):
        image, objects = scene(rng, *(frame_size(size, aspects[i % len(aspects)]) if aspects else size),
                               max_objects=max_objects)
        name = f"{i:06d}.jpg"
        with atomic_path(folder / name) as tmp:
            cv2.imwrite(str(tmp), image, [cv2.IMWRITE_JPEG_QUALITY, 92])
        images.append({"id": i + 1, "file_name": name, "height": image.shape[0], "width": image.shape[1]})
        for kind, (x, y, w, h) in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": kind + 1,
                                "bbox": [round(v, 2) for v in (x, y, w, h)], "area": round(w * h, 2),
                                "iscrowd": 0})
    categories = [{"id": k + 1, "name": name, "supercategory": "shape"} for k, name in enumerate(CLASSES)]
    path = out / "annotations" / f"instances_{split}.json"
    write_json(path, {"images": images, "annotations": annotations, "categories": categories})
    return path


def write_video(path: Path, frames: int, size: tuple[int, int], rng, fps: int = 15,
                tracks: Path | None = None) -> Path:
    """Shapes moving across a fixed cluttered background, bouncing off the edges.

    `tracks`: also write the true tracks there (`write_tracks`): the boxes draw_shape
    returns, so the video's pixels and the rng's draws are the same with or without."""
    height, width = size
    base = background(rng, height, width)
    short = min(height, width)
    movers = []
    for _ in range(4):
        r = float(rng.uniform(0.08, 0.2) * short)
        movers.append({"kind": CLASSES[int(rng.integers(len(CLASSES)))], "r": r,
                       "pos": rng.uniform([r, r], [width - r, height - r]), "vel": rng.uniform(-4, 4, 2),
                       "color": tuple(int(c) for c in rng.integers(0, 256, 3))})
    rows = []
    with atomic_path(path) as tmp:
        writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
        if not writer.isOpened():
            raise UserError(f"{path}: OpenCV cannot write mp4 here")
        for index in range(frames):
            frame = base.copy()
            boxes = []
            for m in movers:
                m["pos"] += m["vel"]
                for axis, limit in ((0, width), (1, height)):
                    if not m["r"] <= m["pos"][axis] <= limit - m["r"]:
                        m["vel"][axis] *= -1
                        m["pos"][axis] = np.clip(m["pos"][axis], m["r"], limit - m["r"])
                boxes.append(draw_shape(frame, m["kind"], *m["pos"], m["r"], m["color"]))
            writer.write(frame)
            if tracks is not None:
                visible = _visibility(movers, size)
                rows += [(index, i, CLASSES.index(m["kind"]) + 1, box, visible[i])
                         for i, (m, box) in enumerate(zip(movers, boxes))]
        writer.release()
    if tracks is not None:
        write_tracks(tracks, rows)
    return path


def _visibility(movers, size) -> list[float]:
    """The share of each shape's pixels not covered by the shapes drawn after it."""
    masks = []
    for m in movers:
        mask = np.zeros(size, np.uint8)
        draw_shape(mask, m["kind"], *m["pos"], m["r"], 255)
        masks.append(mask > 0)
    shares = []
    for i, mask in enumerate(masks):
        covered = np.logical_or.reduce(masks[i + 1:]) if i + 1 < len(masks) else np.zeros(size, bool)
        shares.append(float((mask & ~covered).sum() / max(1, mask.sum())))
    return shares


def write_tracks(path: Path, rows) -> Path:
    """MOTChallenge ground truth (MOT16/17 gt.txt), one line per object per frame:
    `frame, id, left, top, width, height, 1, 1, visibility, label`: frame and id from 1,
    MOT's conventions; class 1 (MOT's one target class: its tools drop or ignore other
    classes as distractors) and the shape's category id (the COCO files', the model's
    label) in the 10th column, which the MOT tools (TrackEval, motmetrics, trackers.eval)
    do not read."""
    lines = [f"{frame + 1},{track + 1},{x:.2f},{y:.2f},{w:.2f},{h:.2f},1,1,{visible:.3f},{label}"
             for frame, track, label, (x, y, w, h), visible in rows]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in lines))
    return Path(path)


def read_tracks(path: Path, frames: int | None = None) -> list[dict]:
    """write_tracks' file -> per frame (index from 0, as the video decodes) {'ids' int64 [N],
    'labels' int64 [N], 'boxes' float32 [N, 4] xyxy pixels, 'visibility' float32 [N]};
    `frames`: that many frames (a frame without objects is empty), else up to the last."""
    table = np.loadtxt(path, delimiter=",", ndmin=2) if Path(path).stat().st_size else np.zeros((0, 10))
    count = frames if frames is not None else int(table[:, 0].max(initial=0))
    out = []
    for index in range(count):
        rows = table[table[:, 0] == index + 1]
        x, y, w, h = rows[:, 2:6].T
        out.append({"ids": rows[:, 1].astype(np.int64), "labels": rows[:, 9].astype(np.int64),
                    "boxes": np.stack([x, y, x + w, y + h], 1).astype(np.float32),
                    "visibility": rows[:, 8].astype(np.float32)})
    return out


# the videos in the other shapes of cameras that `synthesize` writes with `aspects` (H, W)
CAMERA_VIDEOS = {"shapes-16x9.mp4": (180, 320), "shapes-9x16.mp4": (320, 180)}


def synthesize(out, train: int = 2000, val: int = 200, size=(192, 192), video_frames: int = 150,
               seed: int = 0, max_objects: int = 5, aspects=None, train_objects: int | None = None,
               train_aspects=None) -> dict:
    """The shapes dataset: `train` and `val` (square, or `size`) splits and the video
    shapes.mp4 (4:3). With `aspects` (e.g. CAMERA_ASPECTS), the training images take those
    frame shapes in turn, a `cameras` split of `val` images does too (the deployment
    geometry, to validate on), and a video per other camera shape follows (16:9, 9:16).
    `train_objects`: the training scenes' most objects, where denser than the others'
    (`max_objects`): more objects per image, more supervision per step. `train_aspects`:
    the training images' shapes where other than the cameras' (`aspects`)."""
    out = Path(out)
    # one stream per part (NumPy's SeedSequence.spawn), so that each part's scenes depend on
    # the seed alone: more training images or denser ones leave `val`, `cameras` and the videos as they were
    train_rng, val_rng, video_rng, cameras_rng, *camera_video_rngs = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4 + len(CAMERA_VIDEOS)))
    paths = {"train": write_split(out, "train", train, size, train_rng, train_objects or max_objects,
                                  train_aspects or aspects),
             "val": write_split(out, "val", val, size, val_rng, max_objects),
             # the true tracks beside the video, for `--track` (tests/test_tracking.py)
             "video": write_video(out / "shapes.mp4", video_frames, (240, 320), video_rng,
                                  tracks=out / "shapes.gt.txt")}
    if aspects:
        paths["cameras"] = write_split(out, "cameras", val, size, cameras_rng, max_objects, aspects)
        for (name, shape), rng in zip(CAMERA_VIDEOS.items(), camera_video_rngs):
            paths[name] = write_video(out / name, video_frames, shape, rng,
                                      tracks=out / name.replace(".mp4", ".gt.txt"))
    return paths
