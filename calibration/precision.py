"""Reduced precision in the graph, the one rule for it: which nodes stay FP32 when a file
goes FP16 (LayerNormalization, Softmax, the sine position embedding, the in-graph
postprocessing: FP16 LayerNorm is the known cause of DETR engines losing half their AP),
and the conversion, by onnxruntime's float16 converter. Three places use it:
export/fp16.py for the FP16 file, quantize.py for the TensorRT INT8 file's FP16 graph
(FP16 between its Q/DQ pairs), and export/trt_plan.py for the layers a weakly typed
TensorRT build pins to FP32.

- op types: LayerNormalization, Softmax (plus the converter's own block list);
- nodes by name (node names carry the PyTorch module path): every LayerNorm (so the
  opset-16 decomposed pattern stays FP32 too), the sine position embedding (cumsum of the
  mask, division, sin/cos: large intermediate values), and the in-graph postprocessing;
- the graph inputs and outputs (`keep_io_types`), so callers feed and read float32.
"""
from __future__ import annotations

import logging

from detr_edge.runtime.errors import UserError

KEEP_FP32_OPS = ("LayerNormalization", "Softmax")
# substrings of node names (TorchScript names nodes by module path, e.g.
# '/model/transformer/encoder/layers.0/norm1/ReduceMean'): every LayerNorm (norm, norm1..3),
# the position embedding (Joiner's second module), the in-graph postprocessing
KEEP_FP32_NAMES = ("/norm", "/backbone.1/", "/detections/")
QDQ = ("QuantizeLinear", "DequantizeLinear")
FP16_QDQ_OPSET = 19  # QuantizeLinear/DequantizeLinear take FP16 inputs and scales from opset 19


def keeps_fp32(node, ops=KEEP_FP32_OPS, names=KEEP_FP32_NAMES) -> bool:
    """Whether the rule keeps `node` FP32: a kept op type, or a name with a kept substring.
    Q/DQ nodes belong to the quantized layer they feed, whatever their name says."""
    if node.op_type in QDQ:
        return False
    return node.op_type in ops or any(part in node.name for part in names)


def fp32_nodes(graph, ops=KEEP_FP32_OPS, names=KEEP_FP32_NAMES) -> list[str]:
    """The nodes of `graph` (any precision) that compute in FP32 under the rule. A Cast
    among them counts only when it casts to FP32: the converter's casts to FP16 at the
    edges of the kept parts carry the kept nodes' names but produce FP16."""
    from onnx import TensorProto

    def casts_to_fp32(node) -> bool:
        return next(a.i for a in node.attribute if a.name == "to") == TensorProto.FLOAT
    return [n.name for n in graph.graph.node
            if keeps_fp32(n, ops, names) and (n.op_type != "Cast" or casts_to_fp32(n))]


def to_fp16(graph, keep_ops=KEEP_FP32_OPS, keep_names=KEEP_FP32_NAMES, source="graph"):
    """The FP16 version of a loaded FP32 graph (plain or with Q/DQ, which opset 19 lets run in
    FP16 too), the kept nodes FP32 and the I/O float32; returns (graph, number of nodes kept
    by name)."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    # it logs every initializer shared by an FP32 and an FP16 node (e.g. equal zero biases) at INFO
    logging.getLogger("onnxruntime.transformers.float16").setLevel(logging.WARNING)
    blocked = [node.name for node in graph.graph.node if keeps_fp32(node, (), keep_names)]
    graph = convert_float_to_float16(graph, keep_io_types=True,
                                     op_block_list=sorted(set(DEFAULT_OP_BLOCK_LIST) | set(keep_ops)),
                                     node_block_list=blocked)
    OnnxModel(graph).topological_sort()  # the converter appends the input casts after their consumers
    try:
        onnx.checker.check_model(graph)
    except onnx.checker.ValidationError as exc:
        import onnxruntime
        raise UserError(f"{source}: the FP16 graph from onnxruntime {onnxruntime.__version__}'s float16 converter "
                        f"fails onnx.checker ({str(exc).splitlines()[0][:160]}); 1.30 and 1.31 are known to: use "
                        "1.32 or newer") from None
    return graph, len(blocked)


def fp16_around_qdq(graph, meta: dict):
    """The TensorRT INT8 file's graph FP16 between its Q/DQ pairs, Q/DQ included (opset 19),
    the kept nodes FP32: what a strongly typed TensorRT 10/11 build runs as it reads it. A
    target whose TensorRT parses no opset 19 (8.x: weakly typed, FP16 from the builder's
    flags) keeps the FP32 graph. Updates `meta`'s opset and kept_fp32."""
    from onnx import version_converter

    export = meta["export"]
    if export.get("target_opsets", [None, FP16_QDQ_OPSET])[1] < FP16_QDQ_OPSET:  # its target's highest
        return graph
    graph, kept = to_fp16(version_converter.convert_version(graph, FP16_QDQ_OPSET), source="the INT8 graph")
    export.update(opset=FP16_QDQ_OPSET, kept_fp32={"ops": list(KEEP_FP32_OPS), "names": list(KEEP_FP32_NAMES),
                                                   "nodes": kept})
    export["int8"]["graph"] = "fp16"
    return graph
