"""One config dataclass for every size of the model, saved in each checkpoint, and the
named presets (the paper's four official models and small edge models)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from detr_edge.runtime.classes import default_classes
from detr_edge.runtime.errors import UserError
from detr_edge.runtime.metadata import preprocess_spec

# torchvision ResNet -> channels of layer4 (what input_proj maps to d_model)
BACKBONE_CHANNELS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048}


@dataclass(frozen=True)
class DETRConfig:
    backbone: str = "resnet50"
    dilation: bool = False        # DC5: stride -> dilation in layer4 (Bottleneck ResNets only)
    frozen_bn: bool = True        # FrozenBatchNorm2d as released; False trains BatchNorm (from scratch)
    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    num_queries: int = 100
    num_classes: int = 91         # max category id + 1; the class head has num_classes + 1 outputs
    pre_norm: bool = False

    def __post_init__(self):
        if self.backbone not in BACKBONE_CHANNELS:
            raise UserError(f"unknown backbone {self.backbone!r}; choose from {', '.join(BACKBONE_CHANNELS)}")
        if self.dilation and BACKBONE_CHANNELS[self.backbone] != 2048:
            raise UserError(f"dilation (DC5) needs a Bottleneck ResNet (resnet50/101), not {self.backbone}")
        if self.hidden_dim % self.nheads or self.hidden_dim % 2:
            raise UserError(f"hidden_dim {self.hidden_dim} must be even and divisible by nheads {self.nheads}")
        for name in ("enc_layers", "dec_layers", "num_queries", "num_classes", "dim_feedforward"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, values: dict) -> "DETRConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise UserError(f"unknown model config keys: {', '.join(sorted(unknown))}")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)


# name -> (architecture, default deployment input size H x W)
_R50 = DETRConfig()
# 800 x 1088 letterboxes a 4:3 photo to a shorter side of 800, the official evaluation size;
# also the size recorded for official and Hugging Face files, which carry none.
OFFICIAL_IMGSZ = (800, 1088)
PRESETS: dict[str, tuple[DETRConfig, tuple[int, int]]] = {
    # The paper's models.
    "detr_r50": (_R50, OFFICIAL_IMGSZ),
    "detr_r50_dc5": (replace(_R50, dilation=True), OFFICIAL_IMGSZ),
    "detr_r101": (replace(_R50, backbone="resnet101"), OFFICIAL_IMGSZ),
    "detr_r101_dc5": (replace(_R50, backbone="resnet101", dilation=True), OFFICIAL_IMGSZ),
    # Edge: ResNet-18, half the transformer depth, a quarter of the feed-forward width.
    "detr_r18": (replace(_R50, backbone="resnet18", enc_layers=3, dec_layers=3, dim_feedforward=1024),
                 (640, 640)),
    # Training from scratch on CPUs (the demo): trainable BatchNorm, d=128, 20 queries.
    "detr_r18_tiny": (replace(_R50, backbone="resnet18", frozen_bn=False, hidden_dim=128, enc_layers=3,
                              dec_layers=3, dim_feedforward=512, dropout=0.0, num_queries=20), (192, 192)),
}


def preset(name: str) -> tuple[DETRConfig, tuple[int, int]]:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name]


def checkpoint_config(model: DETRConfig, imgsz: tuple[int, int], classes: list[str] | None = None) -> dict:
    """The `config` entry of a checkpoint, which also becomes the artifacts' metadata."""
    classes = list(classes) if classes is not None else default_classes(model.num_classes)
    if len(classes) != model.num_classes:
        raise UserError(f"{len(classes)} class names for a model with num_classes={model.num_classes}")
    return {"model": model.to_dict(), "classes": classes, "preprocess": preprocess_spec(imgsz)}
