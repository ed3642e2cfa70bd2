# Two commands: `make serve` and `make test`. Everything else is set up on demand.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
BENCH_STAMP := $(VENV)/.bench-stamp

.PHONY: serve test bench soak clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# Silero VAD's wheel pins torch, which it does not need: its ONNX model runs on onnxruntime.
	$(BIN)/python -m pip install --quiet onnxruntime && $(BIN)/python -m pip install --quiet --no-deps silero-vad
	@touch $(STAMP)

serve: $(STAMP)
	$(BIN)/turnline serve --host 127.0.0.1 --port 8787 --store sqlite:///turnline.db

test: $(STAMP)
	scripts/ensure-system-deps test
	$(BIN)/python -m pytest -q

# The bench extra (LangGraph's dev server, the real peer) is for `make bench` only.
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	@touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python -m bench

soak: $(STAMP)
	scripts/ensure-system-deps test
	$(BIN)/python -m pytest -q -m soak

clean:
	rm -rf $(VENV) .turnline .pytest_cache .hypothesis bench/results
