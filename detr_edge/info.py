"""`detr-edge info`: what a checkpoint or an ONNX file holds."""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

from detr_edge.runtime.backends import ENGINE_SUFFIXES
from detr_edge.runtime.errors import UserError


def checkpoint_info(path) -> dict:
    from detr_edge.train.checkpoint import load_model
    from detr_edge.train.config import PRESETS

    model, config = load_model(path)  # loads the weights too: info also proves the file is usable
    params = sum(p.numel() for p in model.parameters())
    model_config = model.config
    # a preset's architecture with any number of classes (fine-tuned or trained on other data)
    preset = next((name for name, (cfg, _) in PRESETS.items()
                   if replace(cfg, num_classes=model_config.num_classes) == model_config), "custom")
    return {"file": str(path), "kind": "checkpoint", "preset": preset, "parameters": params, **config}


def model_info(path) -> dict:
    """An engine's sidecar (no TensorRT needed), or an .onnx file through onnxruntime (no torch,
    no onnx needed); with the onnx package, an ONNX file's opset, parameter count and tensor
    shapes too."""
    from detr_edge.runtime.backends import load_backend
    from detr_edge.runtime.backends.trt import sidecar_path
    from detr_edge.runtime.metadata import validate

    if path.suffix != ".onnx":
        side = sidecar_path(path)
        if not side.exists():
            raise UserError(f"{path}: no sidecar {side.name} (build engines with detr-edge build)")
        return {"file": str(path), "kind": "engine", **validate(json.loads(side.read_text()), str(side))}
    with load_backend(path) as backend:
        data = {"file": str(path), "kind": "onnx", **backend.meta}
    try:
        import onnx
    except ImportError:  # a runtime-only install: the metadata is the file's story
        return data
    model = onnx.load(str(path), load_external_data=False)

    def shapes(values):
        return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in values}
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None)
    return {**data, "opset": opset, "parameters": sum(math.prod(t.dims) for t in model.graph.initializer),
            "inputs": shapes(model.graph.input), "outputs": shapes(model.graph.output)}


def info(path) -> dict:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    return model_info(path) if path.suffix in (".onnx", *ENGINE_SUFFIXES) else checkpoint_info(path)


def format_info(data: dict) -> str:
    model = data["model"]
    classes = data["classes"]
    named = [c for c in classes if c != "N/A"]
    lines = [f"{data['file']} ({data['kind']})",
             f"  architecture: {model['backbone']}{' DC5' if model['dilation'] else ''}, d_model {model['hidden_dim']}, "
             f"{model['nheads']} heads, {model['enc_layers']} encoder + {model['dec_layers']} decoder layers, "
             f"ffn {model['dim_feedforward']}, {model['num_queries']} queries, "
             f"{'pre' if model['pre_norm'] else 'post'}-norm" + (f" (preset {data['preset']})" if "preset" in data else ""),
             f"  parameters: {data['parameters']:,}" if "parameters" in data else "  parameters: (counted with the onnx "
             "package installed)",
             f"  classes: {model['num_classes']} slots, {len(named)} named: {', '.join(named[:8])}"
             + (", ..." if len(named) > 8 else ""),
             f"  input size: {data['preprocess']['imgsz'][0]} x {data['preprocess']['imgsz'][1]} (H x W, letterboxed)"]
    if data["kind"] != "checkpoint":
        export = data.get("export", {})
        lines.append(f"  {export.get('precision', 'fp32')}, batch {export.get('batch', '?')}, outputs "
                     f"{export.get('outputs', 'raw')}, target {export.get('target', '?')}, opset "
                     f"{data.get('opset', export.get('opset', '?'))}")
        if "inputs" in data:
            lines.append(f"  inputs {data['inputs']}; outputs {data['outputs']}")
        if "engine" in data:
            engine = data["engine"]
            lines.append(f"  engine: TensorRT {engine.get('tensorrt_version')}, {engine.get('gpu')} "
                         f"(sm {engine.get('compute_capability')})")
    return "\n".join(lines)
