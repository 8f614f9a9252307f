"""`detr-edge build`: ONNX -> TensorRT engine + sidecar (`model.engine.json`: the ONNX
metadata plus precision, TensorRT version, GPU, compute capability and build options).

What to set on which TensorRT comes from `runtime.trt_versions.build_plan` (pure, tested
without TensorRT). The test suite runs this code against a recording stand-in of each
TensorRT version and checks every name it touched against that version's real bindings,
so no path can use a flag its version removed.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from runtime.errors import UserError
from runtime.io import atomic_path, write_json
from runtime.metadata import read_onnx_metadata
from runtime.trt_versions import build_plan, check_opset

log = logging.getLogger(__name__)


@dataclass
class BuildOptions:
    workspace_gib: float = 4.0
    batch: tuple[int, int, int] | None = None  # min, opt, max of a dynamic-batch file
    timing_cache: str | None = None
    dla: int | None = None
    gpu_fallback: bool = False
    opt_level: int | None = None
    weakly_typed: bool = False
    legacy_int8: bool = False
    calib_data: str | None = None
    calib_samples: int = 256


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise UserError("TensorRT is not installed: on x86, pip install 'detr-edge[tensorrt]' (NVIDIA's tensorrt "
                        "wheel); on Jetson, JetPack's python3-libnvinfer (sudo apt install python3-libnvinfer)") from None
    return trt


def engine_path(onnx_path) -> Path:
    """model.fp16.onnx -> model.fp16.engine."""
    return Path(onnx_path).with_suffix(".engine")


def build(onnx_path, out=None, options: BuildOptions | None = None, trt=None, device: dict | None = None) -> dict:
    """Build the engine of `onnx_path`; returns the sidecar written beside it."""
    import onnx

    options = options or BuildOptions()
    onnx_path = Path(onnx_path)
    if not onnx_path.exists():
        raise UserError(f"{onnx_path}: no such file")
    graph = onnx.load(str(onnx_path), load_external_data=False)
    meta = read_onnx_metadata(graph, onnx_path)
    export = meta.get("export", {})
    precision = export.get("precision", "fp32")
    trt = trt or import_tensorrt()
    plan = build_plan(trt.__version__, precision, options.weakly_typed, options.legacy_int8, options.dla is not None,
                      options.gpu_fallback)
    opset = max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))
    check_opset(plan, opset, any(n.op_type == "LayerNormalization" for n in graph.graph.node), onnx_path)
    dynamic = export.get("batch") == "dynamic"
    if options.batch and not dynamic:
        raise UserError(f"{onnx_path}: --batch needs a dynamic-batch file (export with --dynamic-batch)")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    for name in plan.network_flags:  # masks from the enum members, never hard-coded bits
        flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        lines = [f"node {e.node()}: {e.desc()}" for e in errors]
        raise UserError(f"{onnx_path}: TensorRT's ONNX parser failed: " + "; ".join(lines or ["no detail"]))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gib * 2**30))
    for name in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    if options.opt_level is not None:
        config.builder_optimization_level = int(options.opt_level)
    if options.dla is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = int(options.dla)
    if dynamic:
        low, opt, high = options.batch or (1, 1, 1)
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            rest = tuple(tensor.shape)[1:]
            profile.set_shape(tensor.name, (low, *rest), (opt, *rest), (high, *rest))
        config.add_optimization_profile(profile)
    cache = Path(options.timing_cache) if options.timing_cache else None
    timing = config.create_timing_cache(cache.read_bytes() if cache and cache.exists() else b"")
    config.set_timing_cache(timing, False)
    if options.legacy_int8:
        config.int8_calibrator = _legacy_calibrator(meta, options, onnx_path)
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise UserError(f"{onnx_path}: TensorRT could not build an engine (see its log above)")
    out = Path(out) if out else engine_path(onnx_path)
    sidecar = {**meta, "engine": {"precision": precision, "tensorrt_version": trt.__version__,
                                  **(device or _device_info()), "network_flags": list(plan.network_flags),
                                  "builder_flags": list(plan.builder_flags), "source": onnx_path.name,
                                  "build_seconds": round(time.perf_counter() - start, 1),
                                  "options": {k: v for k, v in asdict(options).items() if v not in (None, False)}}}
    with atomic_path(out) as tmp:
        tmp.write_bytes(bytes(serialized))
    write_json(f"{out}.json", sidecar)
    if cache:
        with atomic_path(cache) as tmp:
            tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    log.info("wrote %s (%s, TensorRT %s, %s)", out, precision, trt.__version__, sidecar["engine"]["gpu"])
    return sidecar


def _device_info() -> dict:
    from runtime.cuda import memory
    return memory().device_info()


def _legacy_calibrator(meta: dict, options: BuildOptions, source):
    from calibration.data import Samples
    from calibration.trt_calibrator import EntropyCalibrator
    from runtime.cuda import memory

    if EntropyCalibrator is None:
        raise UserError("this TensorRT has no IInt8EntropyCalibrator2 (removed in 11): build the Q/DQ *.int8.onnx")
    if not options.calib_data:
        raise UserError("--legacy-int8-calibrator needs --calib-data")
    device = memory()
    buffers = {}

    def upload(name, array):
        if name not in buffers:
            buffers[name] = device.device(array.nbytes)
        device.to_device(buffers[name], array)
        device.synchronize()
        return buffers[name]
    samples = Samples(options.calib_data, meta["preprocess"], options.calib_samples)
    return EntropyCalibrator(samples, upload, Path(source).with_suffix(".calib.cache"))


