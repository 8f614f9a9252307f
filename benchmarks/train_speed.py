"""Training throughput (images/s) of one full step (forward, matching, set loss with aux
losses, backward, clipping, AdamW) on random data, at the config the official code was
measured at on this machine (../shared/reference/measured-here.md: 45.9 images/s):
ResNet-18, d=128, 3+3 layers, 8 heads, ffn 512, 20 queries, 3 classes, 128x128 images
with 3 boxes each, batch 16, 2 threads. The official code's backbone has frozen BatchNorm
and trains layer2..4 only; `--scratch` measures trainable BatchNorm and every layer
training instead (what training from scratch needs).

    .venv/bin/python benchmarks/train_speed.py [--scratch] [--steps 30] [--batch 16] [--size 128]
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train.config import DETRConfig  # noqa: E402
from train.criterion import SetCriterion  # noqa: E402
from train.detr import DETR  # noqa: E402
from train.engine import GroupDETR, TrainOptions, clip_gradients, optimizer_for  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scratch", action="store_true", help="trainable BatchNorm, all layers train")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = DETRConfig(backbone="resnet18", frozen_bn=not args.scratch, hidden_dim=128, nheads=8, enc_layers=3,
                        dec_layers=3, dim_feedforward=512, dropout=0.0, num_queries=20, num_classes=3)
    trainer = GroupDETR(DETR(config).train(), groups=1)
    model = trainer.model
    criterion = SetCriterion(3)
    optimizer = optimizer_for(trainer, TrainOptions(data=""))
    images = torch.randn(args.batch, 3, args.size, args.size)
    mask = torch.zeros(args.batch, args.size, args.size, dtype=torch.bool)
    targets = [{"labels": torch.randint(0, 3, (3,)), "boxes": torch.rand(3, 4) * 0.5 + 0.25} for _ in range(args.batch)]
    times = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        losses = criterion(model(images, mask), targets)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        clip_gradients(trainer, 0.1)
        optimizer.step()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    times.sort()
    median = times[len(times) // 2]
    kind = "trainable BN, all layers" if args.scratch else "frozen BN, layer2-4 train (official)"
    print(f"detr-edge training step ({kind}): median {median * 1000:.0f} ms/step, {args.batch / median:.1f} images/s "
          f"(batch {args.batch}, {args.size}x{args.size}, {args.threads} threads, torch {torch.__version__})")
    # the update alone, side by side: ours (fused AdamW, foreach clipping) against torch's
    # CPU defaults (a Python loop over the parameters), which the official code gets
    params = [p for p in trainer.parameters() if p.grad is not None]
    default = torch.optim.AdamW([{"params": g["params"], "lr": g["lr"]} for g in optimizer.param_groups],
                                weight_decay=1e-4, foreach=False)
    update = {"ours": [], "default": []}
    for _ in range(30):
        for name, opt in (("ours", optimizer), ("default", default)):
            start = time.perf_counter()
            if name == "ours":
                clip_gradients(trainer, 0.1)
            else:
                torch.nn.utils.clip_grad_norm_(params, 0.1, foreach=False)
            opt.step()
            update[name].append(time.perf_counter() - start)
    ours, default_ms = (sorted(update[k])[15] * 1000 for k in ("ours", "default"))
    print(f"  update (clipping + AdamW step): {ours:.1f} ms fused, {default_ms:.1f} ms with torch's CPU defaults")


if __name__ == "__main__":
    main()
