# Two commands do all set-up from a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO   := demo-out
DEMO_MINUTES ?= 15

.PHONY: demo test test-gpu venv clean bad-inputs-doc

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[train,export,calibration,dev]"
	# the Triton server of the serving tests (its Python package pins numpy<2; the server needs none of it)
	$(PY) -m pip install --quiet --no-deps -c constraints.txt nvidia-pytriton
	touch $(STAMP)

# install-test-deps.sh: Debian's GStreamer RTSP server, the live camera of the reconnection tests
test: $(STAMP)
	bash scripts/install-test-deps.sh
	$(PY) -m pytest -q tests

# the GPU suite (tests/gpu): needs an NVIDIA GPU. The tensorrt extra brings TensorRT,
# Polygraphy and cuda-python (pin it to the driver's CUDA major where the latest does not
# start: docs/jetson.md); where TensorRT cannot install, the CUDA-only tests still run.
# Writes gpu-report.md.
test-gpu: $(STAMP)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[tensorrt]" || \
	    $(PY) -m pip install --quiet polygraphy cuda-python
	$(PY) -m pytest -q -rs -m gpu tests/gpu

# docs/bad-inputs.md from a real run of the bad-input battery (tests/test_bad_inputs.py checks it)
bad-inputs-doc: $(STAMP)
	$(PY) tests/bad_inputs.py docs/bad-inputs.md

demo: $(STAMP)
	$(PY) -m detr_edge.demo --out $(DEMO) --minutes $(DEMO_MINUTES)

clean:
	rm -rf $(VENV) $(DEMO)
