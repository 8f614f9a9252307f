# Two commands do all set-up from a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO   := demo-out
DEMO_MINUTES ?= 15

.PHONY: demo test test-gpu venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[train,export,dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

# the GPU suite (tests/gpu): needs an NVIDIA GPU. The tensorrt extra brings TensorRT and
# pycuda (built from source against CUDA); where pycuda cannot build, cuda-python instead.
test-gpu: $(STAMP)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[tensorrt]" || \
	    $(PY) -m pip install --quiet tensorrt cuda-python
	$(PY) -m pytest -q -rs -m gpu tests/gpu

demo: $(STAMP)
	$(PY) -m export.demo --out $(DEMO) --minutes $(DEMO_MINUTES)

clean:
	rm -rf $(VENV) $(DEMO)
