"""Where DETR looks: the paper's attention figures, from a PyTorch checkpoint.

- Decoder cross-attention of the last layer, per detected object: which cells of the
  H/32 x W/32 feature map the object's query reads (the paper's Fig. 6, where queries
  attend to object extremities).
- Encoder self-attention of the last layer at reference points (the paper's Fig. 3,
  where the encoder already separates instances).

Weights are captured by forward hooks that exist only inside `AttentionRecorder`'s
`with` block: the model's code and its exported graph never change, and normal
inference pays nothing.
"""
from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

from detr_edge.runtime.draw import class_color, draw_detections
from detr_edge.runtime.errors import UserError
from detr_edge.runtime.io import atomic_path, read_image, write_json
from detr_edge.runtime.metadata import preprocess_spec
from detr_edge.runtime.preprocess import preprocess

from .checkpoint import load_model
from .detr import DETR, postprocess


class AttentionRecorder:
    """`with AttentionRecorder(model) as rec: model(images, mask)` -> `rec.encoder`
    [B, heads, hw, hw] and `rec.decoder` [B, heads, N, hw] (last layers, each head's
    softmax weights; padded keys get 0) and `rec.grid` (h, w) of the feature map."""

    def __init__(self, model: DETR):
        self.model = model
        self.encoder = self.decoder = self.grid = None
        self._handles = []

    def __enter__(self) -> "AttentionRecorder":
        def per_head(_module, args, kwargs):
            return args, {**kwargs, "need_weights": True, "average_attn_weights": False}

        def keep(name):
            def hook(_module, _args, output):
                setattr(self, name, output[1].detach())
            return hook

        transformer = self.model.transformer
        for name, attention in (("encoder", transformer.encoder.layers[-1].self_attn),
                                ("decoder", transformer.decoder.layers[-1].multihead_attn)):
            self._handles += [attention.register_forward_pre_hook(per_head, with_kwargs=True),
                              attention.register_forward_hook(keep(name))]
        self._handles.append(self.model.input_proj.register_forward_hook(
            lambda _m, _a, out: setattr(self, "grid", tuple(out.shape[-2:]))))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


@dataclass
class Explanation:
    """One image's attention. Maps are on the feature grid (h, w), per head."""
    frame: np.ndarray
    spec: dict
    scale: float                 # letterbox resize factor of the frame
    queries: list[int]
    detections: dict             # per query in `queries`: scores, labels, boxes (xyxy, frame pixels)
    decoder: np.ndarray          # [Q, heads, h, w]
    points: list[tuple[float, float]] = field(default_factory=list)  # (x, y) in frame pixels
    encoder: np.ndarray | None = None  # [P, heads, h, w]

    def to_frame(self, grid_map: np.ndarray, zoom: int = 1) -> np.ndarray:
        """A [h, w] map -> [H, W] over the frame (times zoom): upsampled to the input canvas
        (each cell covers stride x stride pixels), the letterbox padding cut, resized."""
        canvas_h, canvas_w = self.spec["imgsz"]
        up = cv2.resize(grid_map.astype(np.float32), (canvas_w, canvas_h), interpolation=cv2.INTER_LINEAR)
        height, width = self.frame.shape[:2]
        valid = up[:max(1, round(height * self.scale)), :max(1, round(width * self.scale))]
        return cv2.resize(valid, (width * zoom, height * zoom), interpolation=cv2.INTER_LINEAR)

    def peak(self, grid_map: np.ndarray) -> tuple[float, float]:
        """Frame pixel (x, y) at the centre of the map's hottest feature cell."""
        row, col = np.unravel_index(int(np.argmax(grid_map)), grid_map.shape)
        stride_y, stride_x = (s / g for s, g in zip(self.spec["imgsz"], grid_map.shape))
        return (col + 0.5) * stride_x / self.scale, (row + 0.5) * stride_y / self.scale


def _select(scores: np.ndarray, queries: str, conf: float) -> list[int]:
    """'top': queries detecting above conf (the best one if none does); 'all'; or 'i,j'."""
    count = len(scores)
    if queries == "all":
        return list(range(count))
    if queries == "top":
        chosen = [int(i) for i in np.argsort(-scores, kind="stable") if scores[i] >= conf]
        return chosen or [int(np.argmax(scores))]
    try:
        chosen = [int(v) for v in queries.split(",")]
    except ValueError:
        raise UserError(f"--queries {queries!r}: say top, all, or query indices like 3,17") from None
    if not chosen or any(not 0 <= i < count for i in chosen):
        raise UserError(f"--queries {queries!r}: query indices run from 0 to {count - 1}")
    return chosen


@torch.no_grad()
def explain(model: DETR, frame: np.ndarray, spec: dict, queries: str = "top", conf: float = 0.5,
            points: list[tuple[float, float]] | None = None) -> Explanation:
    """Run the model once on a BGR frame, recording its last-layer attention.

    Without `points`, the encoder view is taken at the centres of the chosen detections."""
    batch = preprocess([frame], spec)
    model.eval()
    with AttentionRecorder(model) as rec:
        out = model(torch.from_numpy(batch.images), torch.from_numpy(batch.mask))
    # each query as its own batch row: postprocess's score, label and pixel box, in query order
    logits, boxes = out["pred_logits"].transpose(0, 1), out["pred_boxes"].transpose(0, 1)
    rows = postprocess(logits, boxes, torch.from_numpy(batch.sizes).expand(len(logits), 2))
    per_query = {k: np.concatenate([r[k].numpy() for r in rows]) for k in rows[0]}
    scores = per_query["scores"]
    chosen = _select(scores, queries, conf)
    h, w = rec.grid
    decoder = rec.decoder[0, :, chosen].permute(1, 0, 2).reshape(len(chosen), -1, h, w).numpy()
    detections = {k: v[chosen] for k, v in per_query.items()}
    if points is None:  # the centres of the chosen detections above conf (or of the best one)
        above = scores[chosen] >= conf
        boxes = detections["boxes"][above] if above.any() else detections["boxes"][:1]
        points = [((x1 + x2) / 2, (y1 + y2) / 2) for x1, y1, x2, y2 in boxes.tolist()]
    scale = float(batch.scales[0])
    cells = [_cell(x, y, frame.shape[:2], scale, spec["imgsz"], (h, w)) for x, y in points]
    encoder = rec.encoder[0][:, cells].permute(1, 0, 2).reshape(len(cells), -1, h, w).numpy()
    return Explanation(frame, spec, scale, chosen, detections, decoder, list(points), encoder)


def _cell(x: float, y: float, frame_hw, scale: float, imgsz, grid) -> int:
    """Index of the feature cell under frame pixel (x, y)."""
    height, width = frame_hw
    if not (0 <= x < width and 0 <= y < height):
        raise UserError(f"--points {x:g},{y:g}: outside the {width}x{height} image")
    row = min(int(y * scale * grid[0] / imgsz[0]), grid[0] - 1)
    col = min(int(x * scale * grid[1] / imgsz[1]), grid[1] - 1)
    return row * grid[1] + col


def _heat(frame: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The frame dimmed, with weights (scaled to their max) as a colour map over it."""
    peak = float(weights.max())
    heat = cv2.applyColorMap(np.uint8(255 * weights / peak if peak > 0 else weights * 0), cv2.COLORMAP_JET)
    return cv2.addWeighted(frame, 0.45, heat, 0.55, 0)


def _panel(image: np.ndarray, title: str) -> np.ndarray:
    bar = np.full((22, image.shape[1], 3), 255, np.uint8)
    cv2.putText(bar, title, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return np.vstack([bar, image])


def _figure(panels: list[np.ndarray], per_row: int = 4) -> np.ndarray:
    rows = []
    for start in range(0, len(panels), per_row):
        row = panels[start:start + per_row]
        row += [np.full_like(panels[0], 255)] * (min(per_row, len(panels)) - len(row))
        rows.append(np.hstack([np.pad(p, ((2, 2), (2, 2), (0, 0)), constant_values=255) for p in row]))
    return np.vstack(rows)


def _write_png(path: Path, image: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        if not cv2.imwrite(str(tmp), image):
            raise UserError(f"{path.parent}: could not write {path.name}")


def write(ex: Explanation, classes: list[str], out_dir, heads: bool = False) -> dict:
    """One PNG per query and per reference point, index.html and explain.json in out_dir."""
    out_dir = Path(out_dir)
    zoom = max(1, 384 // max(ex.frame.shape[:2]))  # small inputs (the demo's 128 px) drawn larger
    shown = cv2.resize(ex.frame, None, fx=zoom, fy=zoom, interpolation=cv2.INTER_LINEAR) if zoom > 1 else ex.frame

    def maps(per_head: np.ndarray) -> list[tuple[str, np.ndarray]]:
        chosen = [("mean of heads", per_head.mean(0))]
        return chosen + [(f"head {h}", m) for h, m in enumerate(per_head)] if heads else chosen

    views = {"decoder": [], "encoder": []}
    for i, query in enumerate(ex.queries):
        det = {k: v[i:i + 1] for k, v in ex.detections.items()}
        drawn = {**det, "boxes": det["boxes"] * zoom}
        panels = [_panel(draw_detections(shown, drawn, classes), f"query {query}")]
        panels += [_panel(draw_detections(_heat(shown, ex.to_frame(m, zoom)), drawn, classes), title)
                   for title, m in maps(ex.decoder[i])]
        name = f"decoder_q{query:03d}.png"
        _write_png(out_dir / name, _figure(panels))
        label = int(det["labels"][0])
        views["decoder"].append({"file": name, "query": query, "score": round(float(det["scores"][0]), 4),
                                 "label": label, "name": classes[label] if label < len(classes) else str(label),
                                 "box": _rounded(det["boxes"][0]), "peak": _rounded(ex.peak(ex.decoder[i].mean(0)))})
    radius = max(3, round(max(shown.shape[:2]) / 100))
    for i, (x, y) in enumerate(ex.points):
        centre = (round(x * zoom), round(y * zoom))
        panels = [_panel(cv2.circle(shown.copy(), centre, radius, class_color(i), -1), f"point ({x:.0f}, {y:.0f})")]
        panels += [_panel(cv2.circle(_heat(shown, ex.to_frame(m, zoom)), centre, radius, (255, 255, 255), -1), title)
                   for title, m in maps(ex.encoder[i])]
        name = f"encoder_x{x:.0f}_y{y:.0f}.png"
        _write_png(out_dir / name, _figure(panels))
        views["encoder"].append({"file": name, "point": _rounded((x, y)), "peak": _rounded(ex.peak(ex.encoder[i].mean(0)))})
    write_json(out_dir / "explain.json", views)
    with atomic_path(out_dir / "index.html") as tmp:
        tmp.write_text(_index(views))
    return views


def _rounded(values) -> list[float]:
    return [round(float(v), 2) for v in values]


def _index(views: dict) -> str:
    parts = ["<!doctype html><meta charset=utf-8><title>detr-edge explain</title>",
             "<style>body{font-family:sans-serif}img{max-width:100%}</style>",
             "<h1>Decoder cross-attention, last layer</h1>",
             "<p>Which feature cells each detected object's query reads (weights over the H/32 x W/32 map, "
             "upsampled; red = most).</p>"]
    for v in views["decoder"]:
        caption = f"query {v['query']}: {html.escape(v['name'])} {v['score']:.2f}, box {v['box']}"
        parts.append(f"<figure><img src='{v['file']}'><figcaption>{caption}</figcaption></figure>")
    parts.append("<h1>Encoder self-attention, last layer</h1><p>What the feature cell under each point "
                 "attends to.</p>")
    for v in views["encoder"]:
        parts.append(f"<figure><img src='{v['file']}'><figcaption>point {v['point']}</figcaption></figure>")
    return "\n".join(parts) + "\n"


def parse_points(values: list[str] | None) -> list[tuple[float, float]] | None:
    if not values:
        return None
    try:
        points = [tuple(float(v) for v in text.split(",")) for text in values]
        if any(len(p) != 2 for p in points):
            raise ValueError
        return points  # type: ignore[return-value]
    except ValueError:
        raise UserError(f"--points {' '.join(values)}: give x,y pixel pairs like 120,80") from None


def run(checkpoint, image, out_dir, queries="top", points=None, conf=0.5, heads=False, imgsz=None) -> dict:
    model, config = load_model(checkpoint)
    spec = preprocess_spec(imgsz) if imgsz else config["preprocess"]
    ex = explain(model, read_image(image), spec, queries, conf, parse_points(points))
    return write(ex, config["classes"], out_dir, heads)
