"""The CPU-side cost per frame of the two ways to run a TensorRT engine from Python, side
by side in one run: Polygraphy's TrtRunner against detr-edge's TensorRTBackend, each
copying DETR's real inputs and outputs through the GPU (images 3x640x640 float32, mask
640x640 bool in; logits 100x92, boxes 100x4 out), around an engine that computes nothing:
a stand-in `tensorrt` (tests/trt_stub.py) with the names of TensorRT 10.13's bindings,
which asks TrtRunner's output allocator for memory on every run as TensorRT does. What
is timed is everything but the engine: Python, checks, allocation, copies, synchronization.

Needs a CUDA GPU, cuda-python and Polygraphy (no TensorRT). The backend's figure includes
copying the outputs out of its pinned buffers; TrtRunner returns views of its own buffers.

    python benchmarks/trt_runner_overhead.py [--iters 500] [--batch 1]
"""
import argparse
import json
import statistics
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from benchmarks.timing import interleaved  # noqa: E402

BINDINGS = ROOT / ".cache" / "tensorrt-bindings"  # tests/test_trt_plan.py downloads them
VERSION = "10.13.3"
QUERIES, CLASSES, SIZE = 100, 92, 640


def stand_in(batch: int):
    from trt_stub import stub_tensorrt
    wheel = next(BINDINGS.glob("*-10.13*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        strings = archive.read(next(n for n in archive.namelist() if n.endswith("tensorrt.so")))
    shapes = {"images": (3, SIZE, SIZE), "mask": (SIZE, SIZE), "logits": (QUERIES, CLASSES), "boxes": (QUERIES, 4)}
    trt = stub_tensorrt(VERSION, strings, engine_spec={"dynamic": True, "profile": (1, batch, 8), "shapes": shapes})
    sys.modules["tensorrt"] = trt
    return trt


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iters", type=int, default=500)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="also print where TrtRunner's time goes (cProfile)")
    args = parser.parse_args()
    trt = stand_in(args.batch)
    from polygraphy.backend.trt import TrtRunner
    from polygraphy.logger import G_LOGGER

    from detr_edge.runtime.backends.trt import TensorRTBackend
    from detr_edge.runtime.cuda import device_info
    from detr_edge.runtime.metadata import preprocess_spec

    G_LOGGER.module_severity = G_LOGGER.ERROR
    device = device_info()
    with tempfile.TemporaryDirectory() as tmp:
        engine = Path(tmp) / "m.engine"
        engine.write_bytes(b"stand-in")
        meta = {"model": {}, "classes": [f"c{i}" for i in range(CLASSES - 1)], "preprocess": preprocess_spec((SIZE, SIZE)),
                "export": {"precision": "fp16", "batch": "dynamic", "outputs": "raw"},
                "engine": {"tensorrt_version": VERSION, **device, "plan": {}}}
        Path(f"{engine}.json").write_text(json.dumps(meta))
        ours = TensorRTBackend(engine, trt=trt)
        memory = ours.memory
    rng = np.random.default_rng(0)
    images = rng.standard_normal((args.batch, 3, SIZE, SIZE), dtype=np.float32)
    mask = np.zeros((args.batch, SIZE, SIZE), bool)
    mask[:, SIZE * 3 // 4:] = True
    runner = TrtRunner(trt.Runtime(None).deserialize_cuda_engine(b"stand-in"))
    with runner:
        feed = {"images": images, "mask": mask}
        times = interleaved({"TrtRunner": lambda: runner.infer(feed),
                             "TrtRunner, no input check": lambda: runner.infer(feed, check_inputs=False),
                             "TensorRTBackend": lambda: ours.infer(images, mask)}, args.iters, block=50)
        if args.profile:
            import cProfile
            import pstats
            profiler = cProfile.Profile()
            profiler.runcall(lambda: [runner.infer(feed) for _ in range(20)])
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(12)
    ours.close()
    print(f"batch {args.batch}, DETR I/O at {SIZE}x{SIZE}, {args.iters} runs each in turns, {device['gpu']}, "
          f"cuda-python memory ({type(memory).__name__}), Polygraphy's own cuda module for TrtRunner")
    medians = {}
    for name, seconds in times.items():
        us = sorted(t * 1e6 for t in seconds)
        medians[name] = statistics.median(us)
        print(f"  {name:26s} median {medians[name]:8.1f} us  p10 {us[len(us) // 10]:8.1f}  p90 {us[len(us) * 9 // 10]:8.1f}")
    print(f"  TrtRunner / TensorRTBackend: {medians['TrtRunner'] / medians['TensorRTBackend']:.2f}x")


if __name__ == "__main__":
    main()
