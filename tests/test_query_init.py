"""Anchored queries (train/query_init.py): at initialisation each query's cross-attention
reads the memory around its anchor, the denoising queries' positions encode their box
centres as the memory's own position encoding does, and a model from scratch is the
only one they start."""
from dataclasses import replace

import pytest
import torch

from detr_edge.cli import main
from detr_edge.train.config import preset
from detr_edge.train.denoising import Denoising
from detr_edge.train.detr import DETR
from detr_edge.train.position_encoding import PositionEmbeddingSine, sine_encoding
from detr_edge.train.query_init import SCALE, anchor_model, anchor_training_parts

CONFIG = replace(preset("detr_r18_tiny")[0], num_classes=4)  # the demo's model: d 128, 8 heads of 16
CELLS = 4  # a 128 x 128 input's memory is 4 x 4


def first_cross_attention(anchors: bool, seed: int, config=CONFIG):
    """-> the first decoder layer's cross-attention of the model's queries on a random
    image, averaged over heads [N, 16], and each query's anchor (x, y) [N, 2]."""
    torch.manual_seed(seed)
    model = DETR(config).eval()
    state = torch.get_rng_state()
    points = torch.rand(config.num_queries, 2)  # the points anchor_model draws next
    torch.set_rng_state(state)
    if anchors:
        anchor_model(model)
    seen = {}
    model.transformer.decoder.layers[0].multihead_attn.register_forward_hook(
        lambda _module, _inputs, output: seen.__setitem__("weights", output[1]))
    with torch.no_grad():
        model(torch.randn(1, 3, 128, 128), torch.zeros(1, 128, 128, dtype=torch.bool))
    return seen["weights"][0], points


@pytest.mark.parametrize("seed, config", [(0, CONFIG), (1, CONFIG), (2, CONFIG),
                                          (0, replace(preset("detr_r18")[0], num_classes=4))])  # 8 heads of 32
def test_each_query_starts_reading_the_memory_around_its_anchor(seed, config):
    # a memory cell (row r, column c) is at ((c + 1) / w, (r + 1) / h) in the position encoding's terms
    cells = torch.stack(torch.meshgrid(*[torch.arange(1, CELLS + 1) / CELLS] * 2, indexing="xy"), -1).flatten(0, 1)
    weights, points = first_cross_attention(anchors=True, seed=seed, config=config)
    nearest = torch.cdist(points, cells).argmin(1)
    on_anchor = weights.gather(1, nearest[:, None]).mean()
    assert on_anchor > 4 / CELLS**2  # the demo's model: 0.33-0.37, detr_r18 0.39; a uniform look gives 1/16
    official, points = first_cross_attention(anchors=False, seed=seed, config=config)
    assert official.gather(1, torch.cdist(points, cells).argmin(1)[:, None]).mean() < 1.5 / CELLS**2  # 0.062-0.065


def test_denoising_positions_encode_box_centres_as_the_memory_encodes_cells():
    d = CONFIG.hidden_dim
    denoising = Denoising(d, CONFIG.num_classes)
    anchor_training_parts(None, denoising.box_embed, CONFIG.nheads)
    memory_pos = PositionEmbeddingSine(d // 2)(torch.zeros(1, CELLS, CELLS, dtype=torch.bool))[0]  # [d, h, w]
    rows, cols = torch.meshgrid(torch.arange(CELLS), torch.arange(CELLS), indexing="ij")
    centres = torch.stack([(cols + 1) / CELLS, (rows + 1) / CELLS], -1).flatten(0, 1)  # (cx, cy) of each cell
    boxes = torch.cat([centres, torch.rand(len(centres), 2) * 0.5 + 0.1], -1)  # any size
    with torch.no_grad():
        pos = denoising.box_embed(sine_encoding(boxes, d // 2))
    per_head = d // CONFIG.nheads  # the channels of each coordinate the cross-attention compares
    compared = [*range(per_head), *range(d // 2, d // 2 + per_head)]
    expected = SCALE * memory_pos.flatten(1).T
    assert expected[:, compared].abs().amax() > SCALE / 2  # what is compared is not near zero
    torch.testing.assert_close(pos[:, compared], expected[:, compared], atol=1e-5, rtol=1e-5)


def test_anchors_start_a_model_from_scratch_only(tmp_path, capsys):
    weights = tmp_path / "w.pth"
    assert main(["init", "detr_r18_tiny", str(weights), "--num-classes", "4"]) == 0
    code = main(["train", "--data", str(tmp_path), "--weights", str(weights), "--query-init", "anchors"])
    assert code != 0
    assert "--query-init anchors starts a model from scratch" in capsys.readouterr().err
