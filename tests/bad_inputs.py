"""The bad-input battery: commands a user gets wrong, each with the exit code and the one
line it must answer with, run for real in a fresh folder that must hold nothing new
afterwards but what the command is meant to leave (a failed gate's report).

tests/test_bad_inputs.py runs it and checks docs/bad-inputs.md against it;
`make bad-inputs-doc` (python tests/bad_inputs.py docs/bad-inputs.md) writes that page.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OPENCV_NOISE = ("[ WARN", "[ERROR", "[ INFO", "OpenCV(", "> VIDEOIO")


@dataclass
class Case:
    what: str                      # what the user did
    args: list[str]                # detr-edge's arguments; {placeholders} from the models and the setup
    code: int                      # the exit code it must give
    message: str                   # a part of the one line it must print
    setup: callable = None         # (work folder) -> extra placeholders
    may_leave: tuple = ()          # files the command is meant to write (a failed gate's report)
    left_is: str = "the verdict"   # what those files are, as the page says


def _photo(work: Path, name: str, height: int, width: int) -> None:
    cv2.imwrite(str(work / name), np.full((height, width, 3), 127, np.uint8))


def _unreadable(work: Path) -> dict:
    (work / "photos").mkdir()
    for name in ("a.jpg", "b.png"):
        (work / "photos" / name).write_bytes(b"not an image at all\n" * 10)
    return {}


def _tiny_png(work: Path) -> dict:
    (work / "photos").mkdir()
    _photo(work / "photos", "dot.png", 1, 1)
    return {}


def _huge_jpeg(work: Path) -> dict:
    (work / "photos").mkdir()
    _photo(work / "photos", "huge.jpg", 9000, 12000)
    return {}


def _text_as_video(work: Path) -> dict:
    (work / "notes.mp4").write_text("not a video at all\n" * 100)
    return {}


def _silent_server(work: Path) -> dict:
    """A TCP server that accepts and never answers: a camera that hangs."""
    server = socket.create_server(("127.0.0.1", 0))
    held = []
    threading.Thread(target=lambda: [held.append(server.accept()) for _ in iter(int, 1)], daemon=True).start()
    return {"port": str(server.getsockname()[1]), "_keep": (server, held)}


def _images(work: Path) -> dict:
    (work / "images").mkdir()
    for i, (height, width) in enumerate([(240, 320), (300, 200)]):
        _photo(work / "images", f"{i}.png", height, width)
    return {}


def _folder(work: Path) -> dict:
    (work / "out").mkdir()
    return {}


REPORT = ("check/report.json", "check/report.md", "check/deltas.png")

CASES = [
    Case("a source that does not exist", ["run", "{onnx}", "nothing.mp4", "--save", "o.mp4"], 2,
         "no such file or folder"),
    Case("a text file named .mp4", ["run", "{onnx}", "notes.mp4", "--save", "o.mp4"], 2,
         "cannot open it as a video", _text_as_video),
    Case("a camera that is not there", ["run", "{onnx}", "7", "--save", "o.mp4"], 2, "camera 7 not found"),
    Case("an RTSP server that accepts and stays silent",
         ["run", "{onnx}", "rtsp://127.0.0.1:{port}/cam", "--timeout", "2", "--jsonl", "o.jsonl"], 2,
         "timed out after 2 s", _silent_server),
    Case("a folder of only unreadable images", ["run", "{onnx}", "photos", "--save", "o.mp4", "--jsonl", "o.jsonl"],
         2, "no readable image (none of its 2 image files)", _unreadable),
    Case("a 1x1 PNG with --save", ["run", "{onnx}", "photos", "--save", "o.mp4"], 2, "too small", _tiny_png),
    Case("a 12000x9000 JPEG with --save", ["run", "{onnx}", "photos", "--save", "o.mp4"], 2, "too large",
         _huge_jpeg),
    Case("--jsonl naming a folder", ["run", "{onnx}", "images", "--jsonl", "out"], 2, "a folder, not a file name",
         lambda work: {**_images(work), **_folder(work)}),
    Case("--conf 1.5", ["run", "{onnx}", "images", "--conf", "1.5", "--jsonl", "o.jsonl"], 2, "in (0, 1]", _images),
    Case("--timeout 0", ["run", "{onnx}", "rtsp://127.0.0.1:9/cam", "--timeout", "0"], 2, "more than 0"),
    Case("two of three sources missing (the third runs to its end)",
         ["run", "{onnx}", "images", "nothing.mp4", "7", "--jsonl", "o.jsonl"], 1,
         "2 of 3 sources failed: ", _images, ("o.jsonl",), "the running source's detections"),
    Case("--strict and a source missing", ["run", "{onnx}", "images", "nothing.mp4", "--strict", "--jsonl", "o.jsonl"],
         2, "(--strict: every source must open)", _images),
    Case("--save naming a file with two sources", ["run", "{onnx}", "images", "images", "--save", "o.mp4"], 2,
         "a folder (one video per source)", _images),
    Case("--sources naming no file", ["run", "{onnx}", "--sources", "cameras.txt"], 2, "No such file"),
    Case("run --triton where no server answers", ["run", "--triton", "127.0.0.1:9", "detr", "images", "--timeout", "2"],
         2, "no Triton server answers there", _images),
    Case("serve a folder that is not a model repository", ["serve", "images"], 2, "not a Triton model repository",
         _images),
    Case("bench --streams 0", ["bench", "{onnx}", "--source", "images", "--streams", "0"], 2, "stream counts",
         _images),
    Case("a model without metadata", ["run", "{bare}", "images", "--save", "o.mp4"], 2, "metadata", _images),
    Case("a model whose metadata disagrees with its input", ["run", "{resized}", "images", "--save", "o.mp4"], 2,
         "256", _images),
    Case("check: a checkpoint and an ONNX file of other class counts",
         ["check", "{other_classes}", "--against", "{onnx}", "--data", "images", "--out", "check"], 2, "not the same model",
         _images),
    Case("check: a reference that detects nothing at --conf (random weights)",
         ["check", "{random}", "--against", "{random_fp16}", "--data", "images", "--out", "check"], 1,
         "(inconclusive: the reference makes no detection",
         _images, REPORT),
    Case("check: no reference", ["check", "--against", "{onnx}", "--data", "images"], 2, "needs one reference",
         _images),
]


def make_models(root: Path) -> dict:
    """The files the cases name: a small sharp model (ONNX, also without metadata and with
    metadata that disagrees with its input), a checkpoint of another class count, and a
    random-weight model that detects nothing, with its FP16 file."""
    import onnx
    import torch

    from conftest import sharp_model, small_config
    from detr_edge.cli import main
    from detr_edge.runtime.metadata import read_onnx_metadata, write_onnx_metadata
    from detr_edge.train.checkpoint import save_checkpoint
    from detr_edge.train.config import checkpoint_config
    from detr_edge.train.detr import DETR

    config = small_config()
    paths = {name: root / file for name, file in
             [("ckpt", "model.pth"), ("onnx", "model.onnx"), ("bare", "no-metadata.onnx"),
              ("resized", "says-256.onnx"), ("other_classes", "9-classes.pth"), ("random", "random.pth"),
              ("random_fp16", "random.fp16.onnx")]}
    save_checkpoint(paths["ckpt"], sharp_model(config), checkpoint_config(config, (128, 160), None))
    assert main(["export", str(paths["ckpt"]), "--out", str(paths["onnx"])]) == 0
    graph = onnx.load(str(paths["onnx"]))
    meta = read_onnx_metadata(graph, paths["onnx"])
    meta["preprocess"]["imgsz"] = [256, 256]
    write_onnx_metadata(graph, meta)
    onnx.save(graph, str(paths["resized"]))
    del graph.metadata_props[:]
    onnx.save(graph, str(paths["bare"]))
    other = dataclasses.replace(config, num_classes=9)
    save_checkpoint(paths["other_classes"], sharp_model(other), checkpoint_config(other, (128, 160), None))
    torch.manual_seed(0)
    save_checkpoint(paths["random"], DETR(config).eval(), checkpoint_config(config, (128, 160), None))
    assert main(["export", str(paths["random"]), "--precision", "fp16", "--out", str(root / "random.onnx")]) == 0
    return {name: str(path) for name, path in paths.items()}


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def run_case(case: Case, models: dict) -> dict:
    """Run one case in a fresh folder; what it printed, its exit code, what it left."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        context = (case.setup or (lambda work: {}))(work)
        before = _files(work)
        args = [a.format(**models, **context) for a in case.args]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("OPENCV_LOG_LEVEL", None)  # what a user gets by default
        proc = subprocess.run([sys.executable, "-m", "detr_edge", *args], cwd=work, capture_output=True, text=True,
                              timeout=120, env=env)
        left = sorted(_files(work) - before)
    lines = proc.stderr.splitlines()
    said = [line for line in lines if line.startswith("detr-edge:")]
    # as the page shows it: model files by their names, a port as PORT
    shown = {value: Path(value).name if key in models else key.upper()
             for key, value in {**models, **context}.items() if isinstance(value, str)}

    def show(text: str) -> str:
        for value in sorted(shown, key=len, reverse=True):
            text = text.replace(value, shown[value])
        return text.replace("|", "\\|")
    return {"case": case, "code": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr, "line": said[-1] if said else "",
            "said": said, "noise": [line for line in lines if line.startswith(OPENCV_NOISE)],
            "traceback": "Traceback" in proc.stderr, "left": left,
            "command": show("detr-edge " + " ".join(args)), "message": show(said[-1] if said else "")}


def markdown(results: list[dict]) -> str:
    rows = ["| what the user did | command | exit | message | left behind |", "|---|---|---|---|---|"]
    for r in results:
        left = ", ".join(r["left"]) + f" ({r['case'].left_is})" if r["left"] else "nothing"
        rows.append(f"| {r['case'].what} | `{r['command']}` | {r['code']} | {r['message']} | {left} |")
    return ("# Bad input: one line, a distinct exit code, nothing left behind\n\n"
            "Written by `make bad-inputs-doc` (tests/bad_inputs.py), which runs each command in a fresh "
            "folder; tests/test_bad_inputs.py runs the same battery and fails when this page differs from "
            "what the commands print. Exit codes: 0 done, 1 an artifact failed its gate (or the verdict is "
            "inconclusive; or some of several sources failed while the others ran), 2 bad input or a mismatch, 130 Ctrl-C, 143 SIGTERM. Model files are the small "
            "models the battery makes; ports and folders are its own.\n\n" + "\n".join(rows) + "\n")


def main(out: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        models = make_models(Path(tmp))
        page = markdown([run_case(case, models) for case in CASES])
    Path(out).write_text(page)
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "tests"))
    main(sys.argv[1] if len(sys.argv) > 1 else "docs/bad-inputs.md")
