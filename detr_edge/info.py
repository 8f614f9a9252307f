"""`detr-edge info`: what a checkpoint or an ONNX file holds."""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

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


def onnx_info(path) -> dict:
    import onnx

    from detr_edge.runtime.metadata import read_onnx_metadata
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises protobuf DecodeError and others
        raise UserError(f"{path}: not a readable ONNX file ({type(exc).__name__})") from None
    meta = read_onnx_metadata(model, path)

    def shapes(values):
        return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in values}
    params = sum(math.prod(t.dims) for t in model.graph.initializer)
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None)
    return {"file": str(path), "kind": "onnx", "opset": opset, "parameters": params,
            "inputs": shapes(model.graph.input), "outputs": shapes(model.graph.output),
            **meta}


def info(path) -> dict:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    return onnx_info(path) if path.suffix == ".onnx" else checkpoint_info(path)


def format_info(data: dict) -> str:
    model = data["model"]
    classes = data["classes"]
    named = [c for c in classes if c != "N/A"]
    lines = [f"{data['file']} ({data['kind']})",
             f"  architecture: {model['backbone']}{' DC5' if model['dilation'] else ''}, d_model {model['hidden_dim']}, "
             f"{model['nheads']} heads, {model['enc_layers']} encoder + {model['dec_layers']} decoder layers, "
             f"ffn {model['dim_feedforward']}, {model['num_queries']} queries, "
             f"{'pre' if model['pre_norm'] else 'post'}-norm" + (f" (preset {data['preset']})" if "preset" in data else ""),
             f"  parameters: {data['parameters']:,}",
             f"  classes: {model['num_classes']} slots, {len(named)} named: {', '.join(named[:8])}"
             + (", ..." if len(named) > 8 else ""),
             f"  input size: {data['preprocess']['imgsz'][0]} x {data['preprocess']['imgsz'][1]} (H x W, letterboxed)"]
    if data["kind"] == "onnx":
        export = data.get("export", {})
        lines.append(f"  {export.get('precision', 'fp32')}, batch {export.get('batch', '?')}, outputs "
                     f"{export.get('outputs', 'raw')}, target {export.get('target', '?')}, opset {data['opset']}")
        lines.append(f"  inputs {data['inputs']}; outputs {data['outputs']}")
    return "\n".join(lines)
