"""The train stage's subcommands. Only argparse here: heavy imports happen in handlers,
so `detr-edge --help` and the runtime commands work without torch."""
from __future__ import annotations

import logging

log = logging.getLogger("detr_edge")


def register(sub) -> None:
    p = sub.add_parser("init", help="(train) write a checkpoint of a preset with fresh weights")
    p.add_argument("preset", help="detr_r50, detr_r50_dc5, detr_r101, detr_r101_dc5, detr_r18")
    p.add_argument("out", help="checkpoint file to write (.pth)")
    p.add_argument("--num-classes", type=int, help="max category id + 1 (default: the preset's 91, COCO)")
    p.add_argument("--imgsz", help="deployment input size H x W or S (default: the preset's)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_init)

    p = sub.add_parser("predict", help="(train) run the PyTorch model on images: annotated images + JSON")
    p.add_argument("checkpoint", help="ours, the official release's, or a Hugging Face DETR folder")
    p.add_argument("images", nargs="+")
    p.add_argument("--out", default="predict-out", help="folder for <image>.jpg and predictions.json")
    p.add_argument("--imgsz", help="input size H x W or S (default: the checkpoint's)")
    p.add_argument("--conf", type=float, default=0.5, help="score threshold")
    p.add_argument("--max-det", type=int, default=100, help="keep at most this many detections per image")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.set_defaults(func=_predict)


def _init(args) -> None:
    import torch

    from runtime.metadata import parse_imgsz

    from .checkpoint import save_checkpoint
    from .config import DETRConfig, checkpoint_config, preset
    from .detr import DETR

    model_config, imgsz = preset(args.preset)
    if args.num_classes is not None:
        model_config = DETRConfig.from_dict({**model_config.to_dict(), "num_classes": args.num_classes})
    imgsz = parse_imgsz(args.imgsz) if args.imgsz else imgsz
    torch.manual_seed(args.seed)
    model = DETR(model_config)
    save_checkpoint(args.out, model, checkpoint_config(model_config, imgsz), preset=args.preset)
    log.info("wrote %s (%s, %d classes, fresh weights)", args.out, args.preset, model_config.num_classes)


def _predict(args) -> None:
    from runtime.metadata import parse_imgsz

    from .predict import run

    report = run(args.checkpoint, args.images, args.out, parse_imgsz(args.imgsz) if args.imgsz else None,
                 args.conf, args.max_det, args.device)
    total = sum(len(image["detections"]) for image in report["images"])
    log.info("%d images, %d detections at score >= %g -> %s/", len(report["images"]), total, args.conf, args.out)
