"""The training step without host synchronisations but the matcher's one: its batched
parts against the per-image code they replaced (kept here, as it was, as the reference):
the same matches, the same losses to 1e-6; and, on the CPU, no operation that would make
a CUDA step wait for the device outside the matcher (tests/gpu/test_train_step.py checks
the same on a GPU with torch.cuda.set_sync_debug_mode)."""
from collections import Counter

import pytest
import torch
from scipy.optimize import linear_sum_assignment
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.ops import box_convert, generalized_box_iou

from detr_edge.train.config import DETRConfig
from detr_edge.train.criterion import SetCriterion
from detr_edge.train.detr import DETR
from detr_edge.train.engine import LossLog, TrainingModel, TrainOptions, WeightAverage, optimizer_for, train_step
from detr_edge.train.matcher import HungarianMatcher


def per_image_matches(matcher, logits, boxes, targets):
    """The matcher as it was: its cost moved to the host, the indices left there."""
    layers, batch, queries = logits.shape[:3]
    sizes = [len(t["labels"]) for t in targets]
    tgt_labels, tgt_boxes = torch.cat([t["labels"] for t in targets]), torch.cat([t["boxes"] for t in targets])
    pred, prob = boxes.flatten(0, 2), logits.flatten(0, 2).softmax(-1)
    cost = (matcher.cost_bbox * torch.cdist(pred, tgt_boxes, p=1) - matcher.cost_class * prob[:, tgt_labels]
            - matcher.cost_giou * generalized_box_iou(box_convert(pred, "cxcywh", "xyxy"),
                                                      box_convert(tgt_boxes, "cxcywh", "xyxy")))
    cost = cost.view(layers, batch, queries, -1).float().cpu()
    return [[tuple(torch.as_tensor(i, dtype=torch.int64) for i in linear_sum_assignment(block[b].numpy()))
             for b, block in enumerate(layer_cost.split(sizes, -1))] for layer_cost in cost]


def per_image_cells(centres, valid, targets):
    """The dense heads' assignment as it was: image by image, each image's cells listed."""
    indices = []
    for b, t in enumerate(targets):
        if not len(t["labels"]):
            empty = torch.empty(0, dtype=torch.int64)
            indices.append((empty, empty))
            continue
        x1, y1, x2, y2 = box_convert(t["boxes"], "cxcywh", "xyxy").unbind(-1)
        cx, cy = centres[b, :, :1], centres[b, :, 1:]
        inside = (cx > x1) & (cx < x2) & (cy > y1) & (cy < y2)
        nearest = torch.cdist(t["boxes"][:, :2], centres[b]).masked_fill(~valid[b], float("inf")).argmin(1)
        inside[nearest, torch.arange(len(nearest))] = True
        inside &= valid[b, :, None]
        area = (t["boxes"][:, 2] * t["boxes"][:, 3]).expand_as(inside).masked_fill(~inside, float("inf"))
        cells = inside.any(1).nonzero()[:, 0]
        indices.append((cells, area[cells].argmin(1)))
    return indices


def batch(device="cpu", seed=0):
    """A DN + groups + dense-heads trainer as the demo's, on a padded batch whose images hold 0 to 3 objects."""
    torch.manual_seed(seed)
    config = DETRConfig(backbone="resnet18", frozen_bn=False, hidden_dim=32, nheads=4, enc_layers=1, dec_layers=3,
                        dim_feedforward=32, num_queries=6, num_classes=5, dropout=0.0)
    trainer = TrainingModel(DETR(config), groups=2, encoder_head=True, backbone_head=("layer3",), denoise=20).to(device)
    images = torch.randn(4, 3, 96, 96, device=device)
    mask = torch.zeros(4, 96, 96, dtype=torch.bool, device=device)
    mask[1, 64:], mask[2, :, 40:] = True, True  # letterboxed frames
    targets = [{"labels": torch.randint(1, 5, (n,), device=device),
                "boxes": torch.cat([torch.rand(n, 2) * 0.6 + 0.2, torch.rand(n, 2) * 0.3 + 0.05], 1).to(device)}
               for n in (3, 1, 0, 2)]
    return trainer, images, mask, targets


def test_matches_are_those_of_the_per_image_matcher():
    trainer, images, mask, targets = batch()
    with torch.no_grad():
        out = trainer(images, mask, targets)
    logits = torch.stack([out["pred_logits"][:, :12]] + [a["pred_logits"][:, :12] for a in out["aux_outputs"]])
    boxes = torch.stack([out["pred_boxes"][:, :12]] + [a["pred_boxes"][:, :12] for a in out["aux_outputs"]])
    matcher = HungarianMatcher(cost_class=2)
    batched, reference = matcher(logits, boxes, targets), per_image_matches(matcher, logits, boxes, targets)
    assert len(batched) == 3 and all(len(layer) == 4 for layer in batched)
    for layer, ref_layer in zip(batched, reference):
        for (src, tgt), (ref_src, ref_tgt) in zip(layer, ref_layer):
            assert torch.equal(src, ref_src) and torch.equal(tgt, ref_tgt)


def test_losses_are_those_of_the_per_image_step():
    """Every logged term: the dense heads' batched masks against the per-image cell lists
    through the loss's index path (`_layer_losses`), the normaliser as a tensor against `.item()`."""
    trainer, images, mask, targets = batch()
    criterion = SetCriterion(5, HungarianMatcher(cost_class=2), loss_ce=2, groups=2, dense_weight=4)
    out = trainer(images, mask, targets)
    losses = criterion(out, targets)
    dense = out.pop("dense_outputs")
    reference = criterion(out, targets)  # without the dense heads: their terms come next, as they were
    total = reference["loss"]
    for name, head in dense.items():
        cells = per_image_cells(head["centres"], head["valid"], targets)
        count = float(criterion._normaliser(sum(len(c) for c, _ in cells), "cpu").item())
        parts = criterion._layer_losses(head["pred_logits"], head["pred_boxes"], targets, cells, count)
        for term, weight in criterion.weights.items():
            reference[f"{term}_{name}"] = parts[term]
            total = total + 4 * weight * parts[term]
    reference["loss"] = total
    assert set(losses) == set(reference) and {"loss_giou_dn_1", "loss_bbox_layer3"} <= set(losses)
    for key, value in reference.items():
        torch.testing.assert_close(losses[key], value, rtol=1e-6, atol=1e-6, msg=key)


# operators that read a value back to the host (a scalar, or a result whose shape depends on
# the data): on CUDA each waits for the device
HOST_READS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive",
              "repeat_interleave", "is_nonzero", "equal", "allclose"}


class HostReads(TorchDispatchMode):
    """Counts the HOST_READS that run while it is on, except inside the matcher (whose cost
    transfer is the one intended synchronisation)."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.counted, self.matching = Counter(), False
        original = HungarianMatcher.forward

        def matching(matcher, *args):
            self.matching = True
            try:
                return original(matcher, *args)
            finally:
                self.matching = False
        monkeypatch.setattr(HungarianMatcher, "forward", matching)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.matching and func.overloadpacket.__name__ in HOST_READS:
            self.counted[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def step():
    """The loop's step (train/engine.py): train_step (forward, set loss, backward, clipping,
    fused AdamW, through a GradScaler as the loop's, disabled on the CPU), the weight
    average, the loss log; a callable running it once -> (losses, targets)."""
    trainer, images, mask, targets = batch()
    criterion = SetCriterion(5, HungarianMatcher(cost_class=2), loss_ce=2, groups=2, dense_weight=4)
    optimizer, scaler = optimizer_for(trainer, TrainOptions(data="")), torch.amp.GradScaler("cpu", enabled=False)
    average, logged = WeightAverage(trainer.model, 0.95), LossLog()

    def run():
        losses = train_step(trainer, trainer, criterion, optimizer, scaler, 0.1, images, mask, targets)
        average.update(trainer.model)
        logged.add({"step": 1}, losses)
        return losses, targets
    return run


def test_a_step_reads_nothing_back_but_the_matchers_cost(step, monkeypatch):
    with HostReads(monkeypatch) as reads:
        for _ in range(2):
            step()
    assert not reads.counted, dict(reads.counted)


def test_the_host_read_counter_sees_what_the_step_no_longer_does(step, monkeypatch):
    """The official code's normaliser (`.item()`) and the per-image cell lists (`nonzero`)."""
    with HostReads(monkeypatch) as reads:
        losses, targets = step()
        losses["loss"].item()
        # the dense heads' per-image code, on the centres of a 4 x 4 grid
        centres = torch.stack(torch.meshgrid(*(torch.arange(4) / 4 + 0.125,) * 2, indexing="xy"), -1).flatten(0, 1)
        per_image_cells(centres.expand(len(targets), -1, -1), torch.ones(len(targets), 16, dtype=torch.bool), targets)
    assert reads.counted["_local_scalar_dense"] >= 1 and reads.counted["nonzero"] >= 3, dict(reads.counted)
