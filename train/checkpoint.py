"""Checkpoint I/O that interchanges with the official release and Hugging Face.

Reads, by content:
- ours: {'model': state_dict, 'config': {...}, ...}
- the official code's: {'model', 'optimizer', 'lr_scheduler', 'epoch', 'args': Namespace}
  (release files may hold only 'model'); sizes come from the weights' shapes, heads and
  dilation from `args` (or 'dc5' in the file name when there is no `args`);
- Hugging Face: a DetrForObjectDetection folder (config.json + safetensors/bin) or a
  saved HF state dict; converted by `train.hf`.
Always `torch.load(weights_only=True)` with only `argparse.Namespace` allow-listed.
"""
from __future__ import annotations

import argparse
import json
import logging
import pickle
import re
from pathlib import Path

import torch

from detr_edge.runtime.errors import UserError
from detr_edge.runtime.io import atomic_path

from . import hf
from .config import OFFICIAL_IMGSZ, DETRConfig, checkpoint_config
from .detr import DETR

log = logging.getLogger("detr_edge")

_DEPTHS = {(True, 6): "resnet50", (True, 23): "resnet101", (False, 2): "resnet18", (False, 6): "resnet34"}
_CLASS_HEAD = ("class_embed.weight", "class_embed.bias")


def _torch_load(path: Path):
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder without a Hugging Face config.json") from None
    except pickle.UnpicklingError as exc:
        found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", str(exc))
        if found:
            raise UserError(f"{path}: refused to load: the file holds a disallowed object ({found.group(1)}); "
                            "only weights are loaded (weights_only=True)") from None
        raise UserError(f"{path}: not a readable PyTorch checkpoint (unrecognised content)") from None
    except Exception as exc:  # the unpickler raises anything (IndexError, KeyError, ...) on garbage
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: not a readable PyTorch checkpoint (corrupt or truncated? {reason})") from None


def _count(state_dict: dict, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in state_dict for m in [pattern.match(k)] if m})


def infer_model_config(state_dict: dict, nheads: int = 8, dilation: bool = False,
                       dropout: float = 0.1) -> DETRConfig:
    """Sizes from the weights' shapes; what shapes cannot tell comes in as arguments."""
    bottleneck = "backbone.0.body.layer1.0.conv3.weight" in state_dict
    depth = _count(state_dict, "backbone.0.body.layer3.")
    if (bottleneck, depth) not in _DEPTHS:
        raise UserError(f"unrecognised backbone ({depth} blocks in layer3); expected a ResNet-18/34/50/101")
    return DETRConfig(
        backbone=_DEPTHS[bottleneck, depth], dilation=dilation, frozen_bn=True,
        hidden_dim=state_dict["input_proj.weight"].shape[0], nheads=nheads,
        enc_layers=_count(state_dict, "transformer.encoder.layers."),
        dec_layers=_count(state_dict, "transformer.decoder.layers."),
        dim_feedforward=state_dict["transformer.encoder.layers.0.linear1.weight"].shape[0],
        dropout=dropout, num_queries=state_dict["query_embed.weight"].shape[0],
        num_classes=state_dict["class_embed.weight"].shape[0] - 1,
        pre_norm="transformer.encoder.norm.weight" in state_dict)


def _foreign_config(path: Path, state_dict: dict, options: dict, imgsz) -> dict:
    classes = options.pop("classes", None)
    try:
        model = infer_model_config(state_dict, **options)
    except KeyError as exc:
        raise UserError(f"{path}: not a DETR checkpoint (no {exc.args[0]!r} weights)") from None
    return checkpoint_config(model, imgsz, classes)


def _read_hf_folder(path: Path) -> tuple[dict, dict]:
    hf_config = json.loads((path / "config.json").read_text())
    if (path / "model.safetensors").exists():
        from safetensors.torch import load_file
        state_dict = load_file(path / "model.safetensors")
    elif (path / "pytorch_model.bin").exists():
        state_dict = _torch_load(path / "pytorch_model.bin")
    else:
        raise UserError(f"{path}: Hugging Face folder without model.safetensors or pytorch_model.bin")
    return state_dict, hf_config


def read_checkpoint(path, imgsz=OFFICIAL_IMGSZ) -> tuple[dict, dict, dict]:
    """-> (official-layout state_dict, config, the whole file's dict). `imgsz` is the input
    size recorded for files that carry none (official and Hugging Face ones)."""
    path = Path(path)
    if path.is_dir() and (path / "config.json").exists():
        hf_state, hf_config = _read_hf_folder(path)
        state_dict = hf.convert_state_dict(hf_state)
        return state_dict, _foreign_config(path, state_dict, hf.options_from_hf_config(hf_config), imgsz), {}
    obj = _torch_load(path)
    if not isinstance(obj, dict):
        raise UserError(f"{path}: not a DETR checkpoint (holds a {type(obj).__name__}, not a dict)")
    state_dict = obj.get("model", obj)
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise UserError(f"{path}: not a DETR checkpoint (no state dict under 'model')")
    if hf.is_hf_state_dict(state_dict):
        state_dict = hf.convert_state_dict(state_dict)
    if "query_embed.weight" not in state_dict:
        raise UserError(f"{path}: not a DETR checkpoint (no 'query_embed.weight'; "
                        f"{len(state_dict)} tensors such as {next(iter(state_dict), 'none')!r})")
    if isinstance(obj.get("config"), dict):
        return state_dict, obj["config"], obj
    args = obj.get("args")
    if args is not None and getattr(args, "position_embedding", "sine") not in ("sine", "v2"):
        raise UserError(f"{path}: learned position embeddings are not supported (only the paper's sine)")
    # the official main.py's defaults for what an `args` (third-party ones too) may lack
    official = {"nheads": 8, "dilation": "dc5" in path.name.lower(), "dropout": 0.1}
    options = ({name: getattr(args, name, default) for name, default in official.items()} if args is not None
               else {"dilation": official["dilation"]})
    options["dilation"] = bool(options["dilation"])
    return state_dict, _foreign_config(path, state_dict, options, imgsz), obj


def _check_fit(path, expected: dict, found: dict) -> None:
    """One readable line instead of load_state_dict's wall of text."""
    missing = [k for k in expected if k not in found and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in found if k not in expected and not k.endswith("num_batches_tracked")]
    wrong = [k for k in found if k in expected and found[k].shape != expected[k].shape]
    problems = []
    if wrong:
        k = wrong[0]
        problems.append(f"{len(wrong)} shape mismatches (e.g. {k} is {list(found[k].shape)}, "
                        f"the model expects {list(expected[k].shape)})")
    if missing:
        problems.append(f"{len(missing)} missing tensors (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})")
    if problems:
        raise UserError(f"{path}: weights do not fit the model its config describes: {'; '.join(problems)}")


def load_model(path, num_classes: int | None = None, classes: list[str] | None = None,
               imgsz=OFFICIAL_IMGSZ) -> tuple[DETR, dict]:
    """Build the model a checkpoint describes and load its weights (strict).

    With `num_classes` different from the checkpoint's (fine-tuning onto other
    classes), only the class head is re-initialised, and the log says so."""
    state_dict, config, _ = read_checkpoint(path, imgsz)
    try:
        model_config = DETRConfig.from_dict(config["model"])
    except (KeyError, TypeError) as exc:
        raise UserError(f"{path}: malformed config in checkpoint ({exc})") from None
    reinit = num_classes is not None and num_classes != model_config.num_classes
    if reinit:
        log.warning("%s: re-initialising the class head: %d -> %d classes (everything else loads)",
                    path, model_config.num_classes, num_classes)
        model_config = DETRConfig.from_dict({**model_config.to_dict(), "num_classes": num_classes})
        config = checkpoint_config(model_config, config["preprocess"]["imgsz"], classes)
        state_dict = {k: v for k, v in state_dict.items() if k not in _CLASS_HEAD}
    model = DETR(model_config)
    expected = {k: v for k, v in model.state_dict().items() if not (reinit and k in _CLASS_HEAD)}
    _check_fit(path, expected, state_dict)
    model.load_state_dict(state_dict, strict=not reinit)
    return model, config


def save_checkpoint(path, model: DETR, config: dict, **extra) -> None:
    """Atomic write of {'model', 'config', **extra}; `model` keys are the official layout,
    its tensors contiguous as in the official files (training keeps the backbone channels-last)."""
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save({"model": weights, "config": config, **extra}, tmp)
