"""Training throughput (images/s) of one full step (forward, matching, set loss with aux
losses, backward, clipping, AdamW) on random data, at the config the official code was
measured at (../shared/reference/measured-here.md): ResNet-18, d=128, 3+3 layers,
8 heads, ffn 512, 20 queries, 3 classes, 128x128 images with 3 boxes each, batch 16,
2 threads. The official code's backbone has frozen BatchNorm and trains layer2..4 only;
`--scratch` measures trainable BatchNorm and every layer training instead (what training
from scratch needs; the official code has no such mode).

With frozen BatchNorm it also times our step as it was before issue 24 ("before"): the
BatchNorm applied after each convolution (train/backbone.py folds it into them now),
layer4's weights channels-last (train/backbone.py's training_memory_format keeps them in
the default order now) and the gradients clipped by clip_grad_norm_ (engine.clip_gradients
lets the fused AdamW apply the factor now), side by side, the same weights.

`--official DIR` takes a checkout of github.com/facebookresearch/detr and times its step
side by side with ours: iterations alternate, so the machine's noise hits both alike.
Its model gets our model's weights (the state-dict keys are the same), so the two
losses on the first batch must agree; the script prints the difference. The official
step is its main.py/engine.py recipe: AdamW with torch's defaults, clip_grad_norm_ 0.1.

`--recipe OPTIONS [OPTIONS ...]` times instead the demo's recipe (detr_edge/demo.py's
`detr-edge train` options: detr_r18_tiny from scratch, 4 classes; the weight average's
update left out) with each string of options added to it (`""`: the recipe as it is),
side by side: what each change costs per step.

    .venv/bin/python benchmarks/train_speed.py [--official ../detr] [--scratch] [--compile] [--steps 30] [--batch 16]
    .venv/bin/python benchmarks/train_speed.py --recipe "" "--denoise 0" "--backbone-head layer3"
"""
import argparse
import shlex
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from torchvision.ops import FrozenBatchNorm2d  # noqa: E402

from detr_edge.train.backbone import FoldedFrozenBatchNorm2d, FoldingConv2d  # noqa: E402
from detr_edge.train.config import DETRConfig, preset  # noqa: E402
from detr_edge.train.criterion import SetCriterion  # noqa: E402
from detr_edge.train.detr import DETR  # noqa: E402
from detr_edge.cli import build_parser  # noqa: E402
from detr_edge.demo import TRAIN  # noqa: E402
from detr_edge.train.engine import (TrainingModel, TrainOptions, clip_gradients, criterion_for,  # noqa: E402
                                    optimizer_for, train_step, trainer_for)
from detr_edge.train_cli import train_options  # noqa: E402

LR, LR_BACKBONE = 1e-4, 1e-5  # the official defaults
DEMO_CLASSES = 4  # the shapes dataset's


def ours(config: DETRConfig, before: bool = False, weights: dict | None = None, compile_model: bool = False):
    """Our step; `before`: with frozen BatchNorm applied after each convolution, every
    backbone weight channels-last and clip_grad_norm_, as before issue 24, the same weights;
    `compile_model`: the training model through torch.compile (inductor)."""
    model = DETR(config).train()
    if weights is not None:
        model.load_state_dict(weights)
    if before:
        for module in model.modules():
            if isinstance(module, FoldingConv2d):
                module.__class__ = torch.nn.Conv2d
            elif isinstance(module, FoldedFrozenBatchNorm2d):
                module.__class__ = FrozenBatchNorm2d
    trainer = TrainingModel(model)
    if before:
        model.backbone.to(memory_format=torch.channels_last)
        model.backbone[0].body.layer4._forward_pre_hooks.clear()  # its input channels-last too, as then
    optimizer = optimizer_for(trainer, TrainOptions(data="", lr=LR, lr_backbone=LR_BACKBONE))
    forward = torch.compile(trainer) if compile_model else trainer
    step = training_step(forward, trainer, SetCriterion(config.num_classes), optimizer, 0.1, before)
    return trainer, optimizer, step


def training_step(forward, trainer, criterion, optimizer, clip_max_norm: float, before: bool = False):
    """One step: train/engine.py's train_step (no AMP; the loop's average and log not timed);
    `before`: forward, set loss, backward, clipped by clip_grad_norm_ in place, AdamW, as
    before issue 24."""
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    def step(images, mask, targets):
        if not before:
            return train_step(forward, trainer, criterion, optimizer, scaler, clip_max_norm, images, mask,
                              targets)["loss"]
        losses = criterion(forward(images, mask, targets), targets)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_([p for p in trainer.parameters() if p.grad is not None], clip_max_norm,
                                       foreach=True)
        optimizer.step()
        return losses["loss"]
    return step


def demo_recipe(extra: str):
    """The demo's training step (detr_edge/demo.py's TRAIN, read through `detr-edge train`'s
    parser, the later of two equal options winning) with the options in `extra` added."""
    opts = train_options(build_parser().parse_args(["train", "--data", "", *TRAIN, *shlex.split(extra)]))
    torch.manual_seed(opts.seed)
    config, _ = preset(opts.preset)
    trainer = trainer_for(DETR(replace(config, num_classes=DEMO_CLASSES)).train(), opts)
    return training_step(trainer, trainer, criterion_for(opts, DEMO_CLASSES), optimizer_for(trainer, opts),
                         opts.clip_max_norm)


def official(root: Path, config: DETRConfig, weights: dict):
    """The official model, matcher and criterion at `config`, built as its build() does."""
    import torchvision.ops
    import torchvision.ops.misc
    # util/misc.py reads torchvision's version as float("0.2") for 0.2x and then imports two
    # private helpers removed since 0.7; they are only used on a path this step never takes.
    for module, name in ((torchvision.ops, "_new_empty_tensor"), (torchvision.ops.misc, "_output_size")):
        if not hasattr(module, name):
            setattr(module, name, None)
    sys.path.insert(0, str(root))
    from models import backbone as official_backbone
    from models.detr import DETR as OfficialDETR
    from models.detr import SetCriterion as OfficialCriterion
    from models.matcher import HungarianMatcher
    from models.position_encoding import PositionEmbeddingSine
    from models.transformer import Transformer
    from util.misc import NestedTensor
    official_backbone.is_main_process = lambda: False  # it asks for ImageNet weights on rank 0 (a download)
    body = official_backbone.Backbone(config.backbone, True, False, config.dilation)
    backbone = official_backbone.Joiner(body, PositionEmbeddingSine(config.hidden_dim // 2, normalize=True))
    backbone.num_channels = body.num_channels  # as its build_backbone() does
    transformer = Transformer(config.hidden_dim, config.nheads, config.enc_layers, config.dec_layers,
                              config.dim_feedforward, config.dropout, normalize_before=config.pre_norm,
                              return_intermediate_dec=True)
    model = OfficialDETR(backbone, transformer, config.num_classes, config.num_queries, aux_loss=True).train()
    model.load_state_dict(weights)
    weight_dict = {"loss_ce": 1, "loss_bbox": 5, "loss_giou": 2}
    weight_dict.update({f"{k}_{i}": v for i in range(config.dec_layers - 1) for k, v in list(weight_dict.items())})
    criterion = OfficialCriterion(config.num_classes, HungarianMatcher(1, 5, 2), weight_dict, 0.1,
                                  ["labels", "boxes", "cardinality"])
    optimizer = torch.optim.AdamW([
        {"params": [p for n, p in model.named_parameters() if "backbone" not in n and p.requires_grad]},
        {"params": [p for n, p in model.named_parameters() if "backbone" in n and p.requires_grad],
         "lr": LR_BACKBONE}], lr=LR, weight_decay=1e-4)

    def step(images, mask, targets):
        loss_dict = criterion(model(NestedTensor(images, mask)), targets)
        loss = sum(loss_dict[k] * weight_dict[k] for k in loss_dict if k in weight_dict)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
        return loss
    return model, optimizer, step


def time_steps(runs: dict, args, images, mask, targets, kind: str) -> dict:
    """Alternating steps of each run; prints and returns the median seconds per step."""
    times = {name: [] for name in runs}
    for i in range(args.warmup + args.steps):
        for name, run in runs.items():
            start = time.perf_counter()
            run(images, mask, targets)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
    print(f"training step ({kind}), batch {args.batch}, {args.size}x{args.size}, {args.threads} threads, "
          f"torch {torch.__version__}, {args.steps} {'alternating ' if len(runs) > 1 else ''}steps:")
    median = {name: statistics.median(t) for name, t in times.items()}
    first = next(iter(median.values()))
    width = max(11, *map(len, median))
    for name, value in median.items():
        print(f"  {name:{width}s} median {value * 1000:6.0f} ms/step, {args.batch / value:5.1f} images/s "
              f"(min {min(times[name]) * 1000:.0f}, max {max(times[name]) * 1000:.0f} ms), "
              f"{value / first:.2f}x the first's time")
    return median


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--official", type=Path, help="a checkout of facebookresearch/detr, timed side by side")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scratch", action="store_true", help="trainable BatchNorm, all layers train")
    parser.add_argument("--compile", action="store_true", help="also time our step through torch.compile")
    parser.add_argument("--recipe", nargs="+", metavar="OPTIONS",
                        help="time the demo's recipe with each string of `detr-edge train` options added")
    args = parser.parse_args()
    if args.official and args.scratch:
        parser.error("--scratch has no official counterpart (its backbone always has frozen BatchNorm)")
    if args.recipe and (args.official or args.scratch or args.compile):
        parser.error("--recipe times the demo's recipe alone")
    if args.official and not (args.official / "models" / "detr.py").is_file():
        parser.error(f"{args.official} is not a checkout of facebookresearch/detr (no models/detr.py)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = DETRConfig(backbone="resnet18", frozen_bn=not args.scratch, hidden_dim=128, nheads=8, enc_layers=3,
                        dec_layers=3, dim_feedforward=512, dropout=0.0, num_queries=20, num_classes=3)
    images = torch.randn(args.batch, 3, args.size, args.size)
    mask = torch.zeros(args.batch, args.size, args.size, dtype=torch.bool)
    targets = [{"labels": torch.randint(0, 3, (3,)), "boxes": torch.rand(3, 4) * 0.5 + 0.25} for _ in range(args.batch)]
    if args.recipe:
        return time_steps({extra or "the recipe": demo_recipe(extra) for extra in args.recipe}, args, images, mask,
                          [{"labels": torch.randint(0, DEMO_CLASSES, (k,)), "boxes": torch.rand(k, 4) * 0.4 + 0.3}
                           for k in [1, 2, 3] * (args.batch // 3) + [2] * (args.batch % 3)], "the demo's recipe")
    trainer, optimizer, step = ours(config)
    runs = {"detr-edge": step}
    if not args.scratch:  # the step before issue 24's changes, for the before/after
        runs["before"] = ours(config, before=True, weights=trainer.model.state_dict())[2]
    if args.official:
        _, _, runs["official"] = official(args.official, config, trainer.model.state_dict())
    if args.compile:
        runs["compiled"] = ours(config, weights=trainer.model.state_dict(), compile_model=True)[2]
    if len(runs) > 1:
        first, took = {}, {}
        for name, run in runs.items():
            start = time.perf_counter()
            first[name] = run(images, mask, targets).item()
            took[name] = time.perf_counter() - start
        if args.compile:
            print(f"torch.compile: the first step took {took['compiled']:.1f} s (compiling; "
                  f"{took['detr-edge']:.1f} s eager)")
        print("same weights, first batch: loss " + ", ".join(f"{v:.6f} ({k})" for k, v in first.items())
              + "; |diff| to detr-edge " + ", ".join(f"{abs(v - first['detr-edge']):.1e} ({k})"
                                                    for k, v in first.items() if k != "detr-edge"))
    kind = "trainable BN, all layers" if args.scratch else "frozen BN, layer2-4 train (official)"
    median = time_steps(runs, args, images, mask, targets, kind)
    if "compiled" in median:
        print(f"  torch.compile: {median['detr-edge'] / median['compiled']:.3f}x the eager step")
    if "before" in median:
        print(f"  issue 24's changes (BatchNorm folded, layer4's memory order, clipping in AdamW): "
              f"{median['before'] / median['detr-edge']:.3f}x the step before them")
    if args.official:
        print(f"  detr-edge step is {median['official'] / median['detr-edge']:.2f}x the official speed")
    # the update alone, side by side: ours (clipping in the fused AdamW) against torch's
    # CPU defaults (a Python loop over the parameters), which the official code gets
    params = [p for p in trainer.parameters() if p.grad is not None]
    default = torch.optim.AdamW([{"params": g["params"], "lr": g["lr"]} for g in optimizer.param_groups],
                                weight_decay=1e-4, foreach=False)
    update = {"ours": [], "default": []}
    for _ in range(30):
        for name, opt in (("ours", optimizer), ("default", default)):
            start = time.perf_counter()
            if name == "ours":
                clip_gradients(trainer, optimizer, 0.1)
            else:
                torch.nn.utils.clip_grad_norm_(params, 0.1, foreach=False)
            opt.step()
            update[name].append(time.perf_counter() - start)
    ours_ms, default_ms = (statistics.median(update[k]) * 1000 for k in ("ours", "default"))
    print(f"  update (clipping + AdamW step): {ours_ms:.1f} ms fused, {default_ms:.1f} ms with torch's CPU defaults")


if __name__ == "__main__":
    main()
