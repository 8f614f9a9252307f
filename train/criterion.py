"""The set loss: cross-entropy over K+1 classes (the no-object class down-weighted by
eos_coef), L1 and GIoU on matched pairs normalised by the number of target boxes
(averaged over processes under DDP), for the last decoder layer and, as auxiliary
losses with their own matching, every intermediate one. With the training-only dense
heads (`dense_outputs`), the same three terms on each one's one-to-many cell assignment;
with denoising queries (`denoising`, the last queries), the same three terms on their
known targets, every decoder layer (the negatives and padding learn "no object")."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou_loss

from .data import pad_targets
from .dense_head import assign_cells
from .matcher import HungarianMatcher, upload


class SetCriterion(nn.Module):
    def __init__(self, num_classes: int, matcher: HungarianMatcher | None = None, eos_coef: float = 0.1,
                 loss_ce: float = 1.0, loss_bbox: float = 5.0, loss_giou: float = 2.0, aux_loss: bool = True,
                 groups: int = 1, dense_weight: float = 1.0):
        super().__init__()
        self.dense_weight = dense_weight  # scales the dense heads' terms (their own weights as above)
        self.groups = groups  # Group DETR: each group of queries matched one-to-one on its own
        self.num_classes = num_classes
        self.matcher = matcher or HungarianMatcher()
        self.weights = {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": loss_giou}
        self.aux_loss = aux_loss
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)

    @staticmethod
    def _normaliser(count, device) -> torch.Tensor:
        """The number of target boxes (an int, or a tensor on `device`), averaged over processes,
        at least 1: a tensor, so that no step waits for the device to say it (the official
        code's `.item()`)."""
        num = count.float() if torch.is_tensor(count) else torch.full((), float(count), device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(num)
            num = num / dist.get_world_size()
        return num.clamp(min=1)

    def _layer_losses(self, logits, boxes, targets, indices, num_boxes) -> dict:
        batch_idx = torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(indices)])
        src_idx = torch.cat([src for src, _ in indices])
        matched_labels = torch.cat([t["labels"][tgt] for t, (_, tgt) in zip(targets, indices)])
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        target_classes[batch_idx, src_idx] = matched_labels
        loss_ce = F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight)
        src_boxes = boxes[batch_idx, src_idx]
        tgt_boxes = torch.cat([t["boxes"][tgt] for t, (_, tgt) in zip(targets, indices)])
        loss_bbox = F.l1_loss(src_boxes, tgt_boxes, reduction="sum") / num_boxes
        loss_giou = generalized_box_iou_loss(box_convert(src_boxes, "cxcywh", "xyxy"),
                                             box_convert(tgt_boxes, "cxcywh", "xyxy"), reduction="sum") / num_boxes
        return {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": loss_giou,
                "_matched_logits": logits[batch_idx, src_idx], "_matched_labels": matched_labels}

    def _dense_losses(self, dense: dict, labels, boxes, present) -> dict:
        """The three terms on a dense head's one-to-many assignment, as masks over its cells:
        what `_layer_losses` computes on index lists, without the host synchronisations that
        listing each image's cells would take."""
        assigned, positive = assign_cells(dense["centres"], dense["valid"], boxes, present)
        classes = torch.where(positive, labels.gather(1, assigned), self.num_classes)
        loss_ce = F.cross_entropy(dense["pred_logits"].transpose(1, 2), classes, self.empty_weight)
        num = self._normaliser(positive.sum(), positive.device)
        target = boxes.gather(1, assigned[..., None].expand(-1, -1, 4))
        l1 = (dense["pred_boxes"] - target).abs().sum(-1)
        giou = generalized_box_iou_loss(box_convert(dense["pred_boxes"], "cxcywh", "xyxy"),
                                        box_convert(target, "cxcywh", "xyxy"))
        return {"loss_ce": loss_ce, "loss_bbox": torch.where(positive, l1, 0).sum() / num,
                "loss_giou": torch.where(positive, giou, 0).sum() / num}

    @torch.no_grad()
    def _logged(self, logits, matched_logits, matched_labels, targets) -> dict:
        """class_error (% of matched predictions with the wrong class) and cardinality_error
        (|number of non-no-object predictions - number of targets|, mean over images)."""
        if matched_labels.numel():
            correct = (matched_logits.argmax(-1) == matched_labels).float().mean() * 100
        else:
            correct = torch.tensor(100.0, device=logits.device)
        predicted = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1).float()
        lengths = upload(torch.tensor([float(len(t["labels"])) for t in targets]), logits.device)
        return {"class_error": 100 - correct, "cardinality_error": F.l1_loss(predicted, lengths)}

    def forward(self, outputs: dict, targets: list[dict]) -> dict:
        """-> {'loss': weighted total, 'loss_ce', 'loss_bbox', 'loss_giou', 'class_error',
        'cardinality_error', 'loss_ce_0', ... for each auxiliary layer, 'loss_ce_dn', 'loss_ce_dn_0',
        ... for the denoising queries, and 'loss_ce_enc', 'loss_ce_layer3', ... for each dense head}."""
        layers = [outputs] + (outputs["aux_outputs"] if self.aux_loss else [])
        denoising = outputs.get("denoising")
        matching = slice(None, -len(denoising.pos) if denoising is not None else None)
        # [layers * groups, B, N, ...]: every (layer, group) is matched in one matcher call
        logits = torch.cat([o["pred_logits"][:, matching].unflatten(1, (self.groups, -1)).transpose(0, 1)
                            for o in layers])
        boxes = torch.cat([o["pred_boxes"][:, matching].unflatten(1, (self.groups, -1)).transpose(0, 1)
                           for o in layers])
        indices = self.matcher(logits, boxes, targets)
        num_boxes = self._normaliser(sum(len(t["labels"]) for t in targets), logits.device)
        losses, total = {}, 0.0
        for i, (layer_logits, layer_boxes, layer_indices) in enumerate(zip(logits, boxes, indices)):
            layer = i // self.groups
            parts = self._layer_losses(layer_logits, layer_boxes, targets, layer_indices, num_boxes)
            suffix = "" if layer == 0 else f"_{layer - 1}"  # aux layers numbered like the official code
            if i == 0:
                losses.update(self._logged(layer_logits, parts["_matched_logits"], parts["_matched_labels"], targets))
            for name, weight in self.weights.items():
                losses[name + suffix] = losses.get(name + suffix, 0.0) + parts[name]  # summed over groups
                total = total + weight * parts[name]
        if denoising is not None:
            known = slice(matching.stop, None)
            for layer, o in enumerate(layers):
                parts = self._layer_losses(o["pred_logits"][:, known], o["pred_boxes"][:, known], targets,
                                           denoising.indices, num_boxes * denoising.groups)
                suffix = "_dn" if layer == 0 else f"_dn_{layer - 1}"
                for name, weight in self.weights.items():
                    losses[name + suffix] = parts[name]
                    total = total + weight * parts[name]
        padded = pad_targets(targets) if "dense_outputs" in outputs else None
        for name, dense in outputs.get("dense_outputs", {}).items():
            parts = self._dense_losses(dense, *padded)
            for term, weight in self.weights.items():
                losses[f"{term}_{name}"] = parts[term]
                total = total + self.dense_weight * weight * parts[term]
        losses["loss"] = total
        return losses
