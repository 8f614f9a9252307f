"""Explicit INT8: Q/DQ ONNX files from one calibration run, by onnxruntime's quantization
tools (`quantize_static`, QDQ format; its calibration cache lets both flavours share one
pass over the data).

- `trt`  -> `*.int8.onnx`: symmetric int8 activations and weights (zero points 0),
  per-channel weight scales, biases left float: what TensorRT's parser accepts
  (../shared/reference/tensorrt.md). Placed as TensorRT fuses them: a dedicated Q/DQ
  pair per consumer, none on the outputs of Conv/MatMul/Gemm, and the MatMuls between
  two activations (attention's Q.K^T and softmax.V) float unless `attention` is set.
  The graph around them is FP16, as NVIDIA's ModelOpt makes it for strongly typed
  TensorRT 10/11 builds (where every unquantized layer runs in its tensors' precision):
  opset 19, FP16 Q/DQ scales, the FP16 file's FP32 islands (precision.py). For
  TensorRT 8.x targets (opset 16/17, where Q/DQ must be FP32) the graph stays FP32 and
  the builder sets FP16 with those islands pinned (export/trt_plan.py).
- `cpu`  -> `*.int8-cpu.onnx`: uint8 activations, int8 per-channel weights: what
  onnxruntime's CPU kernels run fast (symmetric int8 Q/DQ runs slower than FP32 there).
  Weights are 7-bit ([-64, 64], onnxruntime's `reduce_range`) unless the file is for
  CPUs with VNNI only: without VNNI (AVX2), onnxruntime's uint8 x int8 kernels add
  pairs of products in int16, which saturates beyond 32767 (255 x 127 x 2 does;
  255 x 64 x 2 does not). docs/calibration.md has the measurements.

Only Conv, MatMul and Gemm are quantized; LayerNorm, Softmax and the position embedding
are never in that list, and nodes whose name contains one of `exclude` stay float (by
default the box head: its output is a coordinate, where 1/255 of the range is visible).
"""
from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from detr_edge.runtime.errors import UserError
from detr_edge.runtime.io import atomic_path

from .precision import fp16_around_qdq

log = logging.getLogger(__name__)

METHODS = ("entropy", "percentile", "minmax")
OP_TYPES = ("Conv", "MatMul", "Gemm")
DEFAULT_EXCLUDE = ("/bbox_embed/",)
FLAVOURS = {"trt": ".int8.onnx", "cpu": ".int8-cpu.onnx"}


# Each flavour's ranges by default as its runtime's own tools make them: TensorRT's
# EntropyCalibration2, onnxruntime's quantize_static (MinMax). Measured in docs/calibration.md.
DEFAULT_METHODS = {"trt": "entropy", "cpu": "minmax"}


@dataclass
class QuantOptions:
    method: str | None = None  # one method for both flavours; None: DEFAULT_METHODS
    op_types: tuple = OP_TYPES
    exclude: tuple = DEFAULT_EXCLUDE     # node-name substrings kept float
    exclude_nodes: list = field(default_factory=list)  # exact node names kept float (the search's choice)
    vnni: bool = False  # CPU flavour for CPUs with VNNI only: full 8-bit weights
    attention: bool = False  # TensorRT flavour: quantize the MatMuls between two activations too

    def method_for(self, flavour: str) -> str:
        return self.method or DEFAULT_METHODS[flavour]


def excluded_nodes(graph, options: QuantOptions, flavour: str = "cpu") -> list[str]:
    names = {n.name for n in graph.graph.node
             if n.name in options.exclude_nodes or any(part in n.name for part in options.exclude)}
    if flavour == "trt" and not options.attention:
        names |= set(activation_matmuls(graph))
    return sorted(names)


def activation_matmuls(graph) -> list[str]:
    """MatMuls whose two inputs are both activations (no weight): attention's Q.K^T and softmax.V."""
    weights = {i.name for i in graph.graph.initializer}
    return [n.name for n in graph.graph.node if n.op_type == "MatMul" and not weights & set(n.input)]


def _method(name: str):
    from onnxruntime.quantization import CalibrationMethod
    if name not in METHODS:
        raise UserError(f"unknown calibration method {name!r}: one of {', '.join(METHODS)}")
    return {"entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile,
            "minmax": CalibrationMethod.MinMax}[name]


@contextlib.contextmanager
def _quiet():
    """onnxruntime's quantizer prints calibration progress to stdout and advice on the root
    logger at every call; keep the command's output to what it says itself."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def collect_ranges(src, cache: Path, method: str, reader) -> None:
    """Calibration ranges of the FP32 file `src` from `reader` (a `Samples`), written to
    `cache` in onnxruntime's JSON format, where `quantize_static` reads them back.

    Every float tensor is calibrated, not only the quantized ops' inputs: TensorRT's implicit
    calibration cache (trt_cache.py) needs a scale for each tensor an INT8 layer touches
    (ReLU and Add outputs too); `quantize_static` takes from the file what it needs.

    One batch per `collect_data` call: onnxruntime's histogram calibrators hold every
    calibrated tensor of all the data one call reads before they histogram it (DETR-R50 at
    640: ~0.7 GB per image; 32 images were killed for memory on a 24 GiB machine, where one
    at a time peaks at 3.4 GB), and they merge histograms across calls."""
    import tempfile

    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    from .data import Batches

    with tempfile.TemporaryDirectory(prefix="detr-edge-calib.") as tmp, _quiet():
        calibrator = create_calibrator(Path(src), None,
                                       augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                       calibrate_method=_method(method))
        calibrator.infer_session = _Finite(calibrator.infer_session)
        for feed in reader.batches():
            calibrator.collect_data(Batches([feed]))
        ranges = calibrator.compute_data()
    with atomic_path(Path(cache)) as tmp_cache:
        save_tensors_data(ranges, tmp_cache)


def ensure_ranges(src, cache, method: str, reader=None) -> None:
    """The ranges at `cache`: computed from `reader` with `method` when absent, reused when
    present (the other flavour's, where both use one method)."""
    if not Path(cache).is_file():
        if reader is None:
            raise UserError(f"{cache}: no calibration ranges, and no data to compute them from")
        collect_ranges(src, Path(cache), method, reader)


class _Finite:
    """The calibrators' session, with +-inf read as 0: attention fills padded keys with -inf
    before its softmax, which no histogram or range can hold; the tensors the Q/DQ files
    quantize never carry it (their ranges are unchanged, tests/test_calibration.py)."""

    def __init__(self, session):
        self.session = session

    def run(self, names, feed):
        return [np.where(np.isfinite(out), out, 0) if out.dtype.kind == "f" and not np.isfinite(out).all() else out
                for out in self.session.run(names, feed)]

    def __getattr__(self, name):
        return getattr(self.session, name)


def _unshare_initializers(graph, float_nodes: set) -> None:
    """Give float-kept nodes their own copy of any initializer they share with other nodes:
    the simplifier merges identical tensors (two convolutions' equal biases, say), and the
    quantizer would otherwise feed the float node the quantized copy it makes for the other."""
    initializers = {t.name: t for t in graph.graph.initializer}
    users: dict[str, int] = {}
    for node in graph.graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    for node in graph.graph.node:
        if node.name not in float_nodes:
            continue
        for i, name in enumerate(node.input):
            if name in initializers and users[name] > 1:
                copy = graph.graph.initializer.add()
                copy.CopyFrom(initializers[name])
                copy.name = node.input[i] = f"{name}/{node.name}"


def feed_float_nodes_float(graph, float_nodes: set) -> None:
    """Give float-kept nodes the float tensor, not the dequantized copy onnxruntime hands every
    consumer of a tensor it quantizes for another one (the decoder layers' key and value
    projections read the same memory: keeping the first layer's float still fed it INT8 values)."""
    from onnxruntime.transformers.onnx_model import OnnxModel

    producers = {out: node for node in graph.graph.node for out in node.output}
    for node in graph.graph.node:
        if node.name not in float_nodes:
            continue
        for i, name in enumerate(node.input):
            dq = producers.get(name)
            q = producers.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[i] = q.input[0]
    OnnxModel(graph).prune_graph()  # a pair that fed only float nodes


def dedicate_qdq_pairs(graph) -> None:
    """One Q/DQ pair per consumer, as TensorRT's fusions take them: onnxruntime's
    DedicatedQDQPair splits a tensor's pair only among the nodes it quantizes, and hands
    the same dequantized tensor to every other consumer too (a residual Add beside the
    Conv it feeds, say)."""
    from onnxruntime.transformers.onnx_model import OnnxModel

    producers = {out: node for node in graph.graph.node for out in node.output}
    uses: dict[str, list] = {}
    for node in graph.graph.node:
        for index, name in enumerate(node.input):
            uses.setdefault(name, []).append((node, index))
    for dq in [n for n in graph.graph.node if n.op_type == "DequantizeLinear"]:
        q = producers.get(dq.input[0])  # None for a weight's DQ: its input is an initializer
        for copy_index, (node, index) in enumerate(uses.get(dq.output[0], [])[1:], 1):
            dq_copy = graph.graph.node.add()
            dq_copy.CopyFrom(dq)
            dq_copy.name, dq_copy.output[0] = f"{dq.name}_{copy_index}", f"{dq.output[0]}_{copy_index}"
            if q is not None and q.op_type == "QuantizeLinear":
                q_copy = graph.graph.node.add()
                q_copy.CopyFrom(q)
                q_copy.name, q_copy.output[0] = f"{q.name}_{copy_index}", f"{q.output[0]}_{copy_index}"
                dq_copy.input[0] = q_copy.output[0]
            node.input[index] = dq_copy.output[0]
    OnnxModel(graph).topological_sort()


def quantize(src, dst, flavour: str, options: QuantOptions, cache, reader=None) -> dict:
    """Write the `flavour` INT8 file of FP32 `src` to `dst`. `cache` is the calibration-range
    file (onnxruntime's JSON): computed from `reader` when absent, reused when present."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from detr_edge.runtime.metadata import read_onnx_metadata, write_onnx_metadata

    ensure_ranges(src, cache, options.method_for(flavour), reader)
    graph = onnx.load(str(src))
    meta = read_onnx_metadata(graph, src)
    if meta.get("export", {}).get("precision", "fp32") != "fp32":
        raise UserError(f"{src}: calibrate the FP32 file, not a {meta['export']['precision']} one")
    if flavour not in FLAVOURS:
        raise UserError(f"unknown flavour {flavour!r}: trt or cpu")
    trt = flavour == "trt"
    reduce_range = not trt and not options.vnni
    exclude = excluded_nodes(graph, options, flavour)
    _unshare_initializers(graph, set(exclude))
    extra = {"ActivationSymmetric": trt, "WeightSymmetric": True, "QuantizeBias": not trt}
    if trt:  # placed as TensorRT fuses them (onnxruntime's defaults suit its own CPU kernels)
        extra.update(DedicatedQDQPair=True, OpTypesToExcludeOutputQuantization=list(OP_TYPES))
    with atomic_path(Path(dst)) as tmp, _quiet():
        try:
            quantize_static(graph, str(tmp), None, quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=list(options.op_types), per_channel=True, reduce_range=reduce_range,
                            activation_type=QuantType.QInt8 if trt else QuantType.QUInt8,
                            weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
                            calibrate_method=_method(options.method_for(flavour)), extra_options=extra,
                            calibration_cache_path=str(cache))
        except UserError:
            raise
        except (ValueError, RuntimeError) as exc:
            raise UserError(f"{src}: quantization failed ({str(exc).splitlines()[0][:200]})") from None
        quantized = onnx.load(str(tmp))
        feed_float_nodes_float(quantized, set(exclude))
        if trt:
            dedicate_qdq_pairs(quantized)
        meta["export"].update(precision="int8", int8={"flavour": flavour, "method": options.method_for(flavour),
                                                      "op_types": list(options.op_types),
                                                      "weight_bits": 7 if reduce_range else 8,
                                                      "attention": "quantized" if options.attention or not trt
                                                      else "float", "excluded_nodes": exclude})
        if trt:
            quantized = fp16_around_qdq(quantized, meta)
        write_onnx_metadata(quantized, meta)
        onnx.save(quantized, str(tmp))
    return meta
