"""TensorRT's implicit-calibration cache, for users who build with `trtexec --int8
--calib=FILE` on TensorRT 8.x/10.x (11 removed implicit calibration): written from the
same calibration run as the Q/DQ files, so every path sees the same ranges, with a scale
for every float tensor of the FP32 graph (TensorRT needs one for each tensor an INT8 layer
touches, ReLU and Add outputs included, or it runs that layer in float).

Format (text): a header `TRT-<version>-EntropyCalibration2`, then one line per tensor,
`name: <scale as the 8 hex digits of a big-endian float32>`, scale = amax / 127.
`<version>` is TensorRT's NV_TENSORRT_VERSION: major*1000 + minor*100 + patch up to 9.x
(8.5.2 -> 8502, 8.6.1 -> 8601), major*10000 + minor*100 + patch from 10.0 on (10.3.0 ->
100300). TensorRT ignores a cache whose header names another version (and calibrates
again, which trtexec cannot without data), so the version is required, patch included:
JetPack 5.1 has 8.5.2, 6.0 has 8.6.2, 6.1/6.2 have 10.3.0.
"""
from __future__ import annotations

import struct
from pathlib import Path

from detr_edge.runtime.errors import UserError
from detr_edge.runtime.io import atomic_path

CALIBRATOR = "EntropyCalibration2"


def version_tag(version: str) -> str:
    parts = str(version).split(".")
    try:
        major, minor, patch = (int(p) for p in parts[:3])
    except ValueError:
        raise UserError(f"TensorRT version {version!r} is not a full version like 8.5.2 (the cache header must "
                        "match the target's exactly: python3 -c 'import tensorrt; print(tensorrt.__version__)')") from None
    if major >= 11:
        raise UserError("TensorRT 11 removed implicit INT8 calibration: use the Q/DQ file (*.int8.onnx)")
    return str(major * (10000 if major >= 10 else 1000) + minor * 100 + patch)


def scales_from_ranges(ranges) -> dict[str, float]:
    """onnxruntime's calibration ranges (TensorsData or {name: (low, high)}) -> symmetric scales."""
    scales = {}
    for name in ranges:
        value = ranges[name]
        low, high = value.range_value if hasattr(value, "range_value") else value
        amax = max(abs(float(low)), abs(float(high)))
        if amax > 0:
            scales[name] = amax / 127.0
    return scales


def write_cache(path, scales: dict[str, float], trt_version: str) -> None:
    lines = [f"TRT-{version_tag(trt_version)}-{CALIBRATOR}"]
    lines += [f"{name}: {struct.pack('>f', scale).hex()}" for name, scale in scales.items()]
    with atomic_path(Path(path)) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def read_cache(path) -> tuple[str, dict[str, float]]:
    """-> (header, {tensor name: scale})."""
    text = Path(path).read_text().splitlines()
    if not text or not text[0].startswith("TRT-"):
        raise UserError(f"{path}: not a TensorRT calibration cache (no TRT-... header)")
    scales = {}
    for line in text[1:]:
        name, _, hex_scale = line.rpartition(": ")
        if not name:
            raise UserError(f"{path}: malformed line {line!r}")
        scales[name] = struct.unpack(">f", bytes.fromhex(hex_scale))[0]
    return text[0], scales
