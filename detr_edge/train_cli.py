"""The train stage's subcommands. Only argparse here: heavy imports happen in handlers,
so `detr-edge --help` and the runtime commands work without torch."""
from __future__ import annotations

import logging

from detr_edge.train.config import PRESETS  # torch-free: dataclasses and runtime only

log = logging.getLogger("detr_edge")


def register(sub) -> None:
    p = sub.add_parser("init", help="(train) write a checkpoint of a preset with fresh weights")
    p.add_argument("preset", help=", ".join(PRESETS))
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

    p = sub.add_parser("train", help="(train) train DETR on a COCO-format dataset (also under torchrun)")
    p.add_argument("--data", required=True, help="COCO layout: annotations/instances_{train,val}*.json + image folders")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--preset", help="architecture to train from scratch (default detr_r50)")
    start.add_argument("--weights", help="start from these weights (official, HF or ours); other classes: "
                                         "only the class head is re-initialised")
    start.add_argument("--resume", help="continue a run from its last.pth exactly, with the run's options (those "
                                        "that define it: size, rates, heads, --ema, seed...) and its bounds "
                                        "(--epochs, --max-steps, --drop-at) unless given again")
    p.add_argument("--out", help="the run's folder (default runs/train)")
    p.add_argument("--imgsz", help="training/deployment size H x W or S (default: the preset's)")
    p.add_argument("--recipe", choices=["edge", "official"],
                   help="edge (default): letterbox at imgsz as deployed; official: the paper's multi-scale recipe")
    for name, kind, help_text in [
            ("epochs", int, "default 300"), ("batch-size", int, "per process, default 2"),
            ("lr", float, "default 1e-4"), ("lr-backbone", float, "default 1e-5; 0 freezes the backbone"),
            ("weight-decay", float, "default 1e-4"), ("clip-max-norm", float, "default 0.1"),
            ("lr-drop", int, "epoch of the x0.1 drop, default 200"), ("warmup", int, "linear warm-up steps"),
            ("zoom", float, "edge recipe: probability of the random zoom-in crop, default 0.5"),
            ("eos-coef", float, "no-object class weight, default 0.1"),
            ("class-weight", float, "weight of the class term in the loss and the matching cost, default 1 "
                                    "(the paper's); 2 doubled AP50 of the 15-minute demo recipe"),
            ("groups", int, "Group DETR query groups for faster convergence (training only), default 1"),
            ("denoise", int, "contrastive denoising queries per image (DN-DETR, DINO; DINO's 100): noised "
                             "ground truth the decoder learns to reconstruct (training only), default 0"),
            ("eval-every", int, "epochs between COCO evaluations (0: only at the end), default 1"),
            ("save-every", int, "steps between last.pth writes, default 200"),
            ("time-limit", float, "minutes; stop, evaluate and save when reached"),
            ("max-steps", int, "steps in all (a resumed run counts its earlier ones); stop, evaluate and save "
                               "when reached"),
            ("drop-at", float, "drop the learning rate x0.1 once this share of --max-steps or of --time-limit, "
                               "whichever ends first, has passed (e.g. 0.85), so a bounded run ends in its "
                               "fine phase on a slow machine as on a fast one; with --schedule wsd, where "
                               "its decay starts"),
            ("workers", int, "data loader processes, default 1"), ("seed", int, "default 42")]:
        p.add_argument(f"--{name}", type=kind, help=help_text)
    p.add_argument("--schedule", choices=["step", "linear", "cosine", "wsd"],
                   help="learning rate after the warm-up: step (default; the official x0.1 drops, --lr-drop, "
                        "--drop-at), a decay to 0 over the run (--max-steps, --time-limit or --epochs: "
                        "whichever ends first), linear or cosine, or wsd: the peak rate until --drop-at of "
                        "the run, then a decay to 0 at its end as 1 - sqrt(share of the decay spent)")
    p.add_argument("--no-aux-loss", dest="aux_loss", action="store_false", default=None)
    p.add_argument("--encoder-head", type=float, nargs="?", const=1.0, metavar="W",
                   help="one-to-many class and box supervision of every encoder cell, its loss weighted W "
                        "(default 1 when given; Co-DETR's auxiliary heads; training only, checkpoints stay "
                        "plain DETR): 1.9x AP50 of the 15-minute demo recipe with W 1")
    p.add_argument("--backbone-head", metavar="LEVELS",
                   help="the same head also on these backbone levels, comma-separated: layer2 (stride 8), "
                        "layer3 (stride 16) (Co-DETR's multi-scale auxiliary heads; needs --encoder-head, "
                        "whose W weights it)")
    p.add_argument("--query-init", choices=["random", "anchors"],
                   help="the queries' starting values: random (default, the official) or anchors: each at a "
                        "random point, encoded as the memory's positions, with the cross-attention starting "
                        "by comparing the two (from scratch only; the model stays plain DETR)")
    p.add_argument("--ema", type=float, metavar="DECAY",
                   help="evaluate, save and deploy an exponential moving average of the weights (ultralytics' "
                        "and RT-DETR's EMA), averaging over about 1/(1-DECAY) steps: 0.95 for the ~1,000-step "
                        "demo, 0.9999 (ultralytics') for long runs")
    p.add_argument("--contiguous-ids", dest="contiguous", action="store_true", default=None,
                   help="remap category ids to 0..C-1 (custom datasets with sparse ids)")
    p.add_argument("--device", help="cpu (default) or cuda[:N]")
    p.add_argument("--amp", action="store_true", default=None, help="mixed precision (CUDA only)")
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="(train) COCO metrics (pycocotools) of a checkpoint on a dataset")
    p.add_argument("checkpoint")
    p.add_argument("--data", required=True, help="COCO layout root, or an instances json beside its image folder")
    p.add_argument("--split", default="val")
    p.add_argument("--imgsz", help="input size (default: the checkpoint's)")
    p.add_argument("--contiguous-ids", action="store_true")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="write the metrics as JSON here")
    p.set_defaults(func=_eval)

    p = sub.add_parser("explain", help="(train) where the model looks: decoder and encoder attention as PNGs")
    p.add_argument("checkpoint")
    p.add_argument("image")
    p.add_argument("--queries", default="top",
                   help="top: the queries detecting above --conf (default); all; or indices like 3,17")
    p.add_argument("--points", nargs="+", metavar="X,Y",
                   help="encoder self-attention at these image pixels (default: the detections' centres)")
    p.add_argument("--conf", type=float, default=0.5, help="score threshold of --queries top")
    p.add_argument("--heads", action="store_true", help="each attention head too, beside their mean")
    p.add_argument("--imgsz", help="input size H x W or S (default: the checkpoint's)")
    p.add_argument("--out", default="explain-out", help="folder for the PNGs, index.html and explain.json")
    p.set_defaults(func=_explain)

    p = sub.add_parser("queries", help="(train) the paper's query-specialisation plot over a dataset")
    p.add_argument("checkpoint")
    p.add_argument("--data", required=True, help="image folder, COCO layout root, or instances json")
    p.add_argument("--split", default="val")
    p.add_argument("--conf", type=float, default=0.5, help="count predictions with score >= this")
    p.add_argument("--limit", type=int, help="use the first N images only")
    p.add_argument("--imgsz", help="input size H x W or S (default: the checkpoint's)")
    p.add_argument("--out", default="queries-out", help="folder for queries.png and queries.json")
    p.set_defaults(func=_queries)

    data = sub.add_parser("data", help="(train) datasets").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("synth", help="write the embedded shapes dataset (COCO format) and a video")
    p.add_argument("out")
    p.add_argument("--train", type=int, default=2000, help="training images (default 2000)")
    p.add_argument("--val", type=int, default=200, help="validation images (default 200)")
    p.add_argument("--imgsz", default="192", help="image size H x W or S (default 192)")
    p.add_argument("--max-objects", type=int, default=5, help="objects per image: 1 to this (default 5)")
    p.add_argument("--train-objects", type=int, help="objects per training image: 1 to this (default --max-objects)")
    p.add_argument("--aspects", metavar="W:H,...",
                   help="frame shapes of the training images and of the 'cameras' split, in turn "
                        "(default 1:1,4:3,16:9,3:4,9:16: real cameras' shapes, the long side --imgsz's); "
                        "none: every image at --imgsz, no 'cameras' split")
    p.add_argument("--train-aspects", metavar="W:H,...",
                   help="frame shapes of the training images alone, in turn (default --aspects'), e.g. "
                        "1:1,4:3,1:1,16:9,1:1,3:4,1:1,9:16: half of them square, as the demo's")
    p.add_argument("--video-frames", type=int, default=150)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_synth)


def _init(args) -> None:
    import torch

    from detr_edge.runtime.metadata import parse_imgsz

    from detr_edge.train.checkpoint import save_checkpoint
    from detr_edge.train.config import DETRConfig, checkpoint_config, preset
    from detr_edge.train.detr import DETR

    model_config, imgsz = preset(args.preset)
    if args.num_classes is not None:
        model_config = DETRConfig.from_dict({**model_config.to_dict(), "num_classes": args.num_classes})
    imgsz = parse_imgsz(args.imgsz) if args.imgsz else imgsz
    torch.manual_seed(args.seed)
    model = DETR(model_config)
    save_checkpoint(args.out, model, checkpoint_config(model_config, imgsz), preset=args.preset)
    log.info("wrote %s (%s, %d classes, fresh weights)", args.out, args.preset, model_config.num_classes)


def _predict(args) -> None:
    from detr_edge.runtime.metadata import parse_imgsz

    from detr_edge.train.predict import run

    report = run(args.checkpoint, args.images, args.out, parse_imgsz(args.imgsz) if args.imgsz else None,
                 args.conf, args.max_det, args.device)
    total = sum(len(image["detections"]) for image in report["images"])
    log.info("%d images, %d detections at score >= %g -> %s/", len(report["images"]), total, args.conf, args.out)


def _train(args) -> None:
    from detr_edge.train.engine import train

    options = train_options(args)
    metrics = train(options)
    if metrics:
        log.info("final: AP %.3f, AP50 %.3f; checkpoints in %s/", metrics["AP"], metrics["AP50"], options.out)


def train_options(args):
    """`detr-edge train`'s parsed arguments as the engine's TrainOptions (a resumed run's own
    options restored)."""
    from detr_edge.runtime.errors import UserError
    from detr_edge.runtime.metadata import parse_imgsz

    from detr_edge.train.engine import TrainOptions, resume_options

    given = {k: v for k, v in vars(args).items() if k in TrainOptions.__dataclass_fields__ and v is not None}
    if "imgsz" in given:
        given["imgsz"] = parse_imgsz(given["imgsz"])
    if "backbone_head" in given:
        given["backbone_head"] = tuple(level.strip() for level in given["backbone_head"].split(",") if level.strip())
    opts = resume_options(given) if "resume" in given else TrainOptions(**given)
    if "lr_drop" in given and opts.schedule != "step":  # its default would pass unseen
        raise UserError(f"--lr-drop belongs to the step schedule, not to --schedule {opts.schedule}")
    return opts


def _eval(args) -> None:
    from detr_edge.runtime.io import write_json
    from detr_edge.runtime.metadata import parse_imgsz

    from detr_edge.train.checkpoint import load_model
    from detr_edge.runtime.coco import resolve_coco
    from detr_edge.train.data import CocoDetection, Transform
    from detr_edge.train.evaluate import evaluate

    model, config = load_model(args.checkpoint)
    images, ann = resolve_coco(args.data, args.split)
    imgsz = parse_imgsz(args.imgsz) if args.imgsz else tuple(config["preprocess"]["imgsz"])
    dataset = CocoDetection(images, ann, Transform("edge", imgsz, train=False), contiguous=args.contiguous_ids)
    metrics = evaluate(model.to(args.device), dataset, args.batch_size, args.device)
    for name, value in metrics.items():
        print(f"{name:>10}: {value:.4f}")
    if args.out:
        write_json(args.out, {"checkpoint": args.checkpoint, "data": str(ann), "imgsz": list(imgsz), **metrics})


def _explain(args) -> None:
    from detr_edge.runtime.metadata import parse_imgsz

    from detr_edge.train.explain import run

    views = run(args.checkpoint, args.image, args.out, args.queries, args.points, args.conf, args.heads,
                parse_imgsz(args.imgsz) if args.imgsz else None)
    log.info("%d queries, %d reference points -> %s/index.html", len(views["decoder"]), len(views["encoder"]),
             args.out)


def _queries(args) -> None:
    from detr_edge.runtime.metadata import parse_imgsz

    from detr_edge.train.queries import run

    stats = run(args.checkpoint, args.data, args.out, args.split, args.conf,
                parse_imgsz(args.imgsz) if args.imgsz else None, args.limit)
    firing = sum(1 for slot in stats["slots"] if slot["count"])
    log.info("%d images: %d predictions at score >= %g from %d of %d query slots -> %s/queries.png",
             stats["images"], stats["predictions"], args.conf, firing, len(stats["slots"]), args.out)


def _aspects(flag: str, text: str | None) -> tuple | None:
    """"16:9,3:4" -> ((16, 9), (3, 4)); None or "" -> None."""
    from detr_edge.runtime.errors import UserError

    if not text:
        return None
    try:
        aspects = tuple(tuple(int(v) for v in a.split(":")) for a in text.split(","))
    except ValueError:
        aspects = ()
    if not aspects or any(len(a) != 2 or min(a) < 1 for a in aspects):
        raise UserError(f"{flag} {text}: expected W:H pairs such as 16:9,3:4"
                        + (", or none" if flag == "--aspects" else ""))
    return aspects


def _synth(args) -> None:
    from detr_edge.runtime.metadata import parse_imgsz

    from detr_edge.runtime.errors import UserError
    from detr_edge.runtime.coco import CAMERA_ASPECTS
    from detr_edge.train.synth import synthesize

    aspects = None if args.aspects == "none" else _aspects("--aspects", args.aspects) or CAMERA_ASPECTS
    train_aspects = _aspects("--train-aspects", args.train_aspects)
    if train_aspects and not aspects:
        raise UserError("--train-aspects needs the cameras' shapes (--aspects), not none")
    for flag, value in (("--max-objects", args.max_objects), ("--train-objects", args.train_objects)):
        if value is not None and value < 1:
            raise UserError(f"{flag} {value}: must be at least 1")
    paths = synthesize(args.out, args.train, args.val, parse_imgsz(args.imgsz), args.video_frames, args.seed,
                       args.max_objects, aspects, args.train_objects, train_aspects)
    log.info("wrote %s", ", ".join(map(str, paths.values())))
