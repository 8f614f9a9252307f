"""The end-to-end detector served by a real NVIDIA Triton server (nvidia-pytriton's
tritonserver on 127.0.0.1): real photos over HTTP and gRPC give the local runtime's
detections; malformed requests get errors and the server serves the next one; 16
concurrent clients lose nothing; `run --triton` streams a video as the local runtime does."""
import json
import signal
import threading

import numpy as np
import pytest

from detr_edge.cli import main
from detr_edge.repository import DetectorOptions, write_triton
from detr_edge.runtime.backends import load_backend
from detr_edge.runtime.io import read_image
from detr_edge.runtime.preprocess import preprocess
from detr_edge.runtime.triton_model import OUTPUTS, unpack
from detr_edge.train.checkpoint import save_checkpoint
from detr_edge.train.config import checkpoint_config
from detr_edge.train.synth import write_video

from conftest import sharp_model
from test_stream import TINY
from triton_fixture import served

CONF = 0.3


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A dynamic-batch small model, its repository (raw network + detector), a server on it."""
    root = tmp_path_factory.mktemp("serve")
    checkpoint = root / "tiny.pth"
    save_checkpoint(checkpoint, sharp_model(TINY), checkpoint_config(TINY, (128, 160), None))
    model = root / "tiny.onnx"
    assert main(["export", str(checkpoint), "--out", str(model), "--dynamic-batch"]) == 0
    with load_backend(model) as backend:
        write_triton(root / "triton", {"fp32": model}, lambda path: backend, model, DetectorOptions(threads=1))
    with served(root / "triton") as running:
        running.model = model
        yield running


@pytest.fixture(scope="module")
def local(server):
    with load_backend(server.model) as backend:
        yield backend


def _client(server, protocol):
    if protocol == "http":
        import tritonclient.http as module
        return module, module.InferenceServerClient(server.http_url, concurrency=1)
    import tritonclient.grpc as module
    return module, module.InferenceServerClient(server.grpc_url)


def _infer(module, client, name, array, conf=CONF):
    tensor = module.InferInput(name, list(array.shape), "UINT8")
    tensor.set_data_from_numpy(array)
    result = client.infer("detr", [tensor], outputs=[module.InferRequestedOutput(n) for n in OUTPUTS],
                          parameters={"conf": conf})
    return unpack({n: result.as_numpy(n) for n in OUTPUTS})


def _same(ours: dict, theirs: dict) -> None:
    assert ours["labels"].tolist() == theirs["labels"].tolist()
    np.testing.assert_allclose(ours["scores"], theirs["scores"], atol=1e-5)
    np.testing.assert_allclose(ours["boxes"], theirs["boxes"], atol=1e-3)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_served_detections_equal_the_local_runtime(server, local, coco_photos, protocol):
    module, client = _client(server, protocol)
    found = 0
    for photo in coco_photos[:6]:
        frame = read_image(photo)
        expected = local.detect(preprocess([frame], local.spec), CONF)[0]
        encoded = np.frombuffer(photo.read_bytes(), np.uint8)[None]  # the file's bytes, decoded there
        _same(_infer(module, client, "encoded", encoded)[0], expected)
        _same(_infer(module, client, "frame", frame[None])[0], expected)
        found += len(expected["scores"])
    assert found >= 6  # the comparison saw detections
    # a batch of frames of one size in one request: each its own detections
    frames = np.stack([read_image(p)[:200, :300] for p in coco_photos[:3]])
    for ours, frame in zip(_infer(module, client, "frame", frames), frames):
        _same(ours, local.detect(preprocess([frame], local.spec), CONF)[0])
    client.close()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_malformed_requests_get_errors_and_the_server_serves_the_next(server, coco_photos, protocol):
    from tritonclient.utils import InferenceServerException
    module, client = _client(server, protocol)
    good = np.frombuffer(coco_photos[0].read_bytes(), np.uint8)[None]
    expected = _infer(module, client, "encoded", good)
    bad = {"wrong dtype": ("frame", np.zeros((1, 32, 32, 3), np.float32), "FP32"),
           "empty bytes": ("encoded", np.zeros((1, 0), np.uint8), "UINT8"),
           "bytes that are not an image": ("encoded", np.frombuffer(b"not an image at all" * 20, np.uint8)[None],
                                           "UINT8"),
           "a batch over the maximum": ("frame", np.zeros((9, 32, 32, 3), np.uint8), "UINT8"),
           "a frame without colour channels": ("frame", np.zeros((1, 32, 32, 1), np.uint8), "UINT8")}
    for what, (name, array, dtype) in bad.items():
        tensor = module.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        with pytest.raises(InferenceServerException):
            client.infer("detr", [tensor])
        again = _infer(module, client, "encoded", good)  # the next request is served
        _same(again[0], expected[0])
    both = []
    for name, array in (("encoded", good), ("frame", np.zeros((1, 32, 32, 3), np.uint8))):
        both.append(module.InferInput(name, list(array.shape), "UINT8"))
        both[-1].set_data_from_numpy(array)
    with pytest.raises(InferenceServerException, match="send one input"):  # the detector's own check
        client.infer("detr", both)
    with pytest.raises(InferenceServerException, match="cannot decode"):
        _infer(module, client, "encoded", bad["bytes that are not an image"][1])
    _same(_infer(module, client, "encoded", good)[0], expected[0])
    client.close()


def test_sixteen_concurrent_clients_lose_nothing_and_are_batched(server, coco_photos):
    """Photos of four sizes and two thresholds at once: Triton batches requests of other sizes
    together (ragged), and each answer is its own photo's at its own threshold."""
    import tritonclient.http as module
    photos = [np.frombuffer(p.read_bytes(), np.uint8)[None] for p in coco_photos[:4]]
    client = module.InferenceServerClient(server.http_url)
    expected = {(i, conf): _infer(module, client, "encoded", p, conf)[0] for i, p in enumerate(photos)
                for conf in (0.3, 0.98)}
    assert any(len(expected[i, 0.3]["scores"]) > len(expected[i, 0.98]["scores"]) for i in range(4))
    before = client.get_inference_statistics("detr")["model_stats"][0]
    answers, errors = [], []

    def one_client(k: int) -> None:
        own, conf = module.InferenceServerClient(server.http_url), (0.3, 0.98)[k % 2]
        for i in range(20):
            try:
                answers.append(((i + k) % 4, conf, _infer(module, own, "encoded", photos[(i + k) % 4], conf)[0]))
            except Exception as exc:
                errors.append(exc)
        own.close()
    refused = []

    def bad_client() -> None:  # batched with the good ones: only its own requests fail
        own = module.InferenceServerClient(server.http_url)
        for _ in range(20):
            try:
                _infer(module, own, "encoded", np.frombuffer(b"no image here" * 50, np.uint8)[None])
            except Exception as exc:
                refused.append(exc)
        own.close()
    threads = [threading.Thread(target=one_client, args=(k,)) for k in range(16)] + [threading.Thread(target=bad_client)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(answers) == 16 * 20 and len(refused) == 20
    for i, conf, found in answers:
        _same(found, expected[i, conf])
    after = client.get_inference_statistics("detr")["model_stats"][0]
    inferences = int(after["inference_count"]) - int(before["inference_count"])
    executions = int(after["execution_count"]) - int(before["execution_count"])
    assert inferences >= 16 * 20 and executions < inferences, (inferences, executions)  # batched
    client.close()


def test_serve_runs_until_ctrl_c_and_leaves_nothing_running(server, tmp_path):
    """`detr-edge serve` in the foreground: ready, answering, then Ctrl-C: exit 130, the
    ports free again (its tritonserver gone)."""
    import socket
    import subprocess
    import sys
    import tritonclient.http as module

    from conftest import ROOT
    ports = []
    for _ in range(3):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    repository = server.repository
    proc = subprocess.Popen([sys.executable, "-m", "detr_edge", "serve", str(repository), "--http-port", str(ports[0]),
                             "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2])], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in proc.stdout:
        if line.startswith("Ctrl-C to stop"):
            break
    client = module.InferenceServerClient(f"127.0.0.1:{ports[0]}")
    assert client.is_model_ready("detr")
    client.close()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err
    for port in ports:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))  # free: no server left behind


def test_run_through_the_server_equals_the_local_run(server, tmp_path):
    video = write_video(tmp_path / "shapes.mp4", 30, (240, 320), np.random.default_rng(1))
    for where, args in {"local": [str(server.model), str(video)],
                        "http": ["--triton", server.http_url, "detr", str(video)],
                        "grpc": ["--triton", f"grpc://{server.grpc_url}", "detr", str(video)]}.items():
        assert main(["run", *args, "--conf", str(CONF), "--jsonl", str(tmp_path / f"{where}.jsonl")]) == 0
    local = [json.loads(line) for line in (tmp_path / "local.jsonl").read_text().splitlines()]
    assert len(local) == 30 and sum(len(r["detections"]) for r in local) > 10
    for where in ("http", "grpc"):
        remote = [json.loads(line) for line in (tmp_path / f"{where}.jsonl").read_text().splitlines()]
        assert [r["frame"] for r in remote] == list(range(30))
        for a, b in zip(local, remote):
            assert [d["label"] for d in a["detections"]] == [d["label"] for d in b["detections"]]
            assert [d["name"] for d in a["detections"]] == [d["name"] for d in b["detections"]]
            np.testing.assert_allclose([d["score"] for d in a["detections"]], [d["score"] for d in b["detections"]],
                                       atol=1e-5)
            np.testing.assert_allclose([d["box"] for d in a["detections"]], [d["box"] for d in b["detections"]],
                                       atol=0.01)


def test_a_server_that_is_not_there_is_one_line(tmp_path, capsys):
    video = write_video(tmp_path / "shapes.mp4", 3, (240, 320), np.random.default_rng(1))
    assert main(["run", "detr", str(video), "--triton", "127.0.0.1:9", "--timeout", "2"]) == 2
    err = capsys.readouterr().err
    assert "127.0.0.1:9: no Triton server answers there" in err and "Traceback" not in err
