"""`make test-gpu` (pytest -m gpu tests/gpu) writes gpu-report.md: the machine (TensorRT,
CUDA driver, bindings, GPU), what ran and how it ended, and the figures the engine tests
record through the `gpu_report` fixture (AP and latency of each engine against PyTorch and
against the ONNX file it was built from). conftest.py registers the hooks and the fixture."""
import platform
import time
from pathlib import Path

import pytest

REPORT = Path(__file__).resolve().parents[1] / "gpu-report.md"


class Report:
    def __init__(self):
        self.outcomes: dict[str, tuple[str, str]] = {}
        self.rows: list[dict] = []

    def add(self, **row) -> None:
        """One engine's figures (keys: engine, precision, AP, AP_onnx, AP_pytorch, max_abs_vs_onnx, p50_ms, ...)."""
        self.rows.append(row)


_REPORT = Report()


@pytest.fixture(scope="session")
def gpu_report() -> Report:
    return _REPORT


def pytest_runtest_logreport(report):
    if "tests/gpu/" not in report.nodeid.replace("\\", "/"):
        return
    if report.when == "call" or report.outcome != "passed":
        reason = report.longrepr[2] if report.skipped and isinstance(report.longrepr, tuple) else ""
        if report.failed:
            reason = str(report.longrepr).strip().splitlines()[-1][:200]
        _REPORT.outcomes[report.nodeid] = (report.outcome, reason)


def _machine() -> list[str]:
    lines = [f"- date: {time.strftime('%Y-%m-%d %H:%M')}; Python {platform.python_version()}, {platform.machine()}"]
    probes = {
        "TensorRT": lambda: __import__("tensorrt").__version__,
        "Polygraphy": lambda: __import__("polygraphy").__version__,
        "GPU": lambda: "{gpu} (sm {compute_capability})".format(**__import__("detr_edge.runtime.cuda", fromlist=["x"]).device_info()),
        "CUDA driver": _driver,
        "cuda-python": lambda: __import__("cuda.bindings", fromlist=["x"]).__version__,
        "pycuda": lambda: __import__("pycuda").VERSION_TEXT,
        "onnxruntime": lambda: "{} ({})".format(__import__("onnxruntime").__version__,
                                                ", ".join(__import__("onnxruntime").get_available_providers())),
        "torch": lambda: "{} (CUDA {})".format(__import__("torch").__version__, __import__("torch").version.cuda),
    }
    for name, probe in probes.items():
        try:
            value = probe()
        except Exception as exc:  # not installed, no device: say so
            value = f"not available ({type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''})"
        lines.append(f"- {name}: {value}")
    return lines


def _driver() -> str:
    from detr_edge.runtime.cuda import _cudart
    _, version = _cudart().cudaDriverGetVersion()
    return f"supports CUDA {version // 1000}.{version % 1000 // 10}"


def pytest_sessionfinish(session, exitstatus):
    if session.config.getoption("markexpr") != "gpu" or not _REPORT.outcomes:
        return  # only `make test-gpu` writes the report
    lines = ["# detr-edge GPU suite", "", "## Machine", *_machine(), "", "## What ran", "",
             "| test | outcome | note |", "| --- | --- | --- |"]
    lines += [f"| {nodeid.split('tests/gpu/')[-1]} | {outcome} | {note} |"
              for nodeid, (outcome, note) in _REPORT.outcomes.items()]
    if _REPORT.rows:
        keys = list(_REPORT.rows[0])
        lines += ["", "## Engines against PyTorch and against their ONNX files", "",
                  "| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
        lines += ["| " + " | ".join(f"{row.get(k):.4g}" if isinstance(row.get(k), float) else str(row.get(k))
                                    for k in keys) + " |" for row in _REPORT.rows]
    REPORT.write_text("\n".join(lines) + "\n")
    print(f"\nreport: {REPORT}")
