"""The metadata that travels with every artifact (checkpoint `config`, ONNX
`metadata_props`, engine sidecar): class names and preprocessing.

A plain JSON-able dict, so the runtime reads it without torch:
    {"model": {...architecture...}, "classes": [...], "preprocess": {...}}
"""
from __future__ import annotations

import json

from .errors import UserError

METADATA_KEY = "detr_edge"  # key in ONNX metadata_props holding the JSON
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def preprocess_spec(imgsz: tuple[int, int]) -> dict:
    """The preprocessing every stage applies: letterbox to H x W, pad bottom/right, RGB, ImageNet mean/std."""
    height, width = (int(v) for v in imgsz)
    return {"imgsz": [height, width], "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
            "pad": "bottom-right", "color": "RGB"}


def parse_imgsz(text: str) -> tuple[int, int]:
    """'640' -> (640, 640); '480x640' -> (480, 640) (H x W). Multiples of 32 (the backbone stride)."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        raise UserError(f"image size {text!r} is not H x W (e.g. 640 or 480x640)") from None
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) <= 0:
        raise UserError(f"image size {text!r} is not H x W (e.g. 640 or 480x640)")
    if any(p % 32 for p in parts):
        raise UserError(f"image size {text!r} must be a multiple of 32 (the backbone stride) in both dimensions")
    return parts[0], parts[1]


def validate(meta: dict, source: str = "metadata") -> dict:
    """Check the fields every consumer relies on; one clear error otherwise."""
    if not isinstance(meta, dict):
        raise UserError(f"{source}: metadata is not a JSON object")
    for key in ("model", "classes", "preprocess"):
        if key not in meta:
            raise UserError(f"{source}: metadata lacks {key!r} (not made by detr-edge?)")
    pre = meta["preprocess"]
    if not isinstance(pre, dict) or len(pre.get("imgsz", ())) != 2:
        raise UserError(f"{source}: metadata 'preprocess' lacks a two-value 'imgsz'")
    return meta


def loads(text: str, source: str = "metadata") -> dict:
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{source}: metadata is not valid JSON ({exc.msg})") from None
    return validate(meta, source)


def read_onnx_metadata(model, source) -> dict:
    """The metadata of a loaded ONNX ModelProto (no onnx import needed); one clear error without it."""
    props = {p.key: p.value for p in model.metadata_props}
    if METADATA_KEY not in props:
        raise UserError(f"{source}: ONNX file without detr-edge metadata (not exported by detr-edge)")
    return loads(props[METADATA_KEY], str(source))


def write_onnx_metadata(model, meta: dict) -> None:
    """Set (or replace) the metadata in a ModelProto's metadata_props, keeping other entries."""
    props = {p.key: p.value for p in model.metadata_props}
    props[METADATA_KEY] = json.dumps(meta)
    del model.metadata_props[:]
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
