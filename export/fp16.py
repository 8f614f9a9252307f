"""FP32 ONNX -> the FP16 file (`*.fp16.onnx`) with the numerically fragile parts kept FP32.
TensorRT 11 takes precision only from the file (tensorrt.md), so what stays FP32 is
decided in the graph, by the one rule of calibration/precision.py (which the TensorRT INT8
file and the build plan's FP32 pins share).
"""
from __future__ import annotations

from pathlib import Path

from detr_edge.calibration.precision import KEEP_FP32_NAMES, KEEP_FP32_OPS, to_fp16
from detr_edge.runtime.errors import UserError
from detr_edge.runtime.io import atomic_path


def convert_fp16(src, dst, keep_ops=KEEP_FP32_OPS, keep_names=KEEP_FP32_NAMES) -> dict:
    """Write `dst` as the FP16 variant of `src`; returns its metadata. Nodes of a type in
    `keep_ops`, or whose name contains one of `keep_names`, stay FP32."""
    import onnx

    from detr_edge.runtime.metadata import read_onnx_metadata, write_onnx_metadata

    graph = onnx.load(str(src))
    meta = read_onnx_metadata(graph, src)
    if meta.get("export", {}).get("precision") != "fp32":
        raise UserError(f"{src}: already {meta['export']['precision']}; convert the FP32 file")
    graph, kept = to_fp16(graph, keep_ops, keep_names, src)
    meta["export"].update(precision="fp16", kept_fp32={"ops": list(keep_ops), "names": list(keep_names),
                                                        "nodes": kept})
    write_onnx_metadata(graph, meta)
    with atomic_path(Path(dst)) as tmp:
        onnx.save(graph, str(tmp))
    return meta
