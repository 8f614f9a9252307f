"""Denoising queries (train/denoising.py): the attention mask keeps them and the matching
queries apart, they carry noised ground truth as DINO makes it, the loss supervises them
with their known targets, and a model trained with them exports the very same graph."""
import onnx
import pytest
import torch

from detr_edge.cli import main
from detr_edge.train.config import DETRConfig
from detr_edge.train.criterion import SetCriterion
from detr_edge.train.denoising import Denoising
from detr_edge.train.detr import DETR
from detr_edge.train.engine import TrainingModel
from detr_edge.train.transformer import QueryBlocks, blockwise_self_attention
from detr_edge.train.synth import synthesize

CONFIG = DETRConfig(backbone="resnet18", hidden_dim=32, nheads=4, enc_layers=1, dec_layers=2, dim_feedforward=32,
                    num_queries=3, num_classes=4, dropout=0.0)


def targets():
    return [{"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.4], [0.7, 0.6, 0.3, 0.2]])},
            {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.6, 0.6]])}]


def test_the_mask_keeps_matching_and_denoising_queries_apart():
    queries = Denoising(32, 4, queries=8)(targets())  # pad 2 (the fuller image): 2 groups of 2 positives, 2 negatives
    assert (queries.groups, queries.pad, queries.pos.shape) == (2, 2, (8, 2, 32))
    # 3 own queries, 1 more group of 3, 2 denoising groups of 4; True = blocked; rows attend to columns
    o, g, d = [1] * 3 + [0] * 11, [0] * 3 + [1] * 3 + [0] * 8, [1] * 3 + [0] * 3
    expected = ([o] * 3 + [g] * 3 + [d + [1] * 4 + [0] * 4] * 4 + [d + [0] * 4 + [1] * 4] * 4)
    assert torch.equal(QueryBlocks(3, 2, queries.groups, 2 * queries.pad).mask(),
                       ~torch.tensor(expected, dtype=torch.bool))


@pytest.mark.parametrize("blocks", [QueryBlocks(3), QueryBlocks(3, 4), QueryBlocks(5, 2, 3, 4),
                                    QueryBlocks(4, 1, 2, 6)])
def test_blockwise_attention_is_the_masked_attention(blocks):
    """The decoder attends block by block; nn.MultiheadAttention under the dense mask (the
    official way to say it) gives the same outputs and the same gradients."""
    torch.manual_seed(0)
    attn = torch.nn.MultiheadAttention(32, 4, dropout=0.0)
    length = blocks.own * blocks.groups + blocks.denoising_groups * blocks.denoising_size
    q, k, v = (torch.randn(length, 2, 32, requires_grad=True) for _ in range(3))
    ours = blockwise_self_attention(attn, q, k, v, blocks)
    reference = attn(q, k, v, attn_mask=blocks.mask())[0]
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=1e-5)
    weights = torch.randn_like(ours)
    grads = torch.autograd.grad((ours * weights).sum(), [q, k, v, attn.in_proj_weight])
    expected = torch.autograd.grad((reference * weights).sum(), [q, k, v, attn.in_proj_weight])
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_matching_queries_decode_as_without_denoising_and_denoising_groups_are_blind():
    torch.manual_seed(0)
    trainer = TrainingModel(DETR(CONFIG), groups=2, denoise=8).eval()
    images = torch.randn(2, 3, 64, 64)
    mask = torch.zeros(2, 64, 64, dtype=torch.bool)
    with torch.no_grad():
        plain = trainer.model(images, mask)
        queries = trainer.denoising(targets())
        extra = trainer._extra(2, queries)
        out = trainer.model(images, mask, extra)
        # the second denoising group's inputs replaced by noise
        noisy = extra._replace(pos=extra.pos.clone(), content=extra.content.clone())
        noisy.pos[-4:].normal_()
        noisy.content[-4:].normal_()
        other = trainer.model(images, mask, noisy)
    assert out["pred_logits"].shape == (2, 3 + 3 + 8, 5)
    for key in ("pred_logits", "pred_boxes"):
        assert torch.allclose(out[key][:, :3], plain[key], atol=1e-5)  # the model's own queries: plain DETR
        assert torch.allclose(out["aux_outputs"][0][key][:, :3], plain["aux_outputs"][0][key], atol=1e-5)
        assert torch.allclose(other[key][:, :-4], out[key][:, :-4], atol=1e-5)  # nobody sees the changed group
        assert not torch.allclose(other[key][:, -4:], out[key][:, -4:], atol=1e-3)


def test_positives_lie_within_half_a_box_and_negatives_beyond_it():
    torch.manual_seed(1)
    truth = [{"labels": torch.randint(0, 4, (3,)), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3]] * 3)}] * 4
    queries = Denoising(32, 4, queries=300, label_noise=0.5, box_noise=1.0)(truth)
    assert queries.groups == 50 and queries.boxes.shape == (300, 4, 4)
    boxes = queries.boxes.unflatten(0, (50, 2, 3))  # [groups, positive/negative, pad, B, 4]
    x1y1x2y2 = torch.cat([boxes[..., :2] - boxes[..., 2:] / 2, boxes[..., :2] + boxes[..., 2:] / 2], -1)
    shift = (x1y1x2y2 - torch.tensor([0.4, 0.35, 0.6, 0.65])).abs() / torch.tensor([0.1, 0.15, 0.1, 0.15])
    assert shift[:, 0].max() <= 1 + 1e-5 and shift[:, 0].mean() > 0.4  # positives: under one half-size
    assert shift[:, 1].min() >= 1 - 1e-5 and shift[:, 1].max() > 1.9  # negatives: one to two half-sizes
    labels = queries.labels.unflatten(0, (50, 2, 3))
    flipped = (labels != torch.stack([t["labels"] for t in truth], 1)).float().mean()
    assert 0.12 < flipped < 0.25  # replaced with probability 0.25, by any of 4 classes (1 in 4 the same)


def test_the_loss_supervises_denoising_queries_with_their_known_targets():
    torch.manual_seed(0)
    truth = targets()
    queries = Denoising(32, 4, queries=8)(truth)
    logits = torch.full((2, 3 + 8, 5), -10.0)
    logits[..., -1] = 10.0  # every query says "no object"
    boxes = torch.rand(2, 3 + 8, 4) * 0.5 + 0.25
    for b, (slots, index) in enumerate(queries.indices):  # the positives answer right
        logits[b, 3 + slots] = -10.0
        logits[b, 3 + slots, truth[b]["labels"][index]] = 10.0
        boxes[b, 3 + slots] = truth[b]["boxes"][index]
    out = {"pred_logits": logits, "pred_boxes": boxes, "aux_outputs": [], "denoising": queries}
    losses = SetCriterion(4, aux_loss=False)(out, truth)
    assert losses["loss_bbox_dn"] == 0 and losses["loss_giou_dn"].abs() < 1e-5 and losses["loss_ce_dn"] < 1e-6
    wrong = dict(out, pred_boxes=boxes.clone())
    wrong["pred_boxes"][0, 3 + queries.indices[0][0][0]] += 0.1  # one positive off by 0.1 on each coordinate
    assert torch.isclose(SetCriterion(4, aux_loss=False)(wrong, truth)["loss_bbox_dn"],
                         torch.tensor(0.4 / (3 * queries.groups)))  # L1 over the targets of every group


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    synthesize(root, train=16, val=4, size=(64, 64), video_frames=0, seed=1, max_objects=3)
    return root


def test_a_model_trained_with_denoising_exports_the_same_graph(shapes, tmp_path):
    runs = {}
    for name, extra in (("plain", []), ("denoised", ["--denoise", "100"])):
        out = tmp_path / name
        assert main(["train", "--data", str(shapes), "--out", str(out), "--preset", "detr_r18_tiny", "--imgsz", "64",
                     "--batch-size", "8", "--workers", "0", "--epochs", "1", "--eval-every", "0", "--groups", "2",
                     *extra]) == 0
        assert main(["export", str(out / "last.pth"), "--out", str(out / "model.onnx")]) == 0
        runs[name] = (torch.load(out / "last.pth", weights_only=True), onnx.load(str(out / "model.onnx")).graph)
    (plain, plain_graph), (denoised, graph) = runs["plain"], runs["denoised"]
    # the checkpoint's model: the same names and shapes (what the official code loads strictly)
    assert {k: v.shape for k, v in denoised["model"].items()} == {k: v.shape for k, v in plain["model"].items()}
    assert {k.split(".")[0] for k in denoised["training_parts"]} == {"group_queries", "denoising"}
    assert "loss_bbox_dn" in (tmp_path / "denoised" / "metrics.csv").read_text().splitlines()[0]
    # the same graph: nodes, their wiring, inputs, outputs and initializers (names, shapes), other values
    assert [(n.op_type, list(n.input), list(n.output)) for n in graph.node] == [
        (n.op_type, list(n.input), list(n.output)) for n in plain_graph.node]
    assert [(t.name, list(t.dims)) for t in graph.initializer] == [(t.name, list(t.dims)) for t in plain_graph.initializer]
    assert graph.input == plain_graph.input and graph.output == plain_graph.output
    assert any(onnx.numpy_helper.to_array(a).tobytes() != onnx.numpy_helper.to_array(b).tobytes()
               for a, b in zip(graph.initializer, plain_graph.initializer))
    DETR(DETRConfig.from_dict(denoised["config"]["model"])).load_state_dict(denoised["model"], strict=True)


def test_a_batch_without_objects_trains_the_denoising_module_on_padding():
    """One group of padding, all "no object": the same loss terms as any step (the CSV's
    columns stay put) and a gradient for every denoising parameter (DDP needs one)."""
    torch.manual_seed(0)
    trainer = TrainingModel(DETR(CONFIG), groups=2, denoise=8)
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}] * 2
    images, mask = torch.randn(2, 3, 64, 64), torch.zeros(2, 64, 64, dtype=torch.bool)
    out = trainer(images, mask, empty)
    assert (out["denoising"].groups, out["denoising"].pad) == (4, 1)
    losses = SetCriterion(4, groups=2)(out, empty)
    assert {"loss_ce_dn", "loss_bbox_dn", "loss_giou_dn_0"} <= set(losses) and torch.isfinite(losses["loss"])
    assert losses["loss_bbox_dn"] == 0 and losses["loss_ce_dn"] > 0
    losses["loss"].backward()
    assert all(p.grad is not None for p in trainer.denoising.parameters())
