"""The benchmark scripts' timing helper: contenders take turns in blocks, each turn opening
with untimed settling runs, and each gets exactly the runs asked for."""
from benchmarks.timing import describe, interleaved


def test_contenders_take_turns_in_blocks_after_settling_runs():
    calls = []
    times = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, iters=5, block=2,
                        settle=0)
    assert {k: len(v) for k, v in times.items()} == {"a": 5, "b": 5}
    # settle=0 still opens each turn with one untimed run; the last turn is cut to what is left
    assert "".join(calls) == "aaa" "bbb" "aaa" "bbb" "aa" "bb"


def test_describe_reads_milliseconds():
    assert describe([0.003, 0.001, 0.002]) == "median      2.0 ms  (min 1.0, max 3.0)"
