"""`detr-edge`: one command line; each stage registers its own subcommands. Only argparse
and the error type are imported up front, so `--help` and the light runtime commands
never pay for (or need) torch."""
from __future__ import annotations

import argparse
import logging
import sys

from runtime.errors import UserError
from train import cli as train_cli

# a missing optional dependency -> the extra that brings it
_EXTRAS = {"torch": "train", "torchvision": "train", "scipy": "train", "pycocotools": "train",
           "safetensors": "train", "onnx": "export", "onnxruntime": "export", "tensorrt": "tensorrt"}


def _register(sub) -> None:
    p = sub.add_parser("info", help="(export) architecture, classes, parameters and input size of a "
                                    "checkpoint or ONNX file")
    p.add_argument("file", help="checkpoint (.pth), Hugging Face DETR folder, or .onnx")
    p.set_defaults(func=_info)


def _info(args) -> None:
    from .info import format_info, info
    print(format_info(info(args.file)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="detr-edge", description="DETR from checkpoint to real-time "
                                     "detection on NVIDIA GPUs and Jetson. Stages in brackets.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train_cli.register(sub)
    _register(sub)
    return parser


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="detr-edge: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as exc:
        print(f"detr-edge: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        root = (exc.name or "").split(".")[0]
        if root not in _EXTRAS:
            raise
        print(f"detr-edge: error: '{args.command}' needs {root}: pip install 'detr-edge[{_EXTRAS[root]}]'",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("detr-edge: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
