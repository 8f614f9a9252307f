# Two commands do all set-up from a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CLI    := $(VENV)/bin/detr-edge
DEMO   := demo-out
# A real photo when ../shared/data is beside the clone, otherwise a generated scene.
DEMO_IMAGE ?= $(firstword $(wildcard ../shared/data/coco-tiny/val2017/*.jpg))

.PHONY: demo test venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[train,export,dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) -m export.demo --out $(DEMO) $(if $(DEMO_IMAGE),--image $(DEMO_IMAGE))

clean:
	rm -rf $(VENV) $(DEMO)
