"""Checkpoint -> ONNX with the I/O contract of DESIGN.md: `images` float32 [B,3,H,W] and
`mask` bool [B,H,W] (True = padding) -> `logits` [B,N,K+1], `boxes` [B,N,4] (cxcywh of the
unpadded image), or with `postprocess=True` -> `scores` [B,K], `labels` [B,K],
`boxes_xyxy` [B,K,4] in input pixels (top-k with a constant K, no DETR knowledge needed).

Exporter: torch's TorchScript-based one (`dynamo=False`). Both exporters match PyTorch
to ~1e-6; the TorchScript one is the one that takes an opset below 18 directly (TensorRT
8.5 needs 16, with LayerNorm decomposed, which it does by itself there) and, after
onnxslim, leaves a graph of plain ops (docs/export.md has the comparison)."""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision.ops import box_convert

from detr_edge.runtime.errors import UserError
from detr_edge.runtime.io import atomic_path
from detr_edge.runtime.metadata import preprocess_spec, write_onnx_metadata
from .trt_plan import TARGETS

log = logging.getLogger(__name__)



class Raw(nn.Module):
    """The model's last decoder layer as two plain tensors (no aux outputs)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images, mask):
        out = self.model(images, mask)
        return out["pred_logits"], out["pred_boxes"]


class Detections(nn.Module):
    """In-graph twin of `runtime.postprocess.postprocess` up to the frame scale: softmax,
    drop no-object, best class, top-k (constant K), xyxy in input pixels clipped to the
    unpadded image (read from the mask: padding is bottom/right)."""

    def __init__(self, topk: int):
        super().__init__()
        self.topk = topk

    def forward(self, logits, boxes, mask):
        scores, labels = logits.softmax(-1)[..., :-1].max(-1)
        valid_w = (~mask[:, 0, :]).sum(-1).to(boxes.dtype)
        valid_h = (~mask[:, :, 0]).sum(-1).to(boxes.dtype)
        scale = torch.stack([valid_w, valid_h, valid_w, valid_h], -1)[:, None, :]
        xyxy = torch.minimum((box_convert(boxes, "cxcywh", "xyxy") * scale).clamp(min=0), scale)
        scores, order = scores.topk(self.topk, dim=1)
        labels = labels.gather(1, order)
        xyxy = xyxy.gather(1, order[..., None].expand(-1, -1, 4))
        return scores, labels, xyxy


class WithDetections(nn.Module):
    def __init__(self, model, topk: int):
        super().__init__()
        self.raw, self.detections = Raw(model), Detections(topk)

    def forward(self, images, mask):
        logits, boxes = self.raw(images, mask)
        return self.detections(logits, boxes, mask)


RAW_OUTPUTS = ["logits", "boxes"]
DETECTION_OUTPUTS = ["scores", "labels", "boxes_xyxy"]


@dataclass
class ExportOptions:
    imgsz: tuple[int, int] | None = None  # default: the checkpoint's
    batch: int = 1
    dynamic_batch: bool = False
    target: str = "ort"
    opset: int | None = None
    postprocess: bool = False
    max_det: int = 100


def resolve_opset(target: str, opset: int | None) -> int:
    if target not in TARGETS:
        raise UserError(f"unknown target {target!r}: one of {', '.join(TARGETS)}")
    default, low, high = TARGETS[target]
    if opset is None:
        return default
    if not low <= opset <= high:
        hint = " (TensorRT 8.5 cannot parse LayerNormalization, opset 17's; use 16)" if target == "trt8.5" else ""
        raise UserError(f"opset {opset} is not supported for target {target}: {low}..{high}{hint}")
    return opset


def export_onnx(model, config: dict, out, options: ExportOptions, source: str = "") -> dict:
    """Trace `model` (a DETR in eval mode) to `out`, simplify, check, embed the metadata.
    Returns the metadata written."""
    import onnx

    opset = resolve_opset(options.target, options.opset)
    if options.batch < 1:
        raise UserError(f"batch {options.batch} must be >= 1")
    imgsz = tuple(options.imgsz or config["preprocess"]["imgsz"])
    spec = preprocess_spec(imgsz)
    num_queries = model.config.num_queries
    topk = min(options.max_det, num_queries)
    wrapper = (WithDetections(model, topk) if options.postprocess else Raw(model)).eval()
    outputs = DETECTION_OUTPUTS if options.postprocess else RAW_OUTPUTS
    images = torch.zeros(options.batch, 3, *imgsz)
    mask = torch.zeros(options.batch, *imgsz, dtype=torch.bool)
    mask[:, imgsz[0] * 3 // 4:, :] = True  # a real padding pattern, so nothing folds to "no padding"
    dynamic_axes = ({name: {0: "batch"} for name in ["images", "mask", *outputs]}
                    if options.dynamic_batch else None)
    meta = {"model": config["model"], "classes": config["classes"], "preprocess": spec,
            "export": {"precision": "fp32", "outputs": "detections" if options.postprocess else "raw",
                       "max_det": topk if options.postprocess else None,
                       "batch": "dynamic" if options.dynamic_batch else options.batch,
                       "opset": opset, "target": options.target, "target_opsets": list(TARGETS[options.target][1:]),
                       "exporter": f"torch {torch.__version__} torchscript",
                       "source": source}}
    out = Path(out)
    with atomic_path(out) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python scalars in shapes
        with torch.no_grad():
            torch.onnx.export(wrapper, (images, mask), str(tmp), input_names=["images", "mask"],
                              output_names=outputs, dynamic_axes=dynamic_axes, opset_version=opset,
                              do_constant_folding=True, dynamo=False)
        graph = simplify(onnx.load(str(tmp)))
        num_classes = model.config.num_classes
        shapes = ([[topk], [topk], [topk, 4]] if options.postprocess
                  else [[num_queries, num_classes + 1], [num_queries, 4]])
        for value, dims in zip(graph.graph.output, shapes):
            _set_dims(value, ["batch" if options.dynamic_batch else options.batch, *dims])
        write_onnx_metadata(graph, meta)
        onnx.checker.check_model(graph, full_check=True)
        onnx.save(graph, str(tmp))
    log.info("wrote %s (opset %d, %s batch, %s outputs)", out, opset, meta["export"]["batch"],
             meta["export"]["outputs"])
    return meta


def _set_dims(value, dims) -> None:
    """Write a known shape into a graph input/output (the tracer leaves N symbolic)."""
    shape = value.type.tensor_type.shape
    del shape.dim[:]
    for dim in dims:
        if isinstance(dim, str):
            shape.dim.add().dim_param = dim
        else:
            shape.dim.add().dim_value = dim


def simplify(graph):
    """onnxslim: constant folding, dead-node removal, shape-op cleanup."""
    import onnxslim
    return onnxslim.slim(graph)
