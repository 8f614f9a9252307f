"""The model's structure against the official code's facts (../shared/reference/detr-official.md)."""
import pytest
import torch

from detr_edge.train.config import PRESETS, DETRConfig, preset
from detr_edge.train.detr import DETR
from detr_edge.train.position_encoding import PositionEmbeddingSine

TINY = DETRConfig(backbone="resnet18", hidden_dim=64, nheads=4, enc_layers=2, dec_layers=3,
                  dim_feedforward=128, num_queries=7, num_classes=5, dropout=0.0)

# Names and shapes of the official state dict (facebookresearch/detr, R50, 91 classes).
OFFICIAL_R50 = {
    "backbone.0.body.conv1.weight": (64, 3, 7, 7),
    "backbone.0.body.bn1.running_var": (64,),
    "backbone.0.body.layer1.0.downsample.0.weight": (256, 64, 1, 1),
    "backbone.0.body.layer1.0.downsample.1.weight": (256,),
    "backbone.0.body.layer4.2.conv3.weight": (2048, 512, 1, 1),
    "backbone.0.body.layer4.2.bn3.running_mean": (2048,),
    "input_proj.weight": (256, 2048, 1, 1),
    "input_proj.bias": (256,),
    "query_embed.weight": (100, 256),
    "class_embed.weight": (92, 256),
    "class_embed.bias": (92,),
    "bbox_embed.layers.0.weight": (256, 256),
    "bbox_embed.layers.2.weight": (4, 256),
    "transformer.encoder.layers.0.self_attn.in_proj_weight": (768, 256),
    "transformer.encoder.layers.0.self_attn.in_proj_bias": (768,),
    "transformer.encoder.layers.5.self_attn.out_proj.weight": (256, 256),
    "transformer.encoder.layers.0.linear1.weight": (2048, 256),
    "transformer.encoder.layers.0.linear2.weight": (256, 2048),
    "transformer.encoder.layers.0.norm2.bias": (256,),
    "transformer.decoder.layers.5.multihead_attn.in_proj_weight": (768, 256),
    "transformer.decoder.layers.0.norm3.weight": (256,),
    "transformer.decoder.norm.weight": (256,),
}


@pytest.mark.parametrize("name,params,entries", [("detr_r50", 41_524_768, 458), ("detr_r101", 60_464_672, 713)])
def test_official_totals(name, params, entries):
    model = DETR(preset(name)[0])
    state = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == params
    assert len(state) == entries
    assert not any(k.endswith("num_batches_tracked") for k in state)
    assert "transformer.encoder.norm.weight" not in state  # post-norm: no encoder norm


def test_official_key_names_and_shapes():
    state = DETR(preset("detr_r50")[0]).state_dict()
    for key, shape in OFFICIAL_R50.items():
        assert tuple(state[key].shape) == shape, key
    assert not [k for k in state if k.startswith("backbone.0.body.fc") or k.startswith("backbone.1")]


def test_state_dict_reloads_strict_into_fresh_model():
    torch.manual_seed(0)
    a, b = DETR(TINY).eval(), DETR(TINY).eval()
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        assert torch.equal(a(x)["pred_boxes"], b(x)["pred_boxes"])


def test_outputs_and_aux_outputs():
    model = DETR(TINY).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 96, 128))
    assert out["pred_logits"].shape == (2, 7, 6) and out["pred_boxes"].shape == (2, 7, 4)
    assert len(out["aux_outputs"]) == TINY.dec_layers - 1
    assert all(a["pred_logits"].shape == (2, 7, 6) for a in out["aux_outputs"])
    assert 0 <= out["pred_boxes"].min() and out["pred_boxes"].max() <= 1


def test_pre_norm_has_encoder_norm():
    state = DETR(DETRConfig(**{**TINY.to_dict(), "pre_norm": True})).state_dict()
    assert "transformer.encoder.norm.weight" in state


def test_dc5_halves_the_stride():
    config = DETRConfig(backbone="resnet50", dilation=True, hidden_dim=64, nheads=4, enc_layers=1, dec_layers=1,
                        dim_feedforward=64, num_queries=3, num_classes=2)
    features, mask, pos = DETR(config).backbone(torch.randn(1, 3, 128, 192), torch.zeros(1, 128, 192, dtype=bool))
    assert features.shape[-2:] == (8, 12) and mask.shape[-2:] == (8, 12) and pos.shape == (1, 64, 8, 12)


def test_position_encoding_of_padded_image_equals_unpadded_on_valid_region():
    """Coordinates come from the non-padded pixels: padding does not change the valid region's encoding."""
    embed = PositionEmbeddingSine(32)
    mask = torch.ones(1, 10, 14, dtype=torch.bool)
    mask[:, :6, :9] = False
    padded = embed(mask)
    plain = embed(torch.zeros(1, 6, 9, dtype=torch.bool))
    assert torch.allclose(padded[:, :, :6, :9], plain, atol=1e-6)
    assert not torch.allclose(embed(torch.zeros(1, 10, 14, dtype=torch.bool))[:, :, :6, :9], plain)
    # y-half then x-half: channel 0 is sin(2 pi (row + 1) / rows), channel 32 (first of the x-half) the same over columns
    rows = torch.arange(1, 7, dtype=torch.float32)
    assert torch.allclose(plain[0, 0], torch.sin(2 * torch.pi * rows / 6)[:, None].expand(6, 9), atol=1e-5)
    cols = torch.arange(1, 10, dtype=torch.float32)
    assert torch.allclose(plain[0, 32], torch.sin(2 * torch.pi * cols / 9)[None, :].expand(6, 9), atol=1e-5)


def test_presets_and_config_validation():
    assert {"detr_r50", "detr_r50_dc5", "detr_r101", "detr_r101_dc5", "detr_r18"} <= set(PRESETS)
    assert preset("detr_r50_dc5")[0].dilation and preset("detr_r101")[0].backbone == "resnet101"
    from detr_edge.runtime.errors import UserError
    with pytest.raises(UserError, match="Bottleneck"):
        DETRConfig(backbone="resnet18", dilation=True)
    with pytest.raises(UserError, match="unknown preset"):
        preset("yolo")
    with pytest.raises(UserError, match="unknown model config keys"):
        DETRConfig.from_dict({"colour": 3})


def test_training_folds_frozen_batchnorm_into_the_convolutions_with_the_same_function_and_keys():
    """In training the convolutions apply their frozen BatchNorm (one pass fewer); in eval
    mode, which export traces, the two stay apart: the same outputs either way, the same keys."""
    from torchvision.ops import FrozenBatchNorm2d
    from detr_edge.train.backbone import FoldingConv2d
    torch.manual_seed(0)
    model = DETR(TINY)
    for module in model.modules():  # statistics away from the identity, so the fold matters
        if isinstance(module, FrozenBatchNorm2d):
            for name in ("weight", "bias", "running_mean"):
                getattr(module, name).normal_()
            module.running_var.uniform_(0.5, 2.0)
    folded = [m for m in model.modules() if isinstance(m, FoldingConv2d)]
    assert len(folded) == 20  # ResNet-18: the stem, 16 block convolutions, 3 downsamples
    x = torch.randn(2, 3, 96, 128)
    # at this size the stem, layer1 and layer2's downsample scale their weights, the rest their outputs
    inputs = {}
    for conv in folded:
        conv.register_forward_pre_hook(lambda module, args: inputs.__setitem__(module, args[0]))
    with torch.no_grad():
        train, evaluated = model.train()(x), model.eval()(x)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(train[key], evaluated[key], rtol=1e-4, atol=1e-5)
    assert sum(conv.scales_weight(inputs[conv]) for conv in folded) == 6
    assert set(model.state_dict()) == set(DETR(TINY).state_dict())
