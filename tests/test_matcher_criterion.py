"""Hungarian matching against brute force, and the set loss's properties."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_convert, generalized_box_iou

from detr_edge.train.criterion import SetCriterion
from detr_edge.train.matcher import HungarianMatcher


def brute_force(logits, boxes, target, w=(1.0, 5.0, 2.0)):
    """Minimum total cost over every injective assignment of targets to predictions."""
    prob = logits.softmax(-1)
    n, t = len(boxes), len(target["labels"])
    giou = generalized_box_iou(box_convert(boxes, "cxcywh", "xyxy"), box_convert(target["boxes"], "cxcywh", "xyxy"))
    cost = [[w[1] * (boxes[i] - target["boxes"][j]).abs().sum() - w[0] * prob[i, target["labels"][j]]
             - w[2] * giou[i, j] for j in range(t)] for i in range(n)]
    best = min(itertools.permutations(range(n), t), key=lambda p: sum(cost[p[j]][j] for j in range(t)))
    return best, sum(cost[best[j]][j] for j in range(t))


def match_one(logits, boxes, targets):
    return HungarianMatcher()(logits[None], boxes[None], targets)[0]


def test_dog_cat_example_equals_brute_force():
    # classes: 0 dog, 1 cat, 2 no-object. Three predictions, two targets (a dog, a cat).
    logits = torch.log(torch.tensor([[0.1, 0.8, 0.1],    # says cat, sits on the dog
                                     [0.7, 0.2, 0.1],    # says dog, sits on the cat
                                     [0.05, 0.05, 0.9]]))  # background
    boxes = torch.tensor([[0.25, 0.5, 0.3, 0.4], [0.75, 0.5, 0.3, 0.4], [0.5, 0.1, 0.1, 0.1]])
    target = {"labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.25, 0.5, 0.3, 0.4], [0.75, 0.5, 0.3, 0.4]])}
    ((src, tgt),) = match_one(logits[None], boxes[None], [target])
    best, _ = brute_force(logits, boxes, target)
    assert dict(zip(tgt.tolist(), src.tolist())) == dict(enumerate(best))
    assert dict(zip(tgt.tolist(), src.tolist())) == {0: 0, 1: 1}  # box costs (w 5 + 2) outweigh class (w 1)


@pytest.mark.parametrize("seed", range(20))
def test_random_batches_total_cost_equals_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    batch, queries, classes = 3, 5, 4
    logits = torch.randn(batch, queries, classes + 1, generator=g) * 2
    boxes = torch.rand(batch, queries, 4, generator=g) * 0.5 + 0.1
    targets = []
    for b in range(batch):
        t = int(torch.randint(0, 4, (1,), generator=g))
        targets.append({"labels": torch.randint(0, classes, (t,), generator=g),
                        "boxes": torch.rand(t, 4, generator=g) * 0.5 + 0.1})
    indices = match_one(logits, boxes, targets)
    for b, (src, tgt) in enumerate(indices):
        assert len(src) == len(targets[b]["labels"]) == len(set(src.tolist()))
        if len(src) == 0:
            continue
        _, best_cost = brute_force(logits[b], boxes[b], targets[b])
        prob = logits[b].softmax(-1)
        giou = generalized_box_iou(box_convert(boxes[b][src], "cxcywh", "xyxy"),
                                   box_convert(targets[b]["boxes"][tgt], "cxcywh", "xyxy")).diag()
        cost = (5 * (boxes[b][src] - targets[b]["boxes"][tgt]).abs().sum(-1)
                - prob[src, targets[b]["labels"][tgt]] - 2 * giou).sum()
        assert torch.isclose(cost, torch.as_tensor(best_cost), atol=1e-5)


def test_all_images_without_targets():
    indices = HungarianMatcher()(torch.randn(2, 2, 4, 3), torch.rand(2, 2, 4, 4),
                                 [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}] * 2)
    assert len(indices) == 2 and all(len(src) == 0 for layer in indices for src, _ in layer)


def outputs_for(layers=3, batch=2, queries=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    raw = [(torch.randn(batch, queries, classes + 1, generator=g).requires_grad_(),
            torch.rand(batch, queries, 4, generator=g).mul(0.5).add(0.2).requires_grad_()) for _ in range(layers)]
    out = {"pred_logits": raw[-1][0], "pred_boxes": raw[-1][1],
           "aux_outputs": [{"pred_logits": lg, "pred_boxes": bx} for lg, bx in raw[:-1]]}
    targets = [{"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.2]])},
               {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    return out, targets


def test_box_gradients_only_through_matched_pairs():
    out, targets = outputs_for()
    criterion = SetCriterion(3)
    losses = criterion(out, targets)
    (losses["loss_bbox"] + losses["loss_giou"]).backward()
    grad = out["pred_boxes"].grad
    (indices,) = criterion.matcher(out["pred_logits"][None], out["pred_boxes"][None], targets)
    matched = torch.zeros(2, 6, dtype=torch.bool)
    for b, (src, _) in enumerate(indices):
        matched[b, src] = True
    assert matched.sum() == 2
    assert (grad[~matched] == 0).all() and (grad[matched].abs().sum(-1) > 0).all()


def test_no_object_weight_and_normalisation():
    out, targets = outputs_for()
    criterion = SetCriterion(3, eos_coef=0.1)
    losses = criterion(out, targets)
    (indices,) = criterion.matcher(out["pred_logits"][None], out["pred_boxes"][None], targets)
    target_classes = torch.full((2, 6), 3)
    for b, (src, tgt) in enumerate(indices):
        target_classes[b, src] = targets[b]["labels"][tgt]
    logits = out["pred_logits"].detach()
    nll = F.cross_entropy(logits.reshape(-1, 4), target_classes.reshape(-1), reduction="none")
    weight = torch.where(target_classes.reshape(-1) == 3, 0.1, 1.0)
    assert torch.isclose(losses["loss_ce"], (nll * weight).sum() / weight.sum(), atol=1e-6)
    assert not torch.isclose(losses["loss_ce"], nll.mean(), atol=1e-4)  # the weight makes a difference
    src, tgt = indices[0]
    l1 = (out["pred_boxes"].detach()[0, src] - targets[0]["boxes"][tgt]).abs().sum() / 2  # 2 target boxes
    assert torch.isclose(losses["loss_bbox"], l1, atol=1e-6)


def test_aux_losses_one_term_per_decoder_layer():
    out, targets = outputs_for(layers=4)
    losses = SetCriterion(3)(out, targets)
    for name in ("loss_ce", "loss_bbox", "loss_giou"):
        assert sorted(k for k in losses if k.startswith(name + "_")) == [f"{name}_{i}" for i in range(3)]
    expected = sum(w * losses[k + s] for k, w in {"loss_ce": 1, "loss_bbox": 5, "loss_giou": 2}.items()
                   for s in ["", "_0", "_1", "_2"])
    assert torch.isclose(losses["loss"], expected)
    assert set(SetCriterion(3, aux_loss=False)(out, targets)) == {
        "loss", "loss_ce", "loss_bbox", "loss_giou", "class_error", "cardinality_error"}


def test_group_detr_groups_are_blind_and_matched_separately():
    from detr_edge.train.config import DETRConfig
    from detr_edge.train.detr import DETR, ExtraQueries
    from detr_edge.train.transformer import QueryBlocks
    torch.manual_seed(0)
    model = DETR(DETRConfig(backbone="resnet18", hidden_dim=32, nheads=4, enc_layers=1, dec_layers=2,
                            dim_feedforward=32, num_queries=6, num_classes=3, dropout=0.0)).eval()
    images = torch.randn(2, 3, 64, 64)
    extra = torch.randn(2 * 6, 32)
    with torch.no_grad():
        plain = model(images)
        grouped = model(images, extra=ExtraQueries(extra[:, None].expand(-1, 2, -1), torch.zeros(12, 2, 32),
                                                   QueryBlocks(6, groups=3)))
    assert grouped["pred_logits"].shape == (2, 18, 4)
    # the model's own queries do not see the extra groups: identical to plain DETR
    assert torch.allclose(grouped["pred_logits"][:, :6], plain["pred_logits"], atol=1e-5)
    assert torch.allclose(grouped["aux_outputs"][0]["pred_boxes"][:, :6], plain["aux_outputs"][0]["pred_boxes"], atol=1e-5)
    _, targets = outputs_for()
    losses = SetCriterion(3, groups=3)(grouped, targets)
    per_group = [SetCriterion(3)({"pred_logits": grouped["pred_logits"][:, g * 6:(g + 1) * 6],
                                  "pred_boxes": grouped["pred_boxes"][:, g * 6:(g + 1) * 6],
                                  "aux_outputs": [{k: v[:, g * 6:(g + 1) * 6] for k, v in a.items()}
                                                  for a in grouped["aux_outputs"]]}, targets) for g in range(3)]
    for key in ("loss", "loss_ce", "loss_bbox", "loss_giou_0"):
        assert torch.isclose(losses[key], sum(p[key] for p in per_group), atol=1e-5)
    assert torch.isclose(losses["class_error"], per_group[0]["class_error"])
