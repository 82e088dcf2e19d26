# Two commands on a fresh machine: `make demo` and `make test` (each sets up .venv first).
# The demo installs only groundcam and what it runs on; the tests add the dev extras (the page,
# a browser driver, the caption-metric reference).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: demo test setup docs clean

$(VENV)/.base: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed: $(VENV)/.base
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: $(VENV)/.base
	$(VENV)/bin/groundcam demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

# The documentation site (mkdocs.yml) into site/: the docs extra on top of the base install.
$(VENV)/.docs: $(VENV)/.base
	$(PY) -m pip install -q -e ".[docs]"
	touch $@

docs: $(VENV)/.docs
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

clean:
	rm -rf $(VENV) groundcam-demo groundcam-out site
