"""A CUDA training step waits for the device once: for the matcher's cost, which the
Hungarian algorithm needs on the host (scipy). Everything else (the losses' normaliser,
the dense heads' assignment, the denoising queries, the indices' way back) stays on the
device (tests/test_batched_step.py: the same values as the per-image code)."""
import torch

from detr_edge.train.criterion import SetCriterion
from detr_edge.train.matcher import HungarianMatcher

from test_batched_step import batch


def test_a_cuda_step_synchronises_once():
    """Forward, loss, backward, clipping and AdamW on CUDA under set_sync_debug_mode('error'):
    the matcher's cost transfer, allowed, is the only synchronisation."""
    from detr_edge.train.engine import TrainOptions, optimizer_for, train_step
    trainer, images, mask, targets = batch("cuda")
    criterion = SetCriterion(5, HungarianMatcher(cost_class=2), groups=2, dense_weight=4).cuda()
    optimizer, scaler = optimizer_for(trainer, TrainOptions(data="")), torch.amp.GradScaler("cuda", enabled=False)
    transfers = []
    original = HungarianMatcher.forward

    def counted(self, *args):
        torch.cuda.set_sync_debug_mode(0)
        transfers.append(1)
        try:
            return original(self, *args)
        finally:
            torch.cuda.set_sync_debug_mode("error")
    HungarianMatcher.forward = counted
    try:
        for _ in range(2):
            torch.cuda.set_sync_debug_mode("error")
            losses = train_step(trainer, trainer, criterion, optimizer, scaler, 0.1, images, mask, targets)
            torch.cuda.set_sync_debug_mode(0)
    finally:
        HungarianMatcher.forward = original
        torch.cuda.set_sync_debug_mode(0)
    assert len(transfers) == 2 and torch.isfinite(losses["loss"]).item()
