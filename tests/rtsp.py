"""A real RTSP camera the tests can start, stop mid-stream and start again on the same port.

    with RtspServer() as server:        # rtsp://127.0.0.1:<free port>/stream
        cap = cv2.VideoCapture(server.url, cv2.CAP_FFMPEG)
        server.stop(); server.start()   # the camera drops and comes back

The server (tests/rtsp_server.py) is GStreamer's RTSP server, run by Debian's /usr/bin/python3
(the venv has no gi); `bash scripts/install-test-deps.sh` (run by `make test`) installs it.
"""
import selectors
import socket
import subprocess
import tempfile
from pathlib import Path

SERVER = Path(__file__).with_name("rtsp_server.py")
SYSTEM_PYTHON = "/usr/bin/python3"
PACKAGES = "python3-gi gir1.2-gst-rtsp-server-1.0"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RtspServer:
    def __init__(self, port: int | None = None, path: str = "stream"):
        self.port = port or free_port()
        self.path = path
        self.url = f"rtsp://127.0.0.1:{self.port}/{path}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 15.0) -> "RtspServer":
        """Spawn the server and return once it serves; RuntimeError (with its reason) if not."""
        if self.proc is not None:
            return self
        if not Path(SYSTEM_PYTHON).exists():
            raise RuntimeError(f"no {SYSTEM_PYTHON}: the RTSP test server needs Debian's python3 "
                               f"with {PACKAGES} (bash scripts/install-test-deps.sh)")
        log = tempfile.TemporaryFile("w+")  # not a pipe: nothing drains it while the server runs
        self.proc = subprocess.Popen([SYSTEM_PYTHON, str(SERVER), str(self.port), self.path],
                                     stdout=subprocess.PIPE, stderr=log, text=True)
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            line = self.proc.stdout.readline() if sel.select(timeout) else ""
        if line.strip() != "ready":
            self.stop()
            log.seek(0)
            reason = log.read().strip() or f"no 'ready' within {timeout:.0f} s"
            raise RuntimeError(f"RTSP test server did not start on port {self.port}: {reason}")
        return self

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within 5 s."""
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
        self.proc = None

    def __enter__(self) -> "RtspServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
