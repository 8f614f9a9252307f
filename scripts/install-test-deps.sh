#!/usr/bin/env bash
# Debian packages the test-suite needs beyond the venv: GStreamer's RTSP server, run by
# /usr/bin/python3 (tests/rtsp_server.py) so a test can stop and restart a live camera
# stream. Idempotent: returns at once when the server's elements already import.
set -euo pipefail

PACKAGES=(python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base gstreamer1.0-plugins-good)

have_server() {
    /usr/bin/python3 - <<'PY' 2>/dev/null
import gi
gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import Gst, GstRtspServer  # noqa: F401
Gst.init(None)
missing = [e for e in ("videotestsrc", "videoconvert", "jpegenc", "rtpjpegpay")
           if Gst.ElementFactory.find(e) is None]
raise SystemExit(1 if missing else 0)
PY
}

have_server && exit 0

why=""
[ "$EUID" = 0 ] || why="not root"
command -v apt-get >/dev/null || why="${why:+$why, }no apt-get"
if [ -n "$why" ]; then
    echo "install-test-deps: missing Debian packages ${PACKAGES[*]} and cannot install them ($why); the RTSP tests will fail"
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
install() { apt-get install -y -q --no-install-recommends "${PACKAGES[@]}"; }
install || { apt-get update -q && install; }
have_server || { echo "install-test-deps: installed ${PACKAGES[*]} but GstRtspServer still does not load" >&2; exit 1; }
