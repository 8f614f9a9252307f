"""onnxruntime backend: TensorRT, CUDA, then CPU execution provider, whichever the
installed onnxruntime has (or the ones asked for)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import UserError
from ..metadata import METADATA_KEY, loads
from .base import Backend

PREFERRED = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


class OnnxRuntimeBackend(Backend):
    concurrent = True  # InferenceSession.run is thread-safe
    def __init__(self, path, providers: list[str] | None = None, threads: int = 0, spin: bool = True):
        """`threads`: intra-op threads (0: one per core). `spin`: whether they busy-wait for
        the next call (fastest alone; off where other processes need the cores between calls:
        a server beside its clients)."""
        import onnxruntime as ort

        path = Path(path)
        available = ort.get_available_providers()
        if providers is None:
            providers = [p for p in PREFERRED if p in available]
        missing = [p for p in providers if p not in available]
        if missing:
            raise UserError(f"onnxruntime here has no {', '.join(missing)} (it has {', '.join(available)})")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        if not spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3  # errors only: no per-node provider-placement warnings
        self.session = _session(ort, path, options, providers)
        custom = self.session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in custom:
            raise UserError(f"{path}: ONNX file without detr-edge metadata (not exported by detr-edge)")
        self.name, self.path = path.name, path
        self._set_meta(loads(custom[METADATA_KEY], str(path)), str(path))
        if self.export.get("int8", {}).get("graph") == "fp16":
            # onnxruntime's WeightBiasQuantization makes an int32 bias with the product of the
            # input and weight scales computed in their type: with FP16 scales it underflows
            # (the demo model's TensorRT INT8 file lost 15 AP points; TensorRT keeps such biases float)
            self.session = _session(ort, path, options, providers, ["WeightBiasQuantization"])
        self.providers = self.session.get_providers()
        self.output_names = [o.name for o in self.session.get_outputs()]
        inputs = {i.name: i.shape for i in self.session.get_inputs()}
        if "images" not in inputs or "mask" not in inputs:
            raise UserError(f"{path}: inputs {sorted(inputs)} are not detr-edge's images and mask")
        if list(inputs["images"][2:]) != list(self.imgsz):
            raise UserError(f"{path}: its input is {inputs['images'][2]} x {inputs['images'][3]} but its metadata "
                            f"says {self.imgsz[0]} x {self.imgsz[1]}: re-export it")

    def _run(self, images: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(self.session.run(self.output_names, {"images": images, "mask": mask}))



def _session(ort, path: Path, options, providers, disabled=()):
    try:
        return ort.InferenceSession(str(path), options, providers=providers, disabled_optimizers=list(disabled))
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise UserError(f"{path}: onnxruntime cannot load it ({str(exc).splitlines()[0][:200]})") from None
