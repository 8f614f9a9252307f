"""A detector served by Triton (the end-to-end model `deploy --triton` writes) as the
runtime's backend: frames go to the server as they are (uint8, so it sees the very pixels
the local runtime would), detections come back, pre- and postprocessing run there with
the runtime's own code. `tritonclient` (HTTP, or gRPC for grpc:// URLs) only when used."""
from __future__ import annotations

import json
import threading

import numpy as np

from ..errors import UserError
from ..triton_model import OUTPUTS, unpack


class TritonClient:
    """`detect_frames(frames, conf) -> per-frame detections` through a served detector.
    `url`: host:port or http://host:port (HTTP, Triton's 8000), grpc://host:port (8001)."""

    remote = True
    batch = None

    def __init__(self, url: str, model: str = "detr", timeout: float = 10.0):
        grpc = url.startswith("grpc://")
        address = url.split("://", 1)[-1].rstrip("/")
        try:
            if grpc:
                import tritonclient.grpc as client
            else:
                import tritonclient.http as client
        except ImportError:
            raise UserError("--triton needs tritonclient: pip install 'tritonclient[http,grpc]'") from None
        self._module, self.model, self.name = client, model, f"{model} at {url}"
        self._options = {} if grpc else {"connection_timeout": timeout, "network_timeout": timeout}
        self._call = {"client_timeout": timeout} if grpc else {}  # gRPC: a deadline per call
        self._address, self._local, self._clients = address, threading.local(), []
        try:
            ready = self._client().is_model_ready(model, **self._call)
        except Exception as exc:  # tritonclient's own exception types, per protocol
            raise UserError(f"{url}: no Triton server answers there ({_first_line(exc)})") from None
        if not ready:
            raise UserError(f"{url}: the server has no model {model!r} ready (deploy --triton writes 'detr')")
        config = self._client().get_model_config(model, **({"as_json": True, **self._call} if grpc else {}))
        config = config.get("config", config)
        params = {k: v.get("string_value", v.get("stringValue", "")) for k, v in config.get("parameters", {}).items()}
        if "classes" not in params:
            raise UserError(f"{url}: model {model!r} is not detr-edge's end-to-end detector (no 'classes' parameter)")
        self.classes = json.loads(params["classes"])
        self.max_batch = int(config.get("max_batch_size", config.get("maxBatchSize", 0))) or 1

    def detect_frames(self, frames: list, conf: float = 0.5) -> list[dict]:
        """Frames of one size go together, at most the model's batch per request."""
        found = []
        start = 0
        while start < len(frames):
            end = start + 1
            while end < len(frames) and end - start < self.max_batch and frames[end].shape == frames[start].shape:
                end += 1
            found += self._request(np.stack(frames[start:end]), conf)
            start = end
        return found

    def _client(self):
        """This thread's connection: the HTTP client (gevent) works only in the thread that made it."""
        if getattr(self._local, "client", None) is None:
            self._local.client = self._module.InferenceServerClient(self._address, **self._options)
            self._clients.append(self._local.client)
        return self._local.client

    def _request(self, frames: np.ndarray, conf: float) -> list[dict]:
        client = self._module
        tensor = client.InferInput("frame", list(frames.shape), "UINT8")
        tensor.set_data_from_numpy(np.ascontiguousarray(frames, np.uint8))
        try:
            result = self._client().infer(self.model, [tensor], outputs=[client.InferRequestedOutput(n) for n in OUTPUTS],
                                        parameters={"conf": conf}, **self._call)
        except Exception as exc:
            raise UserError(f"{self.name}: {_first_line(exc)}") from None
        return unpack({name: result.as_numpy(name) for name in OUTPUTS})

    def close(self) -> None:
        for client in self._clients:
            try:
                client.close()
            except Exception:  # an HTTP client closed from another thread than its own: it goes with the process
                pass
        self._clients = []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TritonClient({self.name})"


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
