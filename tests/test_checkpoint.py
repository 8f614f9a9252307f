"""Checkpoint interchange (official / ours) and the clear errors on bad files."""
import argparse
import logging
import os
import pickle
import subprocess
import sys

import pytest
import torch

from detr_edge.cli import main
from detr_edge.runtime.errors import UserError
from detr_edge.train.checkpoint import load_model, save_checkpoint
from detr_edge.train.config import DETRConfig, checkpoint_config
from detr_edge.train.detr import DETR

from conftest import ROOT

SMALL = DETRConfig(backbone="resnet50", hidden_dim=64, nheads=4, enc_layers=2, dec_layers=2, dim_feedforward=128,
                   num_queries=5, num_classes=4, dropout=0.0)


def official_args(**over):
    """The official main.py's argparse namespace (the fields that matter plus a few others)."""
    values = dict(lr=1e-4, lr_backbone=1e-5, batch_size=2, epochs=300, backbone="resnet50", dilation=False,
                  position_embedding="sine", enc_layers=2, dec_layers=2, dim_feedforward=128, hidden_dim=64,
                  dropout=0.0, nheads=4, num_queries=5, pre_norm=False, aux_loss=True, dataset_file="coco",
                  output_dir="out", device="cuda", seed=42)
    values.update(over)
    return argparse.Namespace(**values)


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return DETR(SMALL).eval()


def same_outputs(a, b):
    x = torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return torch.equal(a(x)["pred_logits"], b(x)["pred_logits"])


def test_official_training_checkpoint_loads_strict(tmp_path, small_model):
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": small_model.state_dict(), "optimizer": {"state": {}, "param_groups": []},
                "lr_scheduler": {"step_size": 200}, "epoch": 3, "args": official_args()}, path)
    model, config = load_model(path)
    assert DETRConfig.from_dict(config["model"]) == SMALL
    assert same_outputs(model.eval(), small_model)


def test_official_style_args_missing_fields_take_the_official_defaults(tmp_path):
    """Third-party code saving official-style checkpoints with a thinner `args`: the missing
    nheads, dilation and dropout are main.py's defaults (8, no, 0.1), not an AttributeError."""
    torch.manual_seed(0)
    eight = DETR(DETRConfig(**{**SMALL.to_dict(), "nheads": 8})).eval()
    args = official_args()
    for name in ("nheads", "dilation", "dropout"):
        delattr(args, name)
    path = tmp_path / "third-party.pth"
    torch.save({"model": eight.state_dict(), "args": args}, path)
    model, config = load_model(path)
    assert (config["model"]["nheads"], config["model"]["dilation"], config["model"]["dropout"]) == (8, False, 0.1)
    assert same_outputs(model.eval(), eight)
    assert main(["info", str(path)]) == 0


def test_release_file_with_only_model_and_dc5_in_name(tmp_path):
    torch.manual_seed(0)
    dc5 = DETR(DETRConfig(**{**SMALL.to_dict(), "dilation": True})).eval()
    path = tmp_path / "detr-r50-dc5-f0fb7ef5.pth"
    torch.save({"model": dc5.state_dict()}, path)
    model, config = load_model(path)
    assert config["model"]["dilation"] is True and config["model"]["nheads"] == 8  # default when no args
    assert config["classes"] == [f"class_{i}" for i in range(4)]


def test_ours_round_trip_and_key_set_is_official(tmp_path, small_model):
    path = tmp_path / "ours.pth"
    save_checkpoint(path, small_model, checkpoint_config(SMALL, (96, 128), ["a", "b", "c", "d"]), epoch=1)
    raw = torch.load(path, weights_only=True)  # loadable by anyone, no allow-list needed
    assert set(raw["model"]) == set(small_model.state_dict())
    model, config = load_model(path)
    assert config["classes"] == ["a", "b", "c", "d"] and config["preprocess"]["imgsz"] == [96, 128]
    assert same_outputs(model.eval(), small_model)
    assert [p.name for p in tmp_path.iterdir()] == ["ours.pth"]  # no temporary left behind


def test_failed_save_keeps_the_previous_file(tmp_path, small_model):
    path = tmp_path / "ours.pth"
    save_checkpoint(path, small_model, checkpoint_config(SMALL, (96, 128)))
    before = path.read_bytes()
    with pytest.raises(Exception):
        save_checkpoint(path, small_model, checkpoint_config(SMALL, (96, 128)), bad=lambda: None)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["ours.pth"]


def test_fine_tune_reinitialises_only_the_class_head(tmp_path, small_model, caplog):
    path = tmp_path / "ours.pth"
    save_checkpoint(path, small_model, checkpoint_config(SMALL, (96, 128)))
    with caplog.at_level(logging.WARNING, logger="detr_edge"):
        model, config = load_model(path, num_classes=2, classes=["cat", "dog"])
    assert "re-initialising the class head: 4 -> 2 classes" in caplog.text
    assert model.class_embed.weight.shape == (3, 64) and config["classes"] == ["cat", "dog"]
    old, new = small_model.state_dict(), model.state_dict()
    assert all(torch.equal(old[k], new[k]) for k in new if not k.startswith("class_embed"))


@pytest.mark.parametrize("seed", range(30))
def test_random_bytes_never_escape_as_a_traceback(tmp_path, seed):
    import random
    path = tmp_path / "noise.pth"
    path.write_bytes(random.Random(seed).randbytes(2048))
    with pytest.raises(UserError, match="not a readable PyTorch checkpoint"):
        load_model(path)


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.mark.parametrize("kind", ["garbage", "truncated", "pickle-exploit", "foreign", "mismatch", "missing"])
def test_bad_files_give_one_clear_line(tmp_path, small_model, kind, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / f"{kind}.pth"
    good = tmp_path / "good.pth"
    save_checkpoint(good, small_model, checkpoint_config(SMALL, (96, 128)))
    if kind == "garbage":
        path.write_bytes(bytes(range(256)) * 16)
        expected = "not a readable PyTorch checkpoint"
    elif kind == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
        expected = "not a readable PyTorch checkpoint"
    elif kind == "pickle-exploit":
        path.write_bytes(pickle.dumps({"model": Exploit()}, protocol=2))
        expected = "refused to load: the file holds a disallowed object"
    elif kind == "foreign":
        import torchvision
        torch.save(torchvision.models.resnet18().state_dict(), path)
        expected = "not a DETR checkpoint"
    elif kind == "mismatch":
        raw = torch.load(good, weights_only=True)
        raw["config"]["model"]["num_queries"] = 9
        torch.save(raw, path)
        expected = "weights do not fit the model its config describes: 1 shape mismatches (e.g. query_embed.weight"
    else:
        expected = "no such file"
    with pytest.raises(UserError, match=expected.replace("(", r"\(")):
        load_model(path)
    assert not (tmp_path / "pwned").exists()

    proc = subprocess.run([sys.executable, "-m", "detr_edge", "info", str(path)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"detr-edge: error: {path}")
