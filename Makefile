# napari-histo-ai: the two commands of the README, and the checks they run.
#   make demo   create .venv, install everything, open napari with the sample slide
#   make test   create .venv if needed, install, run linters and the whole test suite

PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
# headless Chromium and pdftoppm: the report tests render the HTML and the PDF to images
REPORT_PACKAGES := chromium poppler-utils
# X server and the libraries Qt 6 / OpenGL need to draw napari (headless: under Xvfb)
APT_PACKAGES := xvfb xauth libxcb-icccm4 libxcb-keysyms1 libxcb-image0 libxcb-render-util0 \
	libxcb-xinerama0 libxcb-xkb1 libxcb-shape0 libxcb-randr0 libxcb-cursor0 libxkbcommon-x11-0 \
	libxkbcommon0 libegl1 libgl1 libglx-mesa0 libgl1-mesa-dri libdbus-1-3 libfontconfig1 \
	libglib2.0-0 $(REPORT_PACKAGES)

.PHONY: demo screenshot test lint unit fuzz bench apt install clean

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found (Python 3.11 is required)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# torch is pinned (==2.13.0) in pyproject: pip takes the CPU wheel, never a CUDA build
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[all]"
	touch $@

install: apt $(VENV)/.installed

# apt packages when we are root and they are missing (CI and fresh machines); else a hint
apt:
	@if dpkg -s $(APT_PACKAGES) >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing system packages for napari under Xvfb"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(APT_PACKAGES) >/dev/null; \
	else echo "note: not root; GUI tests need: apt-get install $(APT_PACKAGES)"; fi

lint: install
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/lint-imports
	$(BIN)/mypy

unit: install
	$(BIN)/python -m pytest

test: lint unit

fuzz: install
	$(BIN)/python scripts/fuzz_readers.py --cases 500

bench: install
	$(BIN)/python benchmarks/bench_read.py --generate .bench/slide-100k.tif

# interactive window where a display exists; headless: runs under Xvfb, saves .demo/demo.png
# (the model's nuclei are then made editable in "Review & correct"; store in .demo/annotations)
demo: install
	$(BIN)/python scripts/demo.py --review .demo/annotations

# refresh the README screenshot from the real app
screenshot: install
	$(BIN)/python scripts/demo.py --screenshot docs/images/demo.png
	$(BIN)/python scripts/demo.py --review $$(mktemp -d) --size 1800x1000 --delay 2 \
		--screenshot docs/images/review.png
	$(BIN)/python scripts/demo.py --model mitosis-fcn --review $$(mktemp -d) --retrain $$(mktemp -d) \
		--retrain-data ../shared/data/ami_br_mitosis --size 1800x1100 --delay 2 \
		--screenshot docs/images/retrain.png
	$(BIN)/python scripts/demo.py --model none --open-widget --size 1400x1000 --delay 2 \
		--screenshot docs/images/open.png
	rm -rf .demo/export
	$(BIN)/python scripts/demo.py --review $$(mktemp -d) --export .demo/export --size 1800x1000 \
		--delay 2 --screenshot docs/images/export.png
	rm -rf .demo/report
	$(BIN)/python scripts/demo.py --model mitosis-fcn --report .demo/report --size 1800x1100 \
		--delay 2 --screenshot docs/images/report.png
	chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
		--disable-background-networking --disable-component-update --disable-sync \
		--user-data-dir=$$(mktemp -d) --hide-scrollbars --window-size=1000,1500 \
		--screenshot=docs/images/report-page.png \
		file://$(CURDIR)/.demo/report/CMU-1-Small-Region.report.html

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis .demo .bench
