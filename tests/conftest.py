import os
import sys
from pathlib import Path

import pytest

from gpu_report import gpu_report, pytest_runtest_logreport, pytest_sessionfinish  # noqa: F401 (hooks, fixture)

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
COCO_TINY = SHARED_DATA / "coco-tiny"
sys.path.insert(0, str(ROOT))
# the trained model of `make demo` (absent from a fresh clone: the tests that need it skip)
DEMO_CHECKPOINT = Path(os.environ.get("DETR_EDGE_DEMO_CHECKPOINT", ROOT / "demo-out" / "train" / "best.pth"))
DEMO_MISSING = (f"no demo model at {DEMO_CHECKPOINT}: `make demo` trains it (15 min), or set "
                "DETR_EDGE_DEMO_CHECKPOINT")
needs_demo_model = pytest.mark.skipif(not DEMO_CHECKPOINT.exists(), reason=DEMO_MISSING)

# prelude of subprocess scripts that prove the runtime needs no torch: importing it fails
NO_TORCH = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'torchvision'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
"""


@pytest.fixture(scope="session")
def coco_photos():
    """Real COCO photos (../shared/data); skipped with a reason in a bare clone."""
    photos = sorted((COCO_TINY / "val2017").glob("*.jpg"))
    if not photos:
        pytest.skip(f"real data not present at {COCO_TINY} (../shared/data is beside CI's clone only)")
    return photos


@pytest.fixture(scope="session")
def photos_by_aspect(coco_photos):
    """Real photos of clearly different aspect ratios: widest, tallest, squarest."""
    import cv2
    sized = [(p, cv2.imread(str(p)).shape[:2]) for p in coco_photos]
    ratio = {p: w / h for p, (h, w) in sized}
    ordered = sorted(ratio, key=ratio.get)
    squarest = min(ratio, key=lambda p: abs(ratio[p] - 1))
    return [ordered[-1], ordered[0], squarest]


def small_config():
    """The small DETR of the stage tests: 5 classes (the shapes' ids 1..4), 12 queries."""
    from detr_edge.train.config import DETRConfig
    return DETRConfig(backbone="resnet18", hidden_dim=64, nheads=4, enc_layers=2, dec_layers=2,
                      dim_feedforward=128, num_queries=12, num_classes=5, dropout=0.0)


def sharp_model(config, seed: int = 0):
    """A random DETR whose class head is sharpened, so scores spread over 0..1 and a good
    share of queries pass 0.5 (a fresh head scores every query near 1/K)."""
    import torch
    from detr_edge.train.detr import DETR
    torch.manual_seed(seed)
    model = DETR(config).eval()
    with torch.no_grad():
        model.class_embed.weight.mul_(25.0)
        model.class_embed.bias[-1] = -2.0
    return model


# The GPU suite (tests/gpu): marked `gpu` and skipped, with the reason, where there is no
# CUDA device, or no TensorRT for the tests marked `tensorrt`. `make test-gpu` installs the
# tensorrt extra and runs it.
def _cuda_unavailable() -> str | None:
    try:
        from detr_edge.runtime.cuda import device_info
        device_info()
    except Exception as exc:  # no driver, no device, no CUDA Python binding
        return f"no usable CUDA device ({str(exc).splitlines()[0][:120]})"
    return None


def _tensorrt_unavailable() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT is not installed (pip install 'detr-edge[tensorrt]'; Jetson: python3-libnvinfer)"
    return None


def pytest_collection_modifyitems(config, items):
    gpu = [item for item in items if "tests/gpu/" in str(item.fspath).replace("\\", "/")]
    if not gpu:
        return
    no_cuda = _cuda_unavailable()
    no_tensorrt = _tensorrt_unavailable()
    for item in gpu:
        item.add_marker(pytest.mark.gpu)
        reason = no_tensorrt if item.get_closest_marker("tensorrt") else None
        if reason or no_cuda:
            item.add_marker(pytest.mark.skip(reason=reason or no_cuda))
