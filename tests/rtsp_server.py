"""A live RTSP camera for the tests: `/usr/bin/python3 tests/rtsp_server.py PORT [PATH]`.

Serves a moving test picture (videotestsrc pattern=ball, 320x240 at 30 fps) as MJPEG over
RTP at rtsp://127.0.0.1:PORT/PATH and prints 'ready' once it listens; exits on SIGTERM or
SIGINT. It uses GStreamer's RTSP server (Debian: gir1.2-gst-rtsp-server-1.0, python3-gi),
hence Debian's python rather than the venv's: ffmpeg's RTSP listen mode cannot serve PLAY
clients, and a test of reconnection needs a server it can stop and start mid-stream.
MJPEG because every frame is a key frame: a client that (re)connects decodes its first
packet, with no wait for an H.264 IDR, and needs no encoder from plugins-ugly.
"""
import signal
import sys

try:
    import gi
    gi.require_version("Gst", "1.0")
    gi.require_version("GstRtspServer", "1.0")
    from gi.repository import GLib, Gst, GstRtspServer
except (ImportError, ValueError) as exc:
    sys.exit(f"rtsp_server: {exc}: needs Debian's python3-gi and gir1.2-gst-rtsp-server-1.0"
             " (bash scripts/install-test-deps.sh)")

PIPELINE = ("( videotestsrc is-live=true pattern=ball"
            " ! video/x-raw,width=320,height=240,framerate=30/1"
            " ! videoconvert ! video/x-raw,format=I420"  # rtpjpegpay takes 4:2:0 or 4:2:2 only
            " ! jpegenc quality=85 ! rtpjpegpay name=pay0 pt=26 )")
ELEMENTS = {"videotestsrc": "gstreamer1.0-plugins-base", "videoconvert": "gstreamer1.0-plugins-base",
            "jpegenc": "gstreamer1.0-plugins-good", "rtpjpegpay": "gstreamer1.0-plugins-good"}


def main(port: int, path: str = "stream") -> None:
    Gst.init(None)
    for element, package in ELEMENTS.items():
        if Gst.ElementFactory.find(element) is None:
            sys.exit(f"rtsp_server: no GStreamer element {element}: needs Debian's {package}"
                     " (bash scripts/install-test-deps.sh)")
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(port))
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(PIPELINE)
    factory.set_shared(True)  # one pipeline for all clients
    server.get_mount_points().add_factory("/" + path.strip("/"), factory)
    if server.attach(None) == 0:
        sys.exit(f"rtsp_server: cannot listen on 127.0.0.1:{port}")

    loop = GLib.MainLoop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, sig, loop.quit)
    print("ready", flush=True)
    loop.run()


if __name__ == "__main__":
    if not 2 <= len(sys.argv) <= 3:
        sys.exit(__doc__.splitlines()[0])
    main(int(sys.argv[1]), *sys.argv[2:])
