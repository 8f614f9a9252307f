"""The practical peak of this CPU: the rate of onnxruntime's own GEMM (MLAS) on a
2048^3 product, in FP32 (MatMul) and in INT8 (MatMulInteger, uint8 x int8 -> int32, the
kernel family of its quantized convolutions). A latency ratio can then be read against
what the hardware allows."""
import statistics
import time

import numpy as np
import onnxruntime
from onnx import TensorProto, helper, numpy_helper


def gemm_rate(threads: int, precision: str = "fp32", n: int = 2048) -> float:
    """Multiply-adds x 2 per second, in G (GFLOP/s for fp32, GOP/s for int8)."""
    rng = np.random.default_rng(0)
    if precision == "fp32":
        a = rng.standard_normal((n, n), np.float32)
        b = numpy_helper.from_array(rng.standard_normal((n, n), np.float32), "B")
        node, a_type = helper.make_node("MatMul", ["A", "B"], ["C"]), TensorProto.FLOAT
        out_type = TensorProto.FLOAT
    elif precision == "int8":
        a = rng.integers(0, 256, (n, n), dtype=np.uint8)
        b = numpy_helper.from_array(rng.integers(-127, 128, (n, n), dtype=np.int8), "B")
        node, a_type = helper.make_node("MatMulInteger", ["A", "B"], ["C"]), TensorProto.UINT8
        out_type = TensorProto.INT32
    else:
        raise ValueError(f"precision {precision!r}: fp32 or int8")
    graph = helper.make_graph([node], "gemm", [helper.make_tensor_value_info("A", a_type, [n, n])],
                              [helper.make_tensor_value_info("C", out_type, [n, n])], [b])
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(helper.make_model(graph).SerializeToString(), options,
                                           providers=["CPUExecutionProvider"])
    times = []
    for _ in range(13):
        start = time.perf_counter()
        session.run(None, {"A": a})
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / statistics.median(times[3:]) / 1e9
