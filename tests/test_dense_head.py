"""The training-only dense heads (encoder and backbone levels): their one-to-many cell
assignment, their loss terms, and that they leave the model's outputs untouched."""
import torch

from detr_edge.train.criterion import SetCriterion
from detr_edge.train.data import pad_targets
from detr_edge.train.dense_head import DenseHead, assign_cells


def head_on_half_padded_grid():
    """A 4 x 4 feature map whose right half is padding: valid cell centres at x 0.25 / 0.75
    and y 0.125 .. 0.875 of the unpadded image."""
    torch.manual_seed(0)
    head = DenseHead(hidden_dim=16, num_classes=3)
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[:, :, 2:] = True
    return head, head(torch.randn(2, 16, 4, 4), mask)


def test_cell_centres_are_fractions_of_the_unpadded_image():
    _, out = head_on_half_padded_grid()
    centres = out["centres"][0].view(4, 4, 2)[:, :2]
    torch.testing.assert_close(centres[..., 0], torch.tensor([[0.25, 0.75]] * 4))
    torch.testing.assert_close(centres[..., 1], torch.tensor([[0.125] * 2, [0.375] * 2, [0.625] * 2, [0.875] * 2]))
    assert out["valid"][0].view(4, 4).tolist() == [[True, True, False, False]] * 4


def test_box_centres_are_predicted_relative_to_their_cell():
    head, _ = head_on_half_padded_grid()
    torch.nn.init.zeros_(head.bbox_embed.layers[-1].weight)
    torch.nn.init.zeros_(head.bbox_embed.layers[-1].bias)
    out = head(torch.randn(2, 16, 4, 4), torch.zeros(2, 4, 4, dtype=torch.bool))
    torch.testing.assert_close(out["pred_boxes"][..., :2], out["centres"], atol=1e-6, rtol=0)


def per_image(out, targets):
    """The batched assignment as per image (cell indices, target indices)."""
    _, boxes, present = pad_targets(targets)
    assigned, positive = assign_cells(out["centres"], out["valid"], boxes, present)
    return [(p.nonzero()[:, 0], a[p]) for a, p in zip(assigned, positive)]


def test_assignment_inside_boxes_nearest_cell_and_smallest_box():
    _, out = head_on_half_padded_grid()
    targets = [{"labels": torch.tensor([0, 1, 2]),
                "boxes": torch.tensor([[0.25, 0.5, 0.5, 1.0],      # A: the left column of cells
                                       [0.6, 0.3, 0.05, 0.05],     # B: holds no cell centre
                                       [0.5, 0.5, 1.0, 1.0]])},    # C: the whole image
               {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    (cells, tgt), (empty_cells, empty_tgt) = per_image(out, targets)
    # cell index = 4 * row + column; padded cells (columns 2, 3) never learn a box, even inside C;
    # B takes its nearest cell (row 1, column 1) from the larger C
    assert dict(zip(cells.tolist(), tgt.tolist())) == {0: 0, 4: 0, 8: 0, 12: 0, 1: 2, 5: 1, 9: 2, 13: 2}
    assert empty_cells.numel() == empty_tgt.numel() == 0


def test_criterion_adds_the_encoder_terms_with_the_set_loss_weights():
    from test_matcher_criterion import outputs_for
    out, targets = outputs_for(layers=2)
    _, enc = head_on_half_padded_grid()
    enc["pred_boxes"] = enc["pred_boxes"].detach().requires_grad_()
    criterion = SetCriterion(3)
    plain = criterion(out, targets)
    losses = criterion({**out, "dense_outputs": {"enc": enc}}, targets)
    weights = {"loss_ce": 1, "loss_bbox": 5, "loss_giou": 2}
    assert torch.isclose(losses["loss"], plain["loss"] + sum(w * losses[k + "_enc"] for k, w in weights.items()))
    cells = per_image(enc, targets)
    positives = sum(len(c) for c, _ in cells)
    expected = sum((enc["pred_boxes"][b, c] - targets[b]["boxes"][t]).abs().sum() for b, (c, t) in enumerate(cells))
    assert positives and torch.isclose(losses["loss_bbox_enc"], expected / positives)
    losses["loss_bbox_enc"].backward()
    touched = enc["pred_boxes"].grad.abs().sum(-1) > 0
    assert touched.sum() == positives and all(touched[b, c].all() for b, (c, _) in enumerate(cells))


def test_backbone_head_reads_layer3_and_leaves_the_model_untouched():
    from detr_edge.train.config import preset
    from detr_edge.train.detr import DETR
    from detr_edge.train.engine import TrainingModel
    torch.manual_seed(0)
    config = preset("detr_r18_tiny")[0]
    model = DETR(config).eval()
    images, mask = torch.randn(2, 3, 128, 128), torch.zeros(2, 128, 128, dtype=torch.bool)
    mask[1, :, 64:] = True  # the second image's right half is padding
    plain = model(images, mask)
    trainer = TrainingModel(model, encoder_head=True, backbone_head=("layer3",))
    out = trainer(images, mask)
    torch.testing.assert_close(out["pred_boxes"], plain["pred_boxes"])  # the hook only reads
    dense = out["dense_outputs"]
    assert set(dense) == {"enc", "layer3"} and dense["enc"]["valid"].shape == (2, 16)  # stride 32: 4 x 4
    layer3 = dense["layer3"]
    assert layer3["pred_logits"].shape == (2, 64, config.num_classes + 1)  # stride 16: 8 x 8 cells
    assert layer3["valid"][0].all() and layer3["valid"][1].view(8, 8).tolist() == [[True] * 4 + [False] * 4] * 8
    layer3["pred_boxes"].sum().backward()
    body = model.backbone[0].body
    assert body.layer3[0].conv1.weight.grad.abs().sum() > 0 and body.layer4[0].conv1.weight.grad is None
