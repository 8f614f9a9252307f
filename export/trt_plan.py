"""The TensorRT build plan: everything `detr-edge build` sets, for one ONNX file, one
TensorRT version and the user's options, as one pure function (no TensorRT, no GPU).
`build --plan` prints it, export/trt_build.py applies it through Polygraphy, and the
engine's sidecar records it, so what a laptop shows for JetPack 5, 6 or 7 is what the
device builds. Version facts: ../shared/reference/tensorrt.md.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from detr_edge.runtime.errors import UserError

# export target -> (default opset, lowest, highest) the consumer parses (../shared/reference/tensorrt.md)
TARGETS = {
    "trt8.5": (16, 13, 16),   # parses <= 17 but not LayerNormalization: 16 decomposes it
    "trt8.6": (17, 13, 17),
    "trt10": (17, 13, 20),
    "trt11": (17, 13, 20),    # TensorRT 11 parses up to 25; torch's exporter writes up to 20
    "ort": (17, 13, 20),
}
# min, opt, max batch of a dynamic-batch file built without --batch: the runtime streams
# batch 1; `check` sends 4 and COCO evaluation 8 (the backend splits anything larger)
DYNAMIC_BATCH = (1, 1, 8)
NO_DLA = ((10, 8, 0), (11, 4, 0))  # TensorRT 10.8 to 11.4.0 have no DLA


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


def parse_version(text: str) -> tuple[int, int, int]:
    try:
        parts = [int(p) for p in str(text).split(".")[:3]]
    except ValueError:
        raise UserError(f"TensorRT version {text!r} is not like 10.3.0") from None
    return tuple(parts + [0] * (3 - len(parts)))


def engine_path(onnx_path) -> Path:
    """model.fp16.onnx -> model.fp16.engine."""
    return Path(onnx_path).with_suffix(".engine")


def calibrator_cache_path(onnx_path) -> Path:
    """The legacy calibrator's own cache: never `calibrate`'s <stem>.calib.cache (trtexec's)."""
    return Path(onnx_path).with_suffix(".legacy-calibrator.cache")


def flags(version: tuple[int, int, int], precision: str, weakly_typed: bool = False,
          legacy_int8: bool = False) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(network flags, builder flags) for a `precision` file (fp32, fp16, int8).

    11.x: strongly typed, precision only from the file, no precision flag exists.
    10.x: STRONGLY_TYPED for the FP16/INT8 files; FP16/INT8 builder flags only for a weakly
          typed build asked for (or the legacy calibrator).
    8.x/9.x: explicit batch; FP16/INT8 flags set to match the file's precision."""
    major, minor, _ = version
    if precision not in ("fp32", "fp16", "int8"):
        raise UserError(f"unknown precision {precision!r}")
    if major < 8 or (major == 8 and minor < 5):
        raise UserError(f"TensorRT {'.'.join(map(str, version))} is older than 8.5, the oldest supported")
    if legacy_int8 and (major >= 11 or precision != "fp32"):
        raise UserError("the legacy INT8 calibrator needs TensorRT < 11 and the FP32 file "
                        "(the INT8 Q/DQ file carries its own scales)" if major < 11 else
                        "TensorRT 11 removed implicit INT8 calibration: build the Q/DQ file (*.int8.onnx)")
    if weakly_typed and major >= 11:
        raise UserError("TensorRT 11 builds strongly typed networks only: precision comes from the file")
    precision_flags = ("INT8", "FP16") if legacy_int8 else {"fp32": (), "fp16": ("FP16",), "int8": ("INT8", "FP16")}[precision]
    if major >= 11:
        return ("STRONGLY_TYPED",), ()
    if major == 10:
        typed = precision != "fp32" and not weakly_typed and not legacy_int8
        return (("STRONGLY_TYPED",), ()) if typed else ((), precision_flags)
    return ("EXPLICIT_BATCH",), precision_flags


def max_opset(version: tuple[int, int, int]) -> int:
    major, minor, _ = version
    return 16 if (major, minor) == (8, 5) else 17 if major < 10 else 20 if major == 10 else 25


def target_for(version: tuple[int, int, int]) -> str:
    major, minor, _ = version
    return "trt8.5" if (major, minor) == (8, 5) else "trt8.6" if major < 10 else "trt10" if major == 10 else "trt11"


def check_opset(version: tuple[int, int, int], opset: int, has_layernorm: bool, source) -> None:
    """Refuse a file this TensorRT cannot parse, with the fix."""
    text = ".".join(map(str, version))
    if opset > max_opset(version):
        raise UserError(f"{source}: opset {opset} is newer than TensorRT {text} parses ({max_opset(version)}); "
                        f"re-export with --target {target_for(version)}")
    if has_layernorm and version[:2] == (8, 5):
        raise UserError(f"{source}: TensorRT {text} cannot parse LayerNormalization (opset 17); "
                        "re-export with --target trt8.5 (opset 16, LayerNorm decomposed)")


def plan(onnx_path, trt_version: str, options: BuildOptions | None = None, device: dict | None = None,
         graph=None) -> dict:
    """What building `onnx_path` on TensorRT `trt_version` sets, as JSON-able data; refuses
    (UserError) what that version or the options cannot build. `device` ({'dla_cores': n},
    known on the device only) lets the DLA core be checked too."""
    import onnx

    from detr_edge.runtime.metadata import read_onnx_metadata

    from detr_edge.calibration.precision import KEEP_FP32_NAMES, KEEP_FP32_OPS, fp32_nodes

    options = options or BuildOptions()
    onnx_path = Path(onnx_path)
    if graph is None:
        if not onnx_path.exists():
            raise UserError(f"{onnx_path}: no such file")
        graph = onnx.load(str(onnx_path), load_external_data=False)
    export = read_onnx_metadata(graph, onnx_path).get("export", {})
    precision = export.get("precision", "fp32")
    version = parse_version(trt_version)
    network_flags, builder_flags = flags(version, precision, options.weakly_typed, options.legacy_int8)
    opset = max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))
    check_opset(version, opset, any(n.op_type == "LayerNormalization" for n in graph.graph.node), onnx_path)
    if options.opt_level is not None and version[:2] == (8, 5):
        raise UserError("--opt-level needs TensorRT 8.6 or newer (8.5 has no builder optimization level)")
    profile = _profile(graph, export, options, onnx_path)
    strongly_typed = "STRONGLY_TYPED" in network_flags
    # weakly typed reduced precision: TensorRT may run any layer in FP16 unless its
    # precision and output types are pinned and the constraints obeyed
    kept = export.get("kept_fp32") or {"ops": list(KEEP_FP32_OPS), "names": list(KEEP_FP32_NAMES)}
    pinned = fp32_nodes(graph, tuple(kept["ops"]), tuple(kept["names"])) if "FP16" in builder_flags else []
    dla = _dla(version, options, profile, device, precision)
    extra = []
    if dla:  # as Polygraphy and trtexec do for DLA: precisions preferred, layers DLA lacks on the GPU
        extra = (["PREFER_PRECISION_CONSTRAINTS"] if version < (11, 0, 0) else []) + ["GPU_FALLBACK"]
    elif pinned:
        extra = ["OBEY_PRECISION_CONSTRAINTS"]
    return {
        "tensorrt": ".".join(map(str, version)),
        "onnx": onnx_path.name,
        "engine": engine_path(onnx_path).name,
        "precision": precision,
        "opset": opset,
        "network": {"flags": list(network_flags), "strongly_typed": strongly_typed},
        "builder": {"flags": list(builder_flags) + extra,
                    # on by default in every version: FP32 GEMMs and convolutions would run in TF32
                    "cleared_flags": ["TF32"],
                    "workspace_bytes": int(options.workspace_gib * 2**30),
                    "optimization_level": options.opt_level,
                    "timing_cache": options.timing_cache},
        "fp32_layers": {"rule": kept, "layers_of_onnx_nodes": pinned,
                        "set": ["precision", "output types"] if pinned else []},
        "profile": profile,
        "calibration": _calibration(onnx_path, options, profile) if options.legacy_int8 else None,
        "dla": dla,
        "options": {k: v for k, v in asdict(options).items() if v not in (None, False)},
    }


def _profile(graph, export: dict, options: BuildOptions, source) -> dict:
    """min/opt/max shape per input: the file's own shapes, the batch free only in a dynamic-batch file."""
    dynamic = export.get("batch") == "dynamic"
    if options.batch and not dynamic:
        raise UserError(f"{source}: --batch needs a dynamic-batch file (export with --dynamic-batch)")
    batches = (options.batch or DYNAMIC_BATCH) if dynamic else (int(export.get("batch", 1)),) * 3
    profile = {}
    for value in graph.graph.input:
        rest = [d.dim_value for d in value.type.tensor_type.shape.dim[1:]]
        profile[value.name] = {key: [batch, *rest] for key, batch in zip(("min", "opt", "max"), batches)}
    return profile


def _dla(version, options: BuildOptions, profile: dict, device: dict | None, precision: str) -> dict | None:
    if options.dla is None:
        return None
    text = ".".join(map(str, version))
    if precision == "fp32" and not options.legacy_int8:
        raise UserError("DLA runs FP16 or INT8 only: build the .fp16 or .int8 file")
    if NO_DLA[0] <= version <= NO_DLA[1]:
        raise UserError(f"TensorRT {text} has no DLA (10.8 to 11.4.0 have none; 10.7 and 11.4.1 on AGX Orin do)")
    if any(shape["min"] != shape["max"] for shape in profile.values()):
        raise UserError("DLA needs one fixed shape (min = opt = max): --batch N,N,N or a fixed-batch file")
    if not options.gpu_fallback:
        raise UserError("DETR has layers DLA cannot run (attention between activations, FP32 LayerNorm): "
                        "add --gpu-fallback")
    if device is not None and options.dla >= device.get("dla_cores", 0):
        raise UserError(f"{device.get('gpu', 'this GPU')} has {device.get('dla_cores', 0)} DLA cores: no DLA core "
                        f"{options.dla} (Orin Nano has none)")
    return {"core": options.dla, "gpu_fallback": True}


def _calibration(onnx_path: Path, options: BuildOptions, profile: dict) -> dict:
    if not options.calib_data:
        raise UserError("--legacy-int8-calibrator needs --calib-data")
    batch = next(iter(profile.values()))["opt"][0]
    return {"calibrator": "IInt8EntropyCalibrator2", "data": str(options.calib_data), "samples": options.calib_samples,
            # TensorRT calibrates a network with runtime dimensions at the calibration profile's opt shape
            "profile": "the build profile", "batch": batch,
            "cache": calibrator_cache_path(onnx_path).name, "cache_reuse": "read when present (delete it to calibrate again)"}
