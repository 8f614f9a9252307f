"""A checkpoint behind the runtime's backend interface, so that the checker compares any
reference with any model (as Polygraphy compares any runner with any other): PyTorch is
one more backend, the default reference when a checkpoint is given. It takes any input
size (DETR does) and returns float64 outputs, the reference's full precision."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from detr_edge.runtime.backends.base import Backend

from .checkpoint import load_model


class TorchBackend(Backend):
    name = "pytorch"

    def __init__(self, checkpoint, device: str = "cpu"):
        model, config = load_model(checkpoint)
        self.model, self.device = model.eval().to(device), device
        self.output_names = ["logits", "boxes"]
        self._set_meta({**config, "export": {"precision": "fp32", "batch": "dynamic", "outputs": "raw"}},
                       str(checkpoint))
        self.name, self.path = f"PyTorch ({Path(checkpoint).name})", Path(checkpoint)

    def fits(self, imgsz) -> bool:
        return True  # any H x W (multiples of the backbone's stride, as preprocess makes them)

    @torch.no_grad()
    def _run(self, images: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, ...]:
        out = self.model(torch.from_numpy(images).to(self.device), torch.from_numpy(mask).to(self.device))
        return out["pred_logits"].cpu().double().numpy(), out["pred_boxes"].cpu().double().numpy()
