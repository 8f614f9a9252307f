"""`detr-edge serve DEPLOY_DIR`: NVIDIA Triton Inference Server on DEPLOY_DIR/triton, here.

The server is the `tritonserver` binary inside NVIDIA's nvidia-pytriton wheel (Triton 2.51, NGC
24.10; it runs on a CPU-only machine). That wheel has the Python backend only, so the served
models are model.py files that import detr_edge.runtime (numpy, OpenCV, onnxruntime) from this
Python environment. Three things make that work without touching site-packages:

- the backend folder: Triton looks for the Python backend's stub (the process that runs model.py)
  beside libtriton_python.so, but the wheel ships one stub per Python version elsewhere, so we
  assemble backends/python from symlinks in a cache folder;
- PATH: the stub embeds Python in isolated mode (PYTHONPATH and PYTHONHOME are ignored) and finds
  its environment by looking up `python3` on PATH; this Python's bin folder first makes that this
  environment: its site-packages, .pth files and the editable install;
- LD_LIBRARY_PATH: this Python's libpython, or the loader picks the system's (another patch release
  under this environment's standard library), and the wheel's bundled libraries.

Install it without its dependencies: `pip install --no-deps nvidia-pytriton`. It pins numpy<2, which
OpenCV 5 and trackers cannot live with, and the server needs none of the Python packages it lists.

The served detector (runtime/triton_model.py) moves its tensors through DLPack: this stub's
numpy bridge predates numpy 2.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from detr_edge.runtime.errors import UserError

# NVIDIA's image with this package added (docs/serving.md: the stock image has no OpenCV or onnxruntime)
DOCKER_EXAMPLE = ("docker run --gpus all -p8000:8000 -p8001:8001 -p8002:8002 -v {repo}:/models "
                  "IMAGE tritonserver --model-repository=/models, IMAGE built FROM nvcr.io/nvidia/tritonserver:"
                  "25.01-py3 with detr-edge installed (docs/serving.md)")
# harmless on a machine without an NVIDIA driver; not the reason anything failed
_NOISE = ("CudaDriverHelper has not been initialized", "Failed to initialize NVML", "DCGM")


def tritonserver_command(repository, host: str = "127.0.0.1", http_port: int = 8000, grpc_port: int = 8001,
                         metrics_port: int = 8002,
                         shm_prefix: str | None = None) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """The argv and environment that start nvidia-pytriton's tritonserver on `repository`, bound to
    `host` (metrics too), and the repository's models it cannot run
    (name: the backend it lacks). `shm_prefix` names the Python backend's /dev/shm regions (a
    server that fails to start leaves them behind). Pure but for the symlinks it keeps in the
    cache folder (see `_backend_directory`)."""
    given, repository = Path(repository), Path(repository).resolve()  # messages name it as given
    if not repository.is_dir():
        raise UserError(f"no Triton model repository at {given}")
    dist = _pytriton_dist(repository)
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        have = sorted(p.name for p in (dist / "python_backend_stubs").iterdir())
        raise UserError(f"nvidia-pytriton has no Triton Python backend for Python {version} (it has {', '.join(have)})")
    load, skipped = servable(repository, {p.name for p in (dist / "backends").iterdir() if p.is_dir()})
    if not load and not skipped:
        raise UserError(f"{given}: not a Triton model repository (no MODEL/config.pbtxt; deploy --triton "
                        "writes one)")
    if not load:
        raise UserError(f"{given}: no model this tritonserver can run (it has the Python backend only; "
                        f"{', '.join(f'{k} needs {v}' for k, v in skipped.items())}): NVIDIA's tritonserver "
                        "container runs them, for example: " + DOCKER_EXAMPLE.format(repo=repository))
    argv = [str(dist / "bin" / "tritonserver"),
            f"--model-repository={repository}",
            # the wheel has the Python backend only: load the models it can run (the end-to-end detector)
            "--model-control-mode=explicit", *(f"--load-model={name}" for name in load),
            f"--backend-directory={_backend_directory(dist, stub)}",
            # our config.pbtxt files are complete; auto-completing runs an extra stub per model (~1 s each)
            "--disable-auto-complete-config",
            f"--http-address={host}", f"--http-port={http_port}",
            f"--grpc-address={host}", f"--grpc-port={grpc_port}"]
    if shm_prefix:
        argv.append(f"--backend-config=python,shm-region-prefix-name={shm_prefix}")
    argv += [f"--metrics-address={host}", f"--metrics-port={metrics_port}"]
    if not Path("/proc/driver/nvidia/version").exists():  # no driver: skip the failing NVML/DCGM probe
        argv.append("--allow-gpu-metrics=false")
    env = dict(os.environ)
    libs = [str(dist.parent.parent / "nvidia_pytriton.libs")]
    libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    if libdir and soname and (Path(libdir) / soname).exists():
        libs.append(libdir)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libs + [p for p in [env.get("LD_LIBRARY_PATH")] if p])
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable)] + [p for p in [env.get("PATH")] if p])
    return argv, env, skipped


PLATFORMS = {"onnxruntime_onnx": "onnxruntime", "tensorrt_plan": "tensorrt", "pytorch_libtorch": "pytorch"}


def servable(repository: Path, backends: set) -> tuple[list[str], dict[str, str]]:
    """The repository's models whose backend is among `backends`, and the others with the backend
    each needs (read from its config.pbtxt: `backend:` or `platform:`)."""
    load, skipped = [], {}
    for config in sorted(repository.glob("*/config.pbtxt")):
        text = config.read_text()
        backend = re.search(r'^\s*backend:\s*"([^"]+)"', text, re.M)
        platform = re.search(r'^\s*platform:\s*"([^"]+)"', text, re.M)
        needs = backend.group(1) if backend else PLATFORMS.get(platform.group(1) if platform else "", "an unknown backend")
        if needs in backends:
            load.append(config.parent.name)
        else:
            skipped[config.parent.name] = needs
    return load, skipped


def _pytriton_dist(repository: Path) -> Path:
    """site-packages/pytriton/tritonserver, found without importing pytriton (installed with
    --no-deps, its own imports fail)."""
    spec = importlib.util.find_spec("pytriton")
    locations = spec.submodule_search_locations if spec else None
    dist = Path(locations[0]) / "tritonserver" if locations else None
    if dist is None or not (dist / "bin" / "tritonserver").is_file():
        raise UserError("serving needs NVIDIA's tritonserver: pip install --no-deps nvidia-pytriton (Linux, glibc 2.35+, "
                        "runs on CPU); or, on a GPU machine, the NGC container, for example: "
                        + DOCKER_EXAMPLE.format(repo=repository))
    return dist


def _backend_directory(dist: Path, stub: Path) -> Path:
    """A backend folder whose python/ holds the wheel's Python backend and this Python's stub, as
    symlinks in the user's cache (one folder per stub path: per environment and Python version).
    Each link is replaced atomically, so concurrent servers may share the folder."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    key = hashlib.sha256(str(stub).encode()).hexdigest()[:12]
    python = cache / "detr-edge" / f"triton-backends-{key}" / "python"
    try:
        python.mkdir(parents=True, exist_ok=True)
        for source in (dist / "backends" / "python" / "libtriton_python.so",
                       dist / "backends" / "python" / "triton_python_backend_utils.py", stub):
            link = python / source.name
            if link.is_symlink() and os.readlink(link) == str(source):
                continue
            tmp = python / f".{source.name}.{os.getpid()}"
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            tmp.symlink_to(source)
            os.replace(tmp, link)
    except OSError as exc:
        raise UserError(f"cannot prepare the Triton backend folder {python.parent}: {exc.strerror} "
                        f"(set XDG_CACHE_HOME to a writable folder)") from None
    return python.parent


def _free_ports(host: str, n: int) -> list[int]:
    """n distinct ports free on host now (all held until all are chosen)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET))
                   for _ in range(n)]
        for s in sockets:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is no conflict
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise UserError(f"cannot bind {host}:{port}: {exc.strerror} (an address of this machine, 127.0.0.1 "
                            "or 0.0.0.0)") from None
        return True


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when our process dies (even by SIGKILL), so a crashed
    or killed detr-edge leaves no server holding its ports (it runs in its own session: a
    terminal's Ctrl-C reaches only us, and we stop it in order)."""
    _PRCTL(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def _reason(log: str, lines: int = 3) -> str:
    """The server's own error lines (Triton's E-lines, `error: ...`) in one line, else its last lines."""
    errors, last = [], []
    for line in log.splitlines():
        m = re.match(r'([IWE])\d{4} [\d:.]+\s+\d+ \S+\] "?(.*?)"?\s*$', line)  # Triton: L<mmdd> time tid file:line]
        text = (m.group(2) if m else line).split("\\n")[0].strip()[:300]  # model.py traceback: its exception line
        if not text or any(n in text for n in _NOISE):
            continue
        last.append(text)
        if (m and m.group(1) == "E" or text.lower().startswith("error:")) and text not in errors:
            errors.append(text)
    return "; ".join((errors or last)[-lines:]) or "no output"


class TritonServer:
    """A tritonserver process on a model repository, as a context manager:

        with TritonServer(repo).start() as server:      # free ports on 127.0.0.1
            client = tritonclient.http.InferenceServerClient(server.http_url)

    `http_url` and `grpc_url` are host:port, as tritonclient takes them. Its output goes to
    `log_path` (a file in a temporary folder unless `log_file` is given)."""

    def __init__(self, repository, host: str = "127.0.0.1", http_port: int | None = None,
                 grpc_port: int | None = None, metrics_port: int | None = None, log_file=None):
        self.repository = Path(repository)
        self.host = host
        try:
            free = iter(_free_ports(host, [http_port, grpc_port, metrics_port].count(None)))
        except OSError as exc:
            raise UserError(f"cannot bind {host}: {exc.strerror} (an address of this machine, 127.0.0.1 or 0.0.0.0)") \
                from None
        self.http_port = http_port or next(free)
        self.grpc_port = grpc_port or next(free)
        self.metrics_port = metrics_port or next(free)
        self.log_path = Path(log_file) if log_file else None
        self.models: list[str] = []
        self.skipped: dict[str, str] = {}  # models this server cannot run: the backend each needs
        self.version = ""
        self.proc: subprocess.Popen | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._shm_prefix = f"detr-edge-triton-{os.getpid()}-{os.urandom(4).hex()}-"

    @property
    def _address(self) -> str:
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)  # bound to all: ask loopback
        return f"[{host}]" if ":" in host else host

    @property
    def http_url(self) -> str:
        return f"{self._address}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self._address}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._address}:{self.metrics_port}/metrics"

    def start(self, timeout: float = 120.0) -> TritonServer:
        """Spawn the server and return once it and every model in the repository are ready;
        UserError with the server's reason if it exits first, has no model, or is not ready within
        `timeout` seconds. On any failure the server is stopped before the exception leaves."""
        if self.proc is not None:
            return self
        argv, env, self.skipped = tritonserver_command(self.repository, self.host, self.http_port, self.grpc_port,
                                                       self.metrics_port, self._shm_prefix)
        for port in (self.http_port, self.grpc_port, self.metrics_port):  # Triton would go on without metrics
            if not _port_free(self.host, port):
                raise UserError(f"port {port} on {self.host} is in use (another Triton server?): choose other ports")
        if self.log_path is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="detr-edge-triton-")
            self.log_path = Path(self._tmp.name) / "tritonserver.log"
        with open(self.log_path, "wb") as log:  # a file, not a pipe: nothing would drain a pipe
            self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=_die_with_parent if _PRCTL else None)
        try:
            self._wait_ready(timeout)
        except BaseException:  # a UserError, or Ctrl-C while the models load: leave no server behind
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self._ready():
            code = self.proc.poll()
            if code is not None or time.monotonic() > deadline:
                when = f"exited with code {code}" if code is not None else f"was not ready within {timeout:g} s"
                raise UserError(f"tritonserver on {self.repository} {when}: {_reason(self.log())}")
            time.sleep(0.1)
        failed = "\n".join(line for line in self.log().splitlines() if "failed to start" in line)
        if failed:  # the metrics service: Triton goes on without it
            raise UserError(f"tritonserver on {self.repository}: {_reason(failed)}")
        if not self.models:
            raise UserError(f"no models in the Triton model repository {self.repository}")

    def _ready(self) -> bool:
        """/v2/health/ready (strict readiness: the server and every loaded model), then the
        repository index: every model READY."""
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                if r.status != 200:
                    return False
            request = urllib.request.Request(f"http://{self.http_url}/v2/repository/index", data=b"{}")
            with urllib.request.urlopen(request, timeout=2) as r:
                index = json.load(r)
            with urllib.request.urlopen(f"http://{self.http_url}/v2", timeout=2) as r:
                self.version = json.load(r).get("version", "")
        except (OSError, ValueError):  # not listening yet, 400 (not ready), half-written answer
            return False
        loaded = [m for m in index if m["name"] not in self.skipped]
        if not loaded or not all(m.get("state") == "READY" for m in loaded):
            return False
        self.models = sorted({m["name"] for m in loaded})
        return True

    def log(self) -> str:
        """The server's output so far."""
        with contextlib.suppress(OSError, TypeError):
            return self.log_path.read_text(errors="replace")
        return ""

    def stop(self, timeout: float = 30.0) -> None:
        """SIGINT (Triton unloads the models, ending their stubs, and exits: ~2-4 s), SIGKILL to
        the whole process group after `timeout` seconds."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGINT)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    pass
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # the server if stuck; stubs a crashed one left
            self.proc.wait()
            self.proc = None
        for region in Path("/dev/shm").glob(self._shm_prefix + "*"):  # left by a server that failed to start
            with contextlib.suppress(OSError):
                region.unlink()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp, self.log_path = None, None

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(repository, host: str = "127.0.0.1", http_port: int = 8000, grpc_port: int = 8001,
          metrics_port: int = 8002, timeout: float = 120.0, log_file=None) -> None:
    """Run the server in the foreground until Ctrl-C or SIGTERM (raised as KeyboardInterrupt,
    after the server has stopped); UserError if it cannot start or exits by itself."""
    server = TritonServer(repository, host, http_port, grpc_port, metrics_port, log_file)
    own_sigterm = (threading.current_thread() is threading.main_thread()
                   and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)  # the CLI installs its own
    if own_sigterm:
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        with server.start(timeout):
            print(f"Triton Inference Server {server.version} serving {', '.join(server.models)} "
                  f"from {server.repository}", flush=True)
            print(f"  HTTP     http://{server.http_url}\n  gRPC     grpc://{server.grpc_url}   (detr-edge run --triton takes either URL)\n"
                  f"  metrics  {server.metrics_url}\n  log      {server.log_path}", flush=True)
            if server.skipped:
                print("  not served by this tritonserver (NVIDIA's container has their backends): "
                      + ", ".join(f"{k} ({v})" for k, v in server.skipped.items()), flush=True)
            print("Ctrl-C to stop", flush=True)
            code = server.proc.wait()
            raise UserError(f"tritonserver exited with code {code}: {_reason(server.log())}")
    finally:
        if own_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _interrupt(number, frame):
    raise KeyboardInterrupt
