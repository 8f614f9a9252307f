"""Every case of the bad-input battery (tests/bad_inputs.py) ends in one line that names the
cause, its exit code, no traceback, no OpenCV noise and nothing left behind; and
docs/bad-inputs.md is what the battery prints."""
from pathlib import Path

import pytest

import bad_inputs

DOC = Path(__file__).resolve().parents[1] / "docs" / "bad-inputs.md"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return bad_inputs.make_models(tmp_path_factory.mktemp("battery"))


@pytest.fixture(scope="module")
def results(models):
    return [bad_inputs.run_case(case, models) for case in bad_inputs.CASES]


@pytest.mark.parametrize("index", range(len(bad_inputs.CASES)), ids=[c.what for c in bad_inputs.CASES])
def test_each_bad_input_gets_one_clear_line(results, index):
    result = results[index]
    case = result["case"]
    assert result["code"] == case.code, result["stderr"]
    assert case.message in result["line"], result["stderr"]
    assert not result["traceback"] and not result["noise"], result["stderr"]
    if case.code == 2:
        errors = [line for line in result["said"] if line.startswith("detr-edge: error:")]
        assert errors == [result["line"]], result["stderr"]
    assert set(result["left"]) <= set(case.may_leave), result["left"]


def test_the_page_is_what_the_battery_prints(results):
    assert DOC.read_text() == bad_inputs.markdown(results), "docs/bad-inputs.md is stale: make bad-inputs-doc"


def test_allow_empty_passes_a_reference_without_detections_and_says_so(models):
    """The same file as the inconclusive case, accepted on the other criteria, the reason in the verdict
    (the console's table is report.md's)."""
    args = ["check", "{random}", "--against", "{random_fp16}", "--data", "images", "--out", "check", "--allow-empty"]
    result = bad_inputs.run_case(bad_inputs.Case("", args, 0, "", bad_inputs._images), models)
    assert result["code"] == 0, result["stderr"]
    assert "| pass (the reference makes no detection at score >= 0.5" in result["stdout"]
