# Two entry points that work on a fresh clone with only python3:
#   make demo   set up .venv if needed (the package and the TPU and GPU compilers), then run the seed scenario
#   make test   set up .venv if needed (the same plus the test tools), then lint (ruff) and run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PY_MIN := 3.11

.PHONY: demo test clean python-check

# Stop early, with the fix, on a Python older than the package requires (pyproject's requires-python).
python-check:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= tuple(map(int, "$(PY_MIN)".split("."))) else 1)' \
		|| { echo "moe-jax needs Python $(PY_MIN) or newer; '$(PYTHON)' is $$($(PYTHON) -V 2>&1). Run with a newer one: make $(MAKECMDGOALS) PYTHON=python$(PY_MIN)" >&2; exit 1; }

# One install stamp per command, re-made when the declared dependencies change.
# The demo needs the package and the compilers of the hardware it plans (libtpu, jax's CUDA plugin);
# the tests add the test tools (pytest, transformers and CPU torch for parity, hypothesis).
$(VENV)/.installed-demo: pyproject.toml | python-check
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[tpu,gpu]'
	@touch $@

$(VENV)/.installed-test: pyproject.toml | python-check
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,tpu,gpu]'
	@touch $@

# The seed scenario end to end (reports and plots in reports/): what each device holds, the
# compiled analysis of the seed's strategy, a search of all strategies for the same 1024
# devices with the seed's as baseline, the fewest devices that serve the same workload, and
# proof on 8 fake devices that the sharded program equals one device. The seed's GPU compiles
# for an H100 target (its own compiler, deviceless; see `moe-jax hardware`).
demo: $(VENV)/.installed-demo
	$(BIN)/moe-jax describe --model seed-30b --strategy meshes/ep64-tp8-pp2-dp1.toml \
		--batch 128 --prompt-len 2048 --gen-len 256
	@mkdir -p reports
	$(BIN)/moe-jax analyze --model seed-30b --mesh meshes/ep64-tp8-pp2-dp1.toml --hardware seed-gpu \
		--batch 128 --prompt-len 2048 --gen-len 256 --json reports/seed.json --markdown reports/seed.md
	$(BIN)/moe-jax plan --model seed-30b --devices 1024 --hardware seed-gpu --batch 128 --prompt-len 2048 \
		--gen-len 256 --baseline meshes/ep64-tp8-pp2-dp1.toml --json reports/plan-1024.json \
		--markdown reports/plan-1024.md
	$(BIN)/moe-jax plan --model seed-30b --devices 1024 --hardware seed-gpu --batch 128 --prompt-len 2048 \
		--gen-len 256 --objective cost --json reports/plan-fewest.json --markdown reports/plan-fewest.md
	$(BIN)/moe-jax verify --model tiny --strategy meshes/ep2-tp2-pp2-dp1.toml

# CI=true makes the GPU- and TPU-compile tests fail, not skip, when a compiler is missing.
test: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache reports .moe-jax-cache
