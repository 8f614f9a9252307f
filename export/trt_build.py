"""`detr-edge build`: ONNX -> TensorRT engine + sidecar (`model.engine.json`: the ONNX
metadata plus the TensorRT version, GPU, compute capability and the build plan applied).

The plan (export/trt_plan.py, pure) decides; this file applies it through NVIDIA's
Polygraphy, which NVIDIA tests on GPUs with every TensorRT release: the network from the
ONNX file, CreateConfig (TF32 cleared, precision flags, precision constraints, the
profile, the calibrator with its calibration profile and cache, the workspace, the timing
cache, the optimization level, DLA), the serialized engine. Hand-written TensorRT calls
remain only where Polygraphy has no API, each with the reason beside it.
"""
from __future__ import annotations

import logging
import re
import time
from pathlib import Path

from detr_edge.runtime.errors import UserError
from detr_edge.runtime.io import atomic_path, write_json
from detr_edge.runtime.metadata import read_onnx_metadata

from .trt_plan import BuildOptions, calibrator_cache_path, engine_path, plan

log = logging.getLogger(__name__)


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise UserError("TensorRT is not installed: on x86, pip install 'detr-edge[tensorrt]' (NVIDIA's tensorrt "
                        "wheel); on Jetson, JetPack's python3-libnvinfer (sudo apt install python3-libnvinfer)") from None
    return trt


def import_polygraphy():
    try:
        import polygraphy.backend.trt as polygraphy_trt
    except ImportError:
        raise UserError("building engines needs NVIDIA's Polygraphy: pip install polygraphy") from None
    return polygraphy_trt


def build(onnx_path, out=None, options: BuildOptions | None = None) -> dict:
    """Build the engine of `onnx_path` by its plan; returns the sidecar written beside it."""
    import onnx

    from detr_edge.runtime.cuda import device_info

    options = options or BuildOptions()
    onnx_path = Path(onnx_path)
    if not onnx_path.exists():
        raise UserError(f"{onnx_path}: no such file")
    trt = import_tensorrt()
    polygraphy_trt = import_polygraphy()
    graph = onnx.load(str(onnx_path), load_external_data=False)
    device = device_info()
    if options.dla is not None:
        device["dla_cores"] = _dla_cores(trt)
    the_plan = plan(onnx_path, trt.__version__, options, device, graph)
    meta = read_onnx_metadata(graph, onnx_path)
    out = Path(out) if out else engine_path(onnx_path)
    start = time.perf_counter()
    serialized = _apply(the_plan, onnx_path, {n.name for n in graph.graph.node}, meta, trt, polygraphy_trt)
    sidecar = {**meta, "engine": {"precision": the_plan["precision"], "tensorrt_version": trt.__version__, **device,
                                  "source": onnx_path.name, "build_seconds": round(time.perf_counter() - start, 1),
                                  "plan": the_plan}}
    with atomic_path(out) as tmp:
        tmp.write_bytes(bytes(serialized))
    write_json(f"{out}.json", sidecar)
    log.info("wrote %s (%s, TensorRT %s, %s)", out, the_plan["precision"], trt.__version__, device["gpu"])
    return sidecar


def _apply(p: dict, onnx_path: Path, nodes: set, meta: dict, trt, polygraphy_trt) -> bytes:
    """The plan `p` through Polygraphy's loaders -> the serialized engine."""
    from polygraphy.exception import PolygraphyException
    from polygraphy.logger import G_LOGGER

    network = polygraphy_trt.NetworkFromOnnxPath(str(onnx_path), strongly_typed=p["network"]["strongly_typed"])
    pinned = p["fp32_layers"]["layers_of_onnx_nodes"]
    if pinned:
        network = polygraphy_trt.PostprocessNetwork(network, lambda network: pin_fp32(network, pinned, nodes, trt),
                                                    "pin the FP32 layers")
    had_cache = calibrator_cache_path(onnx_path).is_file()
    feed = _feed(p["calibration"], meta) if p["calibration"] else None
    timing_cache = p["builder"]["timing_cache"]
    G_LOGGER.colors = False  # plain output, and no notice about the 'colored' module
    try:  # Polygraphy's INFO lines describe its own defaults, not the plan: warnings and errors only
        with G_LOGGER.verbosity(G_LOGGER.WARNING):
            config = _config(p, onnx_path, feed, trt, polygraphy_trt)
            if timing_cache:
                with atomic_path(timing_cache) as tmp:  # the old entries come in through load_timing_cache
                    serialized = polygraphy_trt.EngineBytesFromNetwork(network, config, save_timing_cache=str(tmp))()
            else:
                serialized = polygraphy_trt.EngineBytesFromNetwork(network, config)()
    except PolygraphyException as exc:
        raise UserError(f"{onnx_path}: TensorRT could not build it: {' '.join(str(exc).split())[:400]}") from None
    if feed is not None:
        feed.check(had_cache)
    return serialized


def _feed(calibration: dict, meta: dict):
    from detr_edge.calibration.data import Samples
    from detr_edge.calibration.trt_calibrator import CalibrationFeed
    return CalibrationFeed(Samples(calibration["data"], meta["preprocess"], calibration["samples"],
                                   batch=calibration["batch"]))


def _config(p: dict, onnx_path: Path, feed, trt, polygraphy_trt):
    """Polygraphy's CreateConfig for the plan (a callable of builder and network)."""
    flags = set(p["builder"]["flags"])
    profile = polygraphy_trt.Profile()
    for name, shape in p["profile"].items():
        profile.add(name, min=shape["min"], opt=shape["opt"], max=shape["max"])
    # Polygraphy makes the last profile given the calibration profile too
    calibrator = polygraphy_trt.Calibrator(feed, cache=str(calibrator_cache_path(onnx_path)),
                                           BaseClass=trt.IInt8EntropyCalibrator2) if feed is not None else None
    timing_cache = p["builder"]["timing_cache"]
    config = polygraphy_trt.CreateConfig(
        tf32=False, fp16="FP16" in flags, int8="INT8" in flags, profiles=[profile], calibrator=calibrator,
        precision_constraints=("obey" if "OBEY_PRECISION_CONSTRAINTS" in flags else
                               "prefer" if "PREFER_PRECISION_CONSTRAINTS" in flags else None),
        memory_pool_limits={trt.MemoryPoolType.WORKSPACE: p["builder"]["workspace_bytes"]},
        load_timing_cache=timing_cache if timing_cache and Path(timing_cache).is_file() else None,
        builder_optimization_level=p["builder"]["optimization_level"],
        use_dla=bool(p["dla"]), allow_gpu_fallback=bool(p["dla"]))
    if not (p["dla"] and p["dla"]["core"]):
        return config
    core = p["dla"]["core"]

    def dla_core(builder, network, config):  # Polygraphy's CreateConfig always takes DLA core 0
        config.DLA_core = core
    return polygraphy_trt.PostprocessConfig(config, dla_core)


def layer_node(name: str, metadata: str | None, nodes: set) -> str | None:
    """The ONNX node a TensorRT layer came from. From 8.6 the ONNX parser writes
    '[ONNX Layer: <node> | ...]' into every layer's metadata; 8.5 only names the node's
    first layer after it and further ones <node>_<n>."""
    match = re.match(r"\[ONNX Layer: (.+?)(?: \| .*)?\]$", metadata or "", re.S)
    if match:
        return match[1]
    if name in nodes:
        return name
    base = re.sub(r"_\d+$", "", name)
    return base if base in nodes else None


def pin_fp32(network, pinned: list[str], nodes: set, trt) -> int:
    """Precision and output types FP32 for the layers of the `pinned` ONNX nodes that compute
    floats (Polygraphy's SetLayerPrecisions takes exact layer names, known only after
    parsing, and sets no output types); returns how many layers were pinned."""
    pinned, count = set(pinned), 0
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        if layer_node(layer.name, getattr(layer, "metadata", None), nodes) not in pinned:
            continue
        outputs = [layer.get_output(i) for i in range(layer.num_outputs)]
        if not outputs or any(tensor.dtype != trt.DataType.FLOAT for tensor in outputs):
            continue  # shape and index layers of the pinned parts
        layer.precision = trt.DataType.FLOAT
        for i in range(layer.num_outputs):
            layer.set_output_type(i, trt.DataType.FLOAT)
        count += 1
    if not count:
        raise UserError(f"none of the {len(pinned)} FP32 nodes of the plan was found among the network's layers")
    log.info("pinned %d layers to FP32", count)
    return count


def _dla_cores(trt) -> int:
    """DLA cores of this device (Orin Nano and Thor have none): a builder asked, with the one logger."""
    from polygraphy.backend.trt.util import get_trt_logger
    return int(trt.Builder(get_trt_logger()).num_DLA_cores)
