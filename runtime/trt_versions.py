"""What each TensorRT version needs, as pure functions (../shared/reference/tensorrt.md):
network flags, builder flags, the opsets its parser takes, whether the implicit INT8
calibrator may be used. The builder acts on these answers, so the version logic is tested
without TensorRT (tests/test_trt_versions.py, which also checks every TensorRT name the
builder and the engine runner touch against each version's real bindings).
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError

# export target -> (default opset, lowest, highest) the consumer parses (../shared/reference/tensorrt.md)
TARGETS = {
    "trt8.5": (16, 13, 16),   # parses <= 17 but not LayerNormalization: 16 decomposes it
    "trt8.6": (17, 13, 17),
    "trt10": (17, 13, 20),
    "trt11": (17, 13, 20),    # TensorRT 11 parses up to 25; torch's exporter writes up to 20
    "ort": (17, 13, 20),
}


def parse_version(text: str) -> tuple[int, int, int]:
    try:
        parts = [int(p) for p in str(text).split(".")[:3]]
    except ValueError:
        raise UserError(f"TensorRT version {text!r} is not like 10.3.0") from None
    return tuple(parts + [0] * (3 - len(parts)))


@dataclass(frozen=True)
class BuildPlan:
    version: tuple[int, int, int]
    network_flags: tuple[str, ...]   # NetworkDefinitionCreationFlag members
    builder_flags: tuple[str, ...]   # BuilderFlag members
    max_opset: int
    parses_layernorm: bool
    legacy_calibrator: bool          # IInt8EntropyCalibrator2 + config.int8_calibrator

    @property
    def strongly_typed(self) -> bool:
        return "STRONGLY_TYPED" in self.network_flags


def build_plan(version: str, precision: str, weakly_typed: bool = False, legacy_int8: bool = False,
               dla: bool = False, gpu_fallback: bool = False) -> BuildPlan:
    """The flags for building a `precision` ONNX file (fp32, fp16, int8) on TensorRT `version`.

    11.x: strongly typed, precision only from the file, no precision flag exists.
    10.x: STRONGLY_TYPED for the FP16/INT8 files; FP16/INT8 builder flags only for a weakly
          typed build asked for (or the legacy calibrator).
    8.x/9.x: explicit batch; FP16/INT8 flags set to match the file's precision."""
    major, minor, _ = v = parse_version(version)
    if precision not in ("fp32", "fp16", "int8"):
        raise UserError(f"unknown precision {precision!r}")
    if major < 8 or (major == 8 and minor < 5):
        raise UserError(f"TensorRT {version} is older than 8.5, the oldest supported")
    if legacy_int8 and (major >= 11 or precision != "fp32"):
        raise UserError("the legacy INT8 calibrator needs TensorRT < 11 and the FP32 file "
                        "(the INT8 Q/DQ file carries its own scales)" if major < 11 else
                        "TensorRT 11 removed implicit INT8 calibration: build the Q/DQ file (*.int8.onnx)")
    if weakly_typed and major >= 11:
        raise UserError("TensorRT 11 builds strongly typed networks only: precision comes from the file")
    precision_flags = {"fp32": (), "fp16": ("FP16",), "int8": ("INT8", "FP16")}[precision]
    if legacy_int8:
        precision_flags = ("INT8", "FP16")
    if major >= 11:
        network, builder = ("STRONGLY_TYPED",), ()
    elif major == 10:
        typed = precision != "fp32" and not weakly_typed and not legacy_int8
        network, builder = (("STRONGLY_TYPED",), ()) if typed else ((), precision_flags)
    else:
        network, builder = ("EXPLICIT_BATCH",), precision_flags
    if dla and precision == "fp32" and not legacy_int8:
        raise UserError("DLA runs FP16 or INT8 only: build the .fp16 or .int8 file")
    if dla and gpu_fallback:
        builder = builder + ("GPU_FALLBACK",)
    max_opset = 16 if (major, minor) == (8, 5) else 17 if major < 10 else 20 if major == 10 else 25
    return BuildPlan(v, network, builder, max_opset, parses_layernorm=(major, minor) != (8, 5),
                     legacy_calibrator=legacy_int8)


def check_opset(plan: BuildPlan, opset: int, has_layernorm: bool, source: str) -> None:
    """Refuse a file this TensorRT cannot parse, with the fix."""
    version = ".".join(map(str, plan.version))
    if opset > plan.max_opset:
        raise UserError(f"{source}: opset {opset} is newer than TensorRT {version} parses ({plan.max_opset}); "
                        f"re-export with --target {target_for(plan.version)}")
    if has_layernorm and not plan.parses_layernorm:
        raise UserError(f"{source}: TensorRT {version} cannot parse LayerNormalization (opset 17); "
                        "re-export with --target trt8.5 (opset 16, LayerNorm decomposed)")


def target_for(version: tuple[int, int, int]) -> str:
    major, minor, _ = version
    return "trt8.5" if (major, minor) == (8, 5) else "trt8.6" if major < 10 else "trt10" if major == 10 else "trt11"
