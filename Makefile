# make demo: train the default experiment (config.yaml) on data/, then generate.   make test: the test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: demo test clean

# the core dependencies, and matplotlib for the loss curve: all the demo needs
$(VENV)/.core: requirements.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) -r requirements.txt matplotlib
	touch $@

# the tests also cover the optional features: Parquet, datasets and .zst data, LoRA, exports (and onnxruntime-genai on the ONNX one), serving (and lm-evaluation-harness against it), TRL's DPO loss, the trackers (TensorBoard, W&B, trackio, MLflow), and the chat page in a real browser (selenium with Debian's Chromium, where apt-get may install it)
$(VENV)/.installed: $(VENV)/.core
	$(PIP) pytest pytest-xdist pyarrow datasets zstandard peft onnx onnxruntime onnxscript onnxruntime-genai==0.18.0 gguf fastapi uvicorn openai "lm-eval[api]==0.4.13" trl==1.16.0 tensorboard wandb trackio mlflow selenium
	command -v chromedriver >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } || echo "no Chromium (apt-get install chromium chromium-driver): the chat page's tests will be skipped"
	touch $@

# --overwrite: a second `make demo` replaces the previous demo run in out/ (TRAIN.py refuses otherwise)
demo: $(VENV)/.core
	$(PY) TRAIN.py --overwrite
	$(PY) INFER.py --model out --prompt "Elizabeth" --max-new-tokens 60 --seed 1

test: $(VENV)/.installed
	$(PY) -m pytest -q -rs -n 2 --dist loadfile tests   # -rs: name skipped tests and why; -n 2: two workers, a file each

clean:
	rm -rf $(VENV) out
