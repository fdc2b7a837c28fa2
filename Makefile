VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
REALDATA ?= .cache/realdata

.PHONY: setup demo test lint bench clean orthanc bart dicom3tools chromium screenshots audit realdata test-servers

setup: $(STAMP)

LOCKS := deploy/docker/requirements.lock deploy/docker/requirements-test.lock

# The same pins as the images (scripts/lock.py writes them); torch's wheel is chosen apart.
$(STAMP): pyproject.toml $(LOCKS)
	python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install $(addprefix -r ,$(LOCKS))
	$(PY) -m pip install --no-deps -e .
	$(PY) -m pip check
	touch $(STAMP)

orthanc:  # the test PACS; without it the PACS tests skip and say why
	bash scripts/install-orthanc.sh || echo "warning: Orthanc could not be installed; PACS tests will skip"

realdata: setup  # real CT/MR slices from Debian packages, once (docs/data.md); without them the real-data tests skip
	@if [ -f $(REALDATA)/sources.json ]; then echo "real data: $(REALDATA) (already fetched)"; \
	else PYTHON=$(PY) bash scripts/fetch-training-data.sh --dest $(REALDATA) || echo "warning: no real data could be fetched; real-data tests will skip"; fi

bart:  # BART's ecalib, the external cross-check of our ESPIRiT maps; without it that test skips
	bash scripts/install-deb.sh bart bart || echo "warning: BART could not be installed; the ecalib cross-check will skip"

dicom3tools:  # dciodvfy, the DICOM validator the export tests run; without it they skip
	bash scripts/install-deb.sh dciodvfy dicom3tools || echo "warning: dicom3tools could not be installed; DICOM validation tests will skip"

test-servers:  # redis-server and PostgreSQL for the tests' own throwaway servers (tests/servers.py); without them those tests skip
	bash scripts/install-deb.sh redis-server redis-server || echo "warning: redis-server could not be installed; Redis tests will skip"
	@command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || bash scripts/install-deb.sh pg_ctlcluster postgresql || echo "warning: PostgreSQL could not be installed; PostgreSQL tests will skip"

chromium:  # headless browser for the console's end-to-end tests; without it they skip
	bash scripts/install-chromium.sh || echo "warning: Chromium could not be installed; console tests will skip"

screenshots: setup chromium  # docs/ui/*.png from the console test, on a phantom with ct-default
	SCORERECON_SCREENSHOTS=docs/ui $(PY) -m pytest -q tests/ui

demo: setup
	$(PY) -m service.demo --out out

test: setup test-servers orthanc bart dicom3tools chromium realdata
	$(PY) -m ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	$(PY) benchmarks/operators.py
	$(PY) benchmarks/baselines.py
	$(PY) benchmarks/phantoms.py
	$(PY) benchmarks/training.py
	$(PY) benchmarks/priors.py
	$(PY) benchmarks/quality.py
	$(PY) benchmarks/quality_real.py
	$(PY) benchmarks/warm_start.py --write-card
	$(PY) benchmarks/larger_images.py --write-card
	$(PY) benchmarks/mri_multicoil.py
	$(PY) benchmarks/speed.py
	$(PY) benchmarks/volume.py
	$(PY) benchmarks/volume_gateway.py
	$(PY) benchmarks/priors_compare.py
	$(PY) benchmarks/reliability.py
	$(PY) benchmarks/gateway.py
	$(PY) benchmarks/queue_latency.py

audit: setup  # bandit on our code, pip-audit on the environment (needs PyPI's JSON API); docs/security.md
	$(VENV)/bin/bandit -q -r models service workers -ll
	$(VENV)/bin/pip-audit --progress-spinner off

clean:
	rm -rf $(VENV) out
