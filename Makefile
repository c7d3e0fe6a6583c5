# Two commands on a fresh machine: `make demo` (the whole job on the bundled sample) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of this version is what CI and the tests use; the GPU image brings its own torch.
TORCH_SPEC ?= torch==2.13.0
ARGS ?=
# The GPU image's torch (Dockerfile ARG TORCH_VERSION; tests/test_infra.py keeps the two equal), from
# PyPI: its CUDA 12.8 build, which imports and runs on CPU-only machines too (7.6 GB installed with
# its nvidia-* wheels). `make test-image-torch` runs the end-to-end, resume, reliability, Muon, loop and
# FSDP tests on it in a second venv, so what the image ships is what CI ran.
IMAGE_TORCH_SPEC ?= torch==2.9.1
# torchao (train.float8) is built for one torch: the image's (the gpu extra in pyproject.toml) is
# installed here, so tests/test_float8.py runs against what the image ships. The main venv has no
# torchao: transformers imports it whenever it is installed, and a torchao built for another torch
# prints warnings at every start.
IMAGE_TORCHAO_SPEC ?= torchao==0.15.0
IMAGE_VENV ?= .venv-image
IMAGE_PY := $(IMAGE_VENV)/bin/python
# One stamp per torch spec: changing IMAGE_TORCH_SPEC reinstalls torch in the same venv.
IMAGE_STAMP := $(IMAGE_VENV)/.installed-$(subst ==,-,$(IMAGE_TORCH_SPEC))
IMAGE_TESTS ?= tests/test_run.py tests/test_resume.py tests/test_reliability_kill.py \
	tests/test_reliability_preemption.py tests/test_optim.py tests/test_muon.py tests/test_loop_stages.py tests/test_float8.py \
	$(wildcard tests/test_fsdp*.py)

.PHONY: install demo test test-image-torch image-cpu test-container lint bench-tokenizer clean

$(VENV)/.installed: pyproject.toml
	@echo "install: a virtual environment in $(VENV) (once; a few minutes on a fresh machine)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@echo "install: $(TORCH_SPEC) (the CPU wheel where one is on disk, else downloaded)"
	$(PY) -m pip install --progress-bar on "$(TORCH_SPEC)"
	@echo "install: the project and its test tools (transformers, tokenizers, datasets, boto3, moto, ...)"
	$(PY) -m pip install -q -e ".[test]"
	@echo "install: done"
	touch $@

install: $(VENV)/.installed

# The constraint keeps `pip install -e .[test]` from moving torch off the image's version.
$(IMAGE_STAMP): pyproject.toml
	$(PYTHON) -m venv $(IMAGE_VENV)
	$(IMAGE_PY) -m pip install -q --upgrade pip
	printf '%s\n' "$(IMAGE_TORCH_SPEC)" "$(IMAGE_TORCHAO_SPEC)" > $(IMAGE_VENV)/constraints.txt
	$(IMAGE_PY) -m pip install -q -c $(IMAGE_VENV)/constraints.txt "$(IMAGE_TORCH_SPEC)"
	$(IMAGE_PY) -m pip install -q -c $(IMAGE_VENV)/constraints.txt -e ".[test]" "$(IMAGE_TORCHAO_SPEC)"
	$(IMAGE_PY) -c "import torch; print('torch', torch.__version__, 'CUDA build', torch.version.cuda, \
		'GPU available:', torch.cuda.is_available())"
	touch $@

demo: install
	$(PY) entrypoint.py run --config configs/demo.yaml $(ARGS)

test: install
	$(PY) -m pytest -q $(ARGS)

test-image-torch: $(IMAGE_STAMP)
	$(IMAGE_PY) -m pytest -q $(IMAGE_TESTS) $(ARGS)

# The Dockerfile's CPU flavour (FLAVOUR=cpu: Debian bookworm base, this TORCH_SPEC's CPU wheel), built
# from `git archive HEAD`; docker/engine.sh installs and starts Docker and makes the base when missing.
IMAGE_CPU ?= zh-pretrain:cpu
image-cpu:
	IMAGE_CPU=$(IMAGE_CPU) TORCH_SPEC=$(TORCH_SPEC) PYTHON=$(if $(wildcard $(PY)),$(PY),$(PYTHON)) bash docker/build_cpu.sh

# The image for real (docs/image.md): demo in the container, docker stop -> exit 75 -> resume to the same
# weights, a loopback S3 server, and the compose file under docker-compose.test.yml.
test-container: install
	IMAGE_CPU=$(IMAGE_CPU) TORCH_SPEC=$(TORCH_SPEC) PYTHON=$(PY) bash scripts/test_container.sh $(ARGS)

lint: install
	$(PY) -m ruff check .

bench-tokenizer: install
	$(PY) scripts/bench_tokenizer.py $(ARGS)

clean:
	rm -rf work bucket .pytest_cache
