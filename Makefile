# Two entry points that work on a fresh clone with only python3:
#   make demo   set up .venv if needed, then run the seed scenario
#   make test   set up .venv if needed, then run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test clean

# Re-install when the declared dependencies change.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,tpu]'
	@touch $(STAMP)

# The seed scenario end to end (reports and plots in reports/): what each device holds, the
# compiled analysis of the seed's strategy, a search of all strategies for the same 1024
# devices with the seed's as baseline, the fewest devices that serve the same workload, and
# proof on 8 fake devices that the sharded program equals one device.
demo: $(STAMP)
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

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache reports .moe-jax-cache
