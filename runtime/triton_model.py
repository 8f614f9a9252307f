"""The end-to-end detector that Triton's Python backend serves: images in (a file's bytes,
or uint8 H x W x 3 frames of any size), detections out (in each image's pixels), through
the runtime's own preprocessing, backend (onnxruntime or TensorRT) and postprocessing.

Its tensors, as NVIDIA's detection models name theirs (EfficientNMS's num_detections and
padded rows), so one batch holds images with different numbers of detections:
  inputs   encoded         UINT8 [L]        a JPEG/PNG/... file's bytes (one image a request
                                            unless the files are of one length), or
           frame           UINT8 [H, W, 3]  a BGR frame (the request's frames share a size)
  outputs  num_detections  INT32 [1]        valid rows of the next three
           scores          FP32  [K]        highest first, 0 past num_detections
           labels          INT32 [K]        class ids (the config's `classes`), -1 past it
           boxes           FP32  [K, 4]     x1, y1, x2, y2 in the image's pixels
K = the model's queries. A request parameter `conf` overrides the config's threshold.
A request that fails (no image, bytes that are not one) gets an error response; the
others in the same batch are answered.

Tensors cross into and out of Triton's Python backend through DLPack (`_input`, `_output`),
not `as_numpy()` / `pb_utils.Tensor(...)`: the stub of nvidia-pytriton 0.7 (Triton 2.51)
converts through a numpy bridge older than numpy 2, which under numpy 2 reads every element
as the first and sends outputs of the wrong size (and a BYTES input kills the stub for good:
hence UINT8 for encoded files).
"""
from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

import numpy as np

from .backends import load_backend
from .errors import UserError
from .io import decode_image
from .postprocess import check_conf
from .preprocess import preprocess

INPUTS = ("encoded", "frame")
OUTPUTS = ("num_detections", "scores", "labels", "boxes")


def pack(detections: list[dict], rows: int) -> dict:
    """Per-image detections -> the model's padded output arrays (`rows` per image)."""
    count = len(detections)
    out = {"num_detections": np.zeros((count, 1), np.int32), "scores": np.zeros((count, rows), np.float32),
           "labels": np.full((count, rows), -1, np.int32), "boxes": np.zeros((count, rows, 4), np.float32)}
    for i, found in enumerate(detections):  # sorted by score already (runtime.postprocess)
        n = min(len(found["scores"]), rows)
        out["num_detections"][i, 0] = n
        out["scores"][i, :n] = found["scores"][:n]
        out["labels"][i, :n] = found["labels"][:n]
        out["boxes"][i, :n] = found["boxes"][:n]
    return out


def unpack(outputs: dict) -> list[dict]:
    """The model's padded outputs -> per-image {'scores', 'labels', 'boxes'} as the runtime has them."""
    return [{"scores": outputs["scores"][i, :n].astype(np.float32), "labels": outputs["labels"][i, :n].astype(np.int64),
             "boxes": outputs["boxes"][i, :n].astype(np.float32)}
            for i, n in enumerate(outputs["num_detections"].reshape(-1))]


def frames_of(encoded, frame) -> list[np.ndarray]:
    """One request's images from whichever input it sent (numpy arrays, or None)."""
    if (encoded is None) == (frame is None):
        raise UserError("send one input: 'encoded' (an image file's bytes) or 'frame' (uint8 H x W x 3)")
    if encoded is not None:
        encoded = np.asarray(encoded)
        if encoded.dtype != np.uint8 or encoded.ndim != 2:
            raise UserError(f"'encoded': uint8 [batch, bytes] expected, not {encoded.dtype} {list(encoded.shape)}")
        return [decode_image(item.tobytes(), f"image {k}") for k, item in enumerate(encoded)]
    frame = np.asarray(frame)
    if frame.dtype != np.uint8 or frame.ndim != 4 or frame.shape[3] != 3 or 0 in frame.shape:
        raise UserError(f"'frame': uint8 [batch, H, W, 3] expected, not {frame.dtype} {list(frame.shape)}")
    return list(frame)


class TritonPythonModel:
    """Triton's Python-backend interface: initialize, execute (a batch of requests), finalize."""

    def initialize(self, args: dict) -> None:
        self.pb = importlib.import_module("triton_python_backend_utils")  # only inside Triton's stub
        # a few bytes of PNG header can claim a gigapixel: refuse past 64 MP (OpenCV reads this once)
        os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(1 << 26))
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        artifact = Path(args["model_repository"]) / args["model_version"] / params["artifact"]
        # onnxruntime's threads per instance (0: one per core; with several instances, fewer), and
        # whether they busy-wait between calls (off: the cores go to Triton, the stub and clients)
        options = ({"threads": int(params.get("threads", 0)), "spin": params.get("spin", "1") == "1"}
                   if artifact.suffix == ".onnx" else {})
        self.backend = load_backend(artifact, **options)
        self.conf = check_conf(float(params.get("conf", 0.5)))
        self.rows = int(params["max_detections"])

    def execute(self, requests: list) -> list:
        pb = self.pb
        responses: list = [None] * len(requests)
        frames, spans = [], []
        for i, request in enumerate(requests):
            try:
                images = frames_of(*(_input(pb, request, name) for name in INPUTS))
                conf = check_conf(float(json.loads(request.parameters() or "{}").get("conf", self.conf)))
            except Exception as exc:  # this request's fault (no image, bad bytes): the others go on
                responses[i] = pb.InferenceResponse(output_tensors=[], error=pb.TritonError(str(exc) or repr(exc)))
                continue
            spans.append((i, len(frames), len(images), conf))
            frames += images
        if spans:
            try:
                batch = preprocess(frames, self.backend.spec)
                detections = self.backend.to_detections(self.backend.infer(batch.images, batch.mask), batch,
                                                        min(conf for *_, conf in spans))
            except Exception as exc:  # the model itself failed: every request of the batch says why
                for i, *_ in spans:
                    responses[i] = pb.InferenceResponse(output_tensors=[], error=pb.TritonError(str(exc)))
                return responses
            for i, start, count, conf in spans:
                mine = [{k: v[d["scores"] >= conf] for k, v in d.items()} for d in detections[start:start + count]]
                responses[i] = pb.InferenceResponse(output_tensors=[_output(pb, name, value) for name, value
                                                                    in pack(mine, self.rows).items()])
        return responses

    def finalize(self) -> None:
        self.backend.close()


def _input(pb, request, name: str):
    """The request's input `name` as numpy (a copy: the request's memory goes with it), or None."""
    tensor = pb.get_input_tensor_by_name(request, name)
    return None if tensor is None else np.array(np.from_dlpack(tensor))


def _output(pb, name: str, array: np.ndarray):
    if sys.unraisablehook is not _quiet_used_capsule:
        _quiet_used_capsule.previous = sys.unraisablehook
        sys.unraisablehook = _quiet_used_capsule
    return pb.Tensor.from_dlpack(name, np.ascontiguousarray(array))


def _quiet_used_capsule(unraisable) -> None:
    """The stub marks a consumed DLPack capsule "used_dlpack" where numpy expects
    "used_dltensor", so numpy's capsule destructor prints a ValueError per output tensor
    (the stub frees the tensor itself: nothing leaks). Drop exactly that one."""
    if not (isinstance(unraisable.exc_value, ValueError)
            and "PyCapsule_GetPointer called with incorrect name" in str(unraisable.exc_value)):
        _quiet_used_capsule.previous(unraisable)
