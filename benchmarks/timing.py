"""Side-by-side latency on a shared, noisy machine: the contenders take turns in blocks of
consecutive runs, so the machine's noise hits all alike, and each block's first runs are
dropped. Alternating run by run is wrong for short models: onnxruntime's (and OpenMP's)
worker threads spin for milliseconds after a run returns, competing with the next
contender on a 2-core machine, and one model's weights evict the other's from the cache.
Measured on a 5 ms model after a turn of another: its first four runs took 9 ms (about
40 ms of the other's spinning), then 4.8 ms; alternated run by run, a 9 ms model took
17 ms. So each turn first runs untimed for `settle` seconds."""
import statistics
import time
from typing import Callable


def interleaved(contenders: dict[str, Callable[[], object]], iters: int, block: int = 10,
                settle: float = 0.1) -> dict[str, list[float]]:
    """`iters` timed runs (seconds) of each contender, taken in turns of `block` timed runs,
    each turn after untimed runs for `settle` seconds (one at least)."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    while any(len(t) < iters for t in times.values()):
        for name, run in contenders.items():
            turn = time.perf_counter()
            run()
            while time.perf_counter() - turn < settle:
                run()
            for _ in range(min(block, iters - len(times[name]))):
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    return times


def describe(seconds: list[float]) -> str:
    ms = [t * 1000 for t in seconds]
    return f"median {statistics.median(ms):8.1f} ms  (min {min(ms):.1f}, max {max(ms):.1f})"
