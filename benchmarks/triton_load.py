"""The served detector under load, beside the same artifact in process, on this machine:
a real Triton server (nvidia-pytriton's tritonserver, 127.0.0.1) on a repository that
`write_triton` makes, with Triton's dynamic batching on and then off; 1, 4 and 16
concurrent clients, each its own connection, each sending `--requests` requests of one
image; throughput, p50/p99 latency, errors and lost requests (sent, not answered); and
the in-process figure of the same file (`detr-edge bench`'s model alone: preprocess +
infer + postprocess, batch 1) measured just before.

    .venv/bin/python benchmarks/triton_load.py --checkpoint demo-out/train/best.pth
    .venv/bin/python benchmarks/triton_load.py --model m.onnx --input frame --protocol grpc
"""
import argparse
import logging
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.multistream import cpu  # noqa: E402
from detr_edge.cli import main as cli  # noqa: E402
from detr_edge.repository import DetectorOptions, write_triton  # noqa: E402
from detr_edge.runtime.backends import load_backend  # noqa: E402
from detr_edge.runtime.bench import model_alone  # noqa: E402
from detr_edge.runtime.io import read_image  # noqa: E402
from detr_edge.runtime.triton_model import OUTPUTS  # noqa: E402
from detr_edge.serve import TritonServer  # noqa: E402

PHOTOS = ROOT.parent / "shared" / "data" / "coco-tiny" / "val2017"


def load(server: TritonServer, protocol: str, payloads: list, clients: int, requests: int) -> dict:
    """`clients` threads, each its own connection, each `requests` requests (payloads in turn)."""
    if protocol == "grpc":
        import tritonclient.grpc as module
        url = server.grpc_url
    else:
        import tritonclient.http as module
        url = server.http_url
    latencies, errors, answered = [], [], [0]
    lock = threading.Lock()

    def one_client(k: int) -> None:
        client = module.InferenceServerClient(url)
        wanted = [module.InferRequestedOutput(n) for n in OUTPUTS]
        for i in range(requests):
            name, array = payloads[(k + i) % len(payloads)]
            tensor = module.InferInput(name, list(array.shape), "UINT8")
            tensor.set_data_from_numpy(array)
            start = time.perf_counter()
            try:
                result = client.infer("detr", [tensor], outputs=wanted)
                result.as_numpy("num_detections")
            except Exception as exc:  # counted, not raised: the figure is how many fail
                with lock:
                    errors.append(str(exc)[:200])
                continue
            with lock:
                latencies.append((time.perf_counter() - start) * 1000)
                answered[0] += 1
        client.close()
    threads = [threading.Thread(target=one_client, args=(k,)) for k in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    sent = clients * requests
    return {"clients": clients, "sent": sent, "answered": answered[0], "errors": len(errors),
            "lost": sent - answered[0] - len(errors), "rps": answered[0] / wall,
            "p50_ms": float(np.percentile(latencies, 50)) if latencies else 0.0,
            "p99_ms": float(np.percentile(latencies, 99)) if latencies else 0.0, "first_error": errors[:1]}


def _decode_ms(path: Path) -> float:
    start = time.perf_counter()
    read_image(path)
    return (time.perf_counter() - start) * 1000


def main():
    parser = argparse.ArgumentParser()
    given = parser.add_mutually_exclusive_group(required=True)
    given.add_argument("--checkpoint", help="exported here to a dynamic-batch ONNX file")
    given.add_argument("--model", help="a dynamic-batch .onnx")
    parser.add_argument("--photos", default=str(PHOTOS), help="images sent (default: coco-tiny's)")
    parser.add_argument("--input", choices=["encoded", "frame"], default="encoded",
                        help="send the image files' bytes (decoded by the server) or decoded frames")
    parser.add_argument("--protocol", choices=["http", "grpc"], default="grpc")
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--requests", type=int, default=200, help="per client")
    parser.add_argument("--iters", type=int, default=200, help="in-process calls")
    parser.add_argument("--spin", action="store_true", help="the server's onnxruntime threads busy-wait between calls")
    parser.add_argument("--instances", type=int, default=1, help="instances of the served detector")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime threads per instance (0: one per core)")
    parser.add_argument("--batching", default="on,off", help="Triton's dynamic batching: on, off or both")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    paths = sorted(Path(args.photos).glob("*.jpg"))[:8]
    if args.input == "encoded":
        payloads = [("encoded", np.frombuffer(p.read_bytes(), np.uint8)[None]) for p in paths]
    else:
        payloads = [("frame", read_image(p)[None]) for p in paths]
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else Path(tmp, "model.onnx")
        if args.checkpoint:
            assert cli(["export", args.checkpoint, "--out", str(model), "--dynamic-batch"]) == 0
        print(f"machine: {cpu()}")
        print(f"model: {args.checkpoint or args.model}; {len(paths)} photos from {args.photos}, sent as "
              f"{args.input} over {args.protocol}; {args.requests} requests per client; {args.instances} instance(s), "
              f"{args.threads or 'one per core'} onnxruntime threads each, spinning {'on' if args.spin else 'off'}")
        with load_backend(model) as backend:
            frames = [read_image(p) for p in paths]
            times = [t for frame in frames for t in model_alone(backend, frame, args.iters // len(frames))]
            decode = [_decode_ms(p) for p in paths for _ in range(10)]
            alone = 1000 / statistics.mean(times)
            decoded = 1000 / (statistics.mean(times) + statistics.mean(decode))
            # like for like: the server decodes encoded images; frames arrive decoded
            inprocess = decoded if args.input == "encoded" else alone
            print(f"in process, batch 1: model alone {alone:.1f} images/s (p50 {np.percentile(times, 50):.1f} ms); "
                  f"with the JPEG decode {decoded:.1f} images/s (decode {statistics.mean(decode):.1f} ms); "
                  f"served figures below against the {'second' if args.input == 'encoded' else 'first'}")
            for batching in (part == "on" for part in args.batching.split(",")):
                repository = Path(tmp, f"triton-{batching}")
                write_triton(repository, {}, lambda path: backend, model,
                             DetectorOptions(dynamic_batching=batching, spin=args.spin, instances=args.instances,
                                             threads=args.threads))
                with TritonServer(repository).start() as server:
                    for clients in (int(c) for c in args.clients.split(",")):
                        row = load(server, args.protocol, payloads, clients, args.requests)
                        print(f"dynamic batching {'on ' if batching else 'off'}  {clients:2d} clients: "
                              f"{row['rps']:6.1f} images/s = {row['rps'] / inprocess:4.0%} of in process, "
                              f"p50 {row['p50_ms']:6.1f} ms, p99 {row['p99_ms']:6.1f} ms, {row['answered']} of "
                              f"{row['sent']} answered, {row['errors']} errors, {row['lost']} lost"
                              + (f" (first: {row['first_error'][0]})" if row["first_error"] else ""), flush=True)


if __name__ == "__main__":
    main()
