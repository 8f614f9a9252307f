"""The Triton model repository `deploy --triton` writes: one model per artifact (the raw
network, for clients that do their own pre- and postprocessing), and `detr`, the
end-to-end detector (images in, detections out: runtime/triton_model.py) run by Triton's
Python backend on one of the artifacts.

    triton/detr_fp32/config.pbtxt, 1/model.onnx       platform onnxruntime_onnx
    triton/detr_int8_cpu/...                           (one per artifact; engines: tensorrt_plan)
    triton/detr/config.pbtxt, labels.txt, 1/model.py, 1/model.onnx (or model.engine)
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from detr_edge.runtime.io import atomic_path

TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bool": "TYPE_BOOL", "int64": "TYPE_INT64",
                "int32": "TYPE_INT32"}
DETECTOR = "detr"
# the Python backend loads `TritonPythonModel` from model.py: ours is the runtime's, imported
MODEL_PY = ('"""detr-edge\'s end-to-end detector for Triton\'s Python backend: detr_edge.runtime.triton_model."""\n'
            "from detr_edge.runtime.triton_model import TritonPythonModel  # noqa: F401\n")


@dataclass
class DetectorOptions:
    """The served detector's knobs: instances of the model (each its own backend), the
    largest batch (a request's, or one Triton's dynamic batcher forms), whether Triton
    batches requests together and how long it may hold one to fill a batch, the default
    score threshold, onnxruntime's threads per instance (0: one per core) and whether they
    busy-wait between calls (off by default: a server shares its cores with Triton's own
    threads, the backend's stub and, on one machine, the clients)."""
    instances: int = 1
    max_batch: int = 8
    dynamic_batching: bool = True
    queue_delay_us: int = 0  # Triton's default: batch what queued while the model ran, never idle to wait
    conf: float = 0.5
    threads: int = 0
    spin: bool = False


def raw_config(name: str, path: Path, backend) -> str:
    """config.pbtxt for one ONNX file or engine (tensor names and shapes read from the file)."""
    tensors = _tensors(path, backend)
    dynamic = backend.batch is None
    platform = "tensorrt_plan" if path.suffix in (".engine", ".plan") else "onnxruntime_onnx"
    lines = [f'name: "{name}"', f'platform: "{platform}"', f"max_batch_size: {8 if dynamic else 0}"]
    for kind in ("input", "output"):
        entries = []
        for tensor, dtype, shape in tensors[kind]:
            dims = shape[1:] if dynamic else shape
            entries.append(f'  {{ name: "{tensor}" data_type: {TRITON_TYPES[dtype]} dims: [ {", ".join(map(str, dims))} ] }}')
        lines.append(f"{kind} [\n" + ",\n".join(entries) + "\n]")
    if dynamic:
        lines.append("dynamic_batching { }")
    return "\n".join(lines) + "\n"


def detector_config(artifact: Path, backend, options: DetectorOptions) -> str:
    """config.pbtxt of the end-to-end detector (its tensors: runtime/triton_model.py)."""
    rows = _tensors(artifact, backend)["output"][0][2][1]  # the queries: logits/scores [batch, K, ...]
    engine = artifact.suffix in (".engine", ".plan")
    params = {"artifact": "model" + artifact.suffix, "conf": str(options.conf), "max_detections": str(rows),
              "threads": str(options.threads), "spin": str(int(options.spin)), "classes": json.dumps(backend.classes)}
    lines = [f'name: "{DETECTOR}"', 'backend: "python"', f"max_batch_size: {options.max_batch}",
             "input [",
             # ragged: requests of other sizes batch together (the detector takes each request's own tensor)
             '  { name: "encoded" data_type: TYPE_UINT8 dims: [ -1 ] optional: true allow_ragged_batch: true },',
             '  { name: "frame" data_type: TYPE_UINT8 dims: [ -1, -1, 3 ] optional: true allow_ragged_batch: true }',
             "]", "output [",
             '  { name: "num_detections" data_type: TYPE_INT32 dims: [ 1 ] },',
             f'  {{ name: "scores" data_type: TYPE_FP32 dims: [ {rows} ] }},',
             f'  {{ name: "labels" data_type: TYPE_INT32 dims: [ {rows} ] }},',
             f'  {{ name: "boxes" data_type: TYPE_FP32 dims: [ {rows}, 4 ] }}',
             "]",
             f"instance_group [ {{ count: {options.instances} kind: {'KIND_GPU' if engine else 'KIND_CPU'} }} ]"]
    if options.dynamic_batching:
        lines.append(f"dynamic_batching {{ max_queue_delay_microseconds: {options.queue_delay_us} }}")
    lines += [f"parameters {{ key: \"{k}\" value: {{ string_value: {json.dumps(v)} }} }}" for k, v in params.items()]
    return "\n".join(lines) + "\n"


def _tensors(path: Path, backend) -> dict:
    import onnx
    if path.suffix != ".onnx":  # an engine: the ONNX it was built from names the same tensors
        path = path.with_name(backend.meta["engine"]["source"])
    graph = onnx.load(str(path), load_external_data=False).graph
    kinds = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.BOOL: "bool",
             onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32"}

    def describe(values):
        return [(v.name, kinds[v.type.tensor_type.elem_type],
                 [d.dim_value if d.dim_value else -1 for d in v.type.tensor_type.shape.dim]) for v in values]
    return {"input": describe(graph.input), "output": describe(graph.output)}


def _write(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_triton(root: Path, files: dict, backend_of, served: Path | None = None,
                 options: DetectorOptions | None = None) -> Path:
    """A Triton model repository: one model per artifact, `<name>/config.pbtxt` +
    `<name>/1/model.*` (`backend_of(path)`: the artifact's loaded backend); and, with
    `served` (one of the artifacts), the end-to-end detector on it."""
    for kind, path in files.items():
        path = Path(path)
        name = "detr_" + kind.replace(" ", "_").replace("-", "_")
        (root / name / "1").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, root / name / "1" / ("model.plan" if path.suffix in (".engine", ".plan") else "model.onnx"))
        _write(root / name / "config.pbtxt", raw_config(name, path, backend_of(path)))
    if served is not None:
        served, backend = Path(served), backend_of(Path(served))
        folder = root / DETECTOR
        (folder / "1").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(served, folder / "1" / ("model" + served.suffix))
        if served.suffix in (".engine", ".plan"):  # the TensorRT backend reads the engine's metadata beside it
            shutil.copyfile(f"{served}.json", folder / "1" / f"model{served.suffix}.json")
        _write(folder / "1" / "model.py", MODEL_PY)
        _write(folder / "labels.txt", "".join(f"{name}\n" for name in backend.classes))
        _write(folder / "config.pbtxt", detector_config(served, backend, options or DetectorOptions()))
    return root
