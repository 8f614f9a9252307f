"""Parity with an implementation nobody here wrote: transformers' DetrForObjectDetection
(its own ResNet backbone, random init, no download), converted into our model."""
import cv2
import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DetrConfig, DetrForObjectDetection, ResNetConfig  # noqa: E402

from detr_edge.runtime.metadata import preprocess_spec  # noqa: E402
from detr_edge.runtime.preprocess import preprocess  # noqa: E402
from detr_edge.train import hf  # noqa: E402
from detr_edge.train.checkpoint import load_model, read_checkpoint  # noqa: E402
from detr_edge.train.detr import DETR  # noqa: E402

R50 = dict(backbone=ResNetConfig(out_features=["stage4"]), detr={})
SMALL = dict(backbone=ResNetConfig(layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512],
                                   out_features=["stage4"]),
             detr=dict(d_model=128, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                       decoder_attention_heads=4, encoder_ffn_dim=256, decoder_ffn_dim=256, num_queries=10,
                       num_labels=5))


def hf_model(spec, images, seed=0):
    torch.manual_seed(seed)
    config = DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=spec["backbone"],
                        **spec["detr"])
    model = DetrForObjectDetection(config).eval()
    # Non-trivial weights everywhere (HF's init makes every query predict ~the same box),
    # so no mis-mapped tensor can hide.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "backbone" in name:
                continue
            if "query_position" in name:
                param.normal_(0, 2.0)  # distinct queries that attend sharply, as trained ones do
            elif "encoder_attn.q_proj" in name or "encoder_attn.k_proj" in name:
                torch.nn.init.normal_(param, 0, 0.5 if param.dim() > 1 else 0.05)  # sharp cross-attention
            elif param.dim() > 1:
                torch.nn.init.xavier_uniform_(param, gain=1.0)
            elif "layer_norm" in name and name.endswith("weight"):
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0, 0.05)
        calibrate_frozen_batchnorm(model.model.backbone, images)
    return model


def calibrate_frozen_batchnorm(backbone, images):
    """Give every frozen BatchNorm the statistics of its real input (as a trained backbone
    has) plus a random affine part: a well-conditioned random backbone with distinct buffers."""
    def set_stats(module, inputs):
        x = inputs[0]
        module.running_mean.copy_(x.mean((0, 2, 3)))
        module.running_var.copy_(x.var((0, 2, 3)))
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_(0, 0.1)
    hooks = [m.register_forward_pre_hook(set_stats) for m in backbone.modules()
             if type(m).__name__.endswith("FrozenBatchNorm2d")]
    assert hooks
    backbone(images, torch.ones(images.shape[0], *images.shape[-2:], dtype=torch.long))
    for hook in hooks:
        hook.remove()


def our_model(hf_detr):
    state_dict = hf.convert_state_dict(hf_detr.state_dict())
    from detr_edge.train.checkpoint import infer_model_config
    options = hf.options_from_hf_config(hf_detr.config.to_dict())
    options.pop("classes")
    model = DETR(infer_model_config(state_dict, **options)).eval()
    model.load_state_dict(state_dict, strict=True)
    return model


@pytest.fixture(scope="module")
def frames():
    """Real photos of three aspect ratios (../shared/data); in a bare clone, generated
    scenes of the same three shapes, so parity is still checked there."""
    from conftest import COCO_TINY
    photos = sorted((COCO_TINY / "val2017").glob("*.jpg"))
    if photos:
        loaded = sorted((cv2.imread(str(p)) for p in photos), key=lambda f: f.shape[1] / f.shape[0])
        return [loaded[-1], loaded[0], loaded[len(loaded) // 2]]  # widest, tallest, middle
    from detr_edge.train.synth import scene
    rng = np.random.default_rng(0)
    return [scene(rng, h, w)[0] for h, w in ((360, 640), (640, 427), (480, 500))]


def padded_batch(frames, imgsz):
    """Frames of different aspect ratios letterboxed into one batch: each is padded differently."""
    batch = preprocess(frames, preprocess_spec(imgsz))
    assert batch.mask.any(axis=(1, 2)).all()  # every image really has padding
    return torch.from_numpy(batch.images), torch.from_numpy(batch.mask)


def compare(hf_detr, ours, images, mask):
    with torch.no_grad():
        theirs = hf_detr(pixel_values=images, pixel_mask=(~mask).long())
        mine = ours(images, mask)
    logit_err = (theirs.logits - mine["pred_logits"]).abs().max().item()
    box_err = (theirs.pred_boxes - mine["pred_boxes"]).abs().max().item()
    # spread of the boxes over images and queries: the comparison is of varying outputs,
    # so a tolerance of 1e-4 cannot be met by two constant-ish predictions
    return logit_err, box_err, theirs.pred_boxes.flatten(0, 1).std(dim=0).min().item()


@pytest.mark.parametrize("spec,imgsz", [(SMALL, (256, 320)), (R50, (320, 416))], ids=["small", "r50"])
def test_matches_transformers_on_padded_real_batch(spec, imgsz, frames):
    images, mask = padded_batch(frames, imgsz)
    hf_detr = hf_model(spec, images)
    ours = our_model(hf_detr)
    logit_err, box_err, spread = compare(hf_detr, ours, images, mask)
    assert spread > 1e-3
    assert logit_err <= 1e-4 and box_err <= 1e-4, (logit_err, box_err)


def test_mask_matters_and_is_honoured_like_transformers(frames):
    """Same pixels, no mask vs. the padding mask: both implementations move the same way."""
    images, mask = padded_batch(frames[:1], (256, 320))
    hf_detr = hf_model(SMALL, images, seed=1)
    ours = our_model(hf_detr)
    unmasked = torch.zeros_like(mask)
    logit_err, box_err, _ = compare(hf_detr, ours, images, unmasked)
    assert logit_err <= 1e-4 and box_err <= 1e-4
    with torch.no_grad():
        assert (ours(images, mask)["pred_boxes"] - ours(images, unmasked)["pred_boxes"]).abs().max() > 1e-3


def test_hugging_face_folder_loads_through_checkpoint_reader(tmp_path, frames):
    images, mask = padded_batch(frames, (256, 320))
    hf_detr = hf_model(SMALL, images, seed=2)
    hf_detr.config.id2label = {i: f"thing{i}" for i in range(5)}
    hf_detr.save_pretrained(tmp_path / "hf")
    model, config = load_model(tmp_path / "hf", imgsz=(256, 320))
    assert config["classes"] == [f"thing{i}" for i in range(5)]
    assert config["model"]["nheads"] == 4 and config["model"]["num_queries"] == 10
    logit_err, box_err, _ = compare(hf_detr, model.eval(), images, mask)
    assert logit_err <= 1e-4 and box_err <= 1e-4
    # the converted keys are the official layout: our own state dict has exactly them
    state_dict, _, _ = read_checkpoint(tmp_path / "hf")
    assert set(state_dict) == set(model.state_dict())
