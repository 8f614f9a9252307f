"""FP32 ONNX -> FP16 ONNX with the numerically fragile parts kept FP32, by onnxruntime's
float16 converter. TensorRT 11 takes precision only from the file (tensorrt.md), and
FP16 LayerNorm is the known cause of DETR engines losing half their AP, so what stays
FP32 is decided here, in the graph:

- op types: LayerNormalization, Softmax (plus the converter's own block list);
- nodes by name (node names carry the PyTorch module path): every LayerNorm (so the
  opset-16 decomposed pattern stays FP32 too), the sine position embedding (cumsum of the
  mask, division, sin/cos: large intermediate values), and the in-graph postprocessing;
- the graph inputs and outputs (`keep_io_types`), so callers feed and read float32.
"""
from __future__ import annotations

import logging
from pathlib import Path

from runtime.errors import UserError
from runtime.io import atomic_path

KEEP_FP32_OPS = ("LayerNormalization", "Softmax")
# substrings of node names (TorchScript names nodes by module path, e.g.
# '/model/transformer/encoder/layers.0/norm1/ReduceMean'): every LayerNorm (norm, norm1..3),
# the position embedding (Joiner's second module), the in-graph postprocessing
KEEP_FP32_NAMES = ("/norm", "/backbone.1/", "/detections/")


def convert_fp16(src, dst, keep_ops=KEEP_FP32_OPS, keep_names=KEEP_FP32_NAMES) -> dict:
    """Write `dst` as the FP16 variant of `src`; returns its metadata. Nodes of a type in
    `keep_ops`, or whose name contains one of `keep_names`, stay FP32."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    from runtime.metadata import read_onnx_metadata, write_onnx_metadata

    # it logs every initializer shared by an FP32 and an FP16 node (e.g. equal zero biases) at INFO
    logging.getLogger("onnxruntime.transformers.float16").setLevel(logging.WARNING)
    graph = onnx.load(str(src))
    meta = read_onnx_metadata(graph, src)
    if meta.get("export", {}).get("precision") != "fp32":
        raise UserError(f"{src}: already {meta['export']['precision']}; convert the FP32 file")
    blocked = [node.name for node in graph.graph.node if any(part in node.name for part in keep_names)]
    graph = convert_float_to_float16(graph, keep_io_types=True,
                                     op_block_list=sorted(set(DEFAULT_OP_BLOCK_LIST) | set(keep_ops)),
                                     node_block_list=blocked)
    OnnxModel(graph).topological_sort()  # the converter appends the input casts after their consumers
    meta["export"].update(precision="fp16", kept_fp32={"ops": list(keep_ops), "names": list(keep_names),
                                                        "nodes": len(blocked)})
    write_onnx_metadata(graph, meta)
    try:
        onnx.checker.check_model(graph)
    except onnx.checker.ValidationError as exc:
        import onnxruntime
        raise UserError(f"{src}: the FP16 graph from onnxruntime {onnxruntime.__version__}'s float16 converter fails "
                        f"onnx.checker ({str(exc).splitlines()[0][:160]}); 1.30 and 1.31 are known to: use 1.32 or "
                        "newer") from None
    with atomic_path(Path(dst)) as tmp:
        onnx.save(graph, str(tmp))
    return meta
