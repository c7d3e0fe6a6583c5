# The training image: CUDA 12.4 toolkit base, Python 3.11, PyTorch 2.9.1 (PyPI), flash-attn and this project.
#
#   docker build -t zh-pretrain:latest .
#   docker run --rm --gpus all --ipc=host -e BUCKET=s3://... zh-pretrain:latest   # = run --config $CONFIG
#
# Two stages on NVIDIA's CUDA images of one toolkit release: `-devel` (nvcc, for a flash-attn source
# build when no prebuilt wheel matches) builds a virtual environment; `-runtime` gets only that
# environment. tests/test_infra.py checks these versions against pyproject.toml and the Makefile, whose
# `make test-image-torch` runs the end-to-end, resume and reliability tests on this torch (docs/image.md).
# No credentials are baked in: S3 keys come from the environment at run time (docs/design.md).
#
# Why torch 2.9.1: the first release with torch.optim.Muon (train.optimizer=muon); transformers 5 needs
# torch >= 2.6. PyPI's x86_64 wheel of 2.9.1 is a CUDA 12.8 build that carries its own CUDA runtime,
# cuBLAS, cuDNN 9.10, NCCL, ... as nvidia-*-cu12 wheels and loads those, not the base image's libraries.
# So a 12.4 toolkit base runs it: the toolkit is only nvcc and headers for building flash-attn (same
# CUDA major, 12; torch.utils.cpp_extension only warns about the minor mismatch). What a CUDA 12.8
# build needs from the host is the driver: CUDA 12.8 Update 1 (the wheel's cudart is 12.8.90) lists
# driver >= 570.124.06 on Linux x86_64 (12.8 GA: >= 570.26), NVIDIA CUDA 12.8 release notes, "CUDA
# Toolkit and Corresponding Driver Versions". Under CUDA minor version compatibility a 12.x build also
# starts on drivers >= 525 (same notes, "Minimum Required Driver Version for CUDA Minor Version
# Compatibility"), without PTX JIT and with a limited feature set; nothing here was run that way, so
# treat 570.124.06 as the minimum. The H200 figures in bench/RESULTS.md ran on driver 580.159.04.
# The base images carry no cuDNN of their own (the `-cudnn` tags would put cuDNN 9.1 on the system
# library path next to the wheel's 9.10; torch refuses a cuDNN older than the one it was built with).
ARG TORCH_VERSION=2.9.1
ARG TORCH_CUDA_VERSION=12.8
ARG CUDA_VERSION=12.4.1
ARG PYTHON_VERSION=3.11
# FLAVOUR=cpu (`make image-cpu`, docker/build_cpu.sh): the same stages, entrypoint, tini, user, venv and
# file layout on a Debian bookworm base (its own python3.11; BUILDER_BASE/RUNTIME_BASE name it) with the
# CPU torch wheel that `make install` uses (TORCH_VERSION=2.13.0, TORCH_CUDA_VERSION empty) taken from the
# build context's .whl/, no flash-attn and no gpu extra. `make test-container` runs the job in it
# (docs/image.md). The defaults below are the CUDA image's.
ARG FLAVOUR=cuda
ARG BUILDER_BASE=nvidia/cuda:${CUDA_VERSION}-devel-ubuntu22.04
ARG RUNTIME_BASE=nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu22.04

FROM ${BUILDER_BASE} AS builder

ARG TORCH_VERSION
ARG TORCH_CUDA_VERSION
ARG PYTHON_VERSION
ARG FLASH_ATTN_VERSION=2.8.3
# Parallel nvcc jobs for a flash-attn source build: each takes several GB of RAM, so keep it bounded.
ARG MAX_JOBS=4
ARG DEBIAN_FRONTEND=noninteractive
ARG FLAVOUR

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Python from the deadsnakes PPA: Ubuntu 22.04's own python3.11 is 3.11.0rc1. deadsnakes keeps only the
# newest 3.11.x, so the patch release is whatever it has on build day; the minor is checked below.
# -dev: headers for the flash-attn source build.
# hadolint ignore=DL3008
RUN apt-get update \
    && if [ "${FLAVOUR}" = cuda ]; then \
        apt-get install -y --no-install-recommends software-properties-common \
        && add-apt-repository -y ppa:deadsnakes/ppa \
        && apt-get update; \
    fi \
    && apt-get install -y --no-install-recommends ca-certificates \
        "python${PYTHON_VERSION}" "python${PYTHON_VERSION}-venv" "python${PYTHON_VERSION}-dev" \
    && rm -rf /var/lib/apt/lists/*

# torch from PyPI at exactly this version (its CUDA 12.8 build); the constraint keeps every later install
# from replacing it. Its wheels are built with the C++11 ABI (flash-attn's wheel name says so).
# The cpu flavour finds its wheel in .whl/ (pyproject.toml is listed so the COPY has a source when .whl/
# is empty: the CUDA flavour has no wheel there and takes torch from PyPI as before).
COPY pyproject.toml .whl/torch-* .whl/*.crt /tmp/wheels/
# PIP_CERT: a CA bundle for pip behind a TLS-inspecting proxy (docker/build_cpu.sh copies the host's into
# .whl/ and passes its path). An ARG, not an ENV: it is set for this stage's RUNs only and the builder
# stage is discarded, so the final image holds neither the bundle nor the setting.
ARG PIP_CERT
RUN "python${PYTHON_VERSION}" -m venv /opt/venv \
    && echo "torch==${TORCH_VERSION}" > /opt/constraints.txt \
    && /opt/venv/bin/pip install -c /opt/constraints.txt --find-links=/tmp/wheels "torch==${TORCH_VERSION}" \
    && /opt/venv/bin/python -c "import sys, torch; assert f'{sys.version_info[0]}.{sys.version_info[1]}' == '${PYTHON_VERSION}' and torch.__version__.split('+')[0] == '${TORCH_VERSION}' and (torch.version.cuda or '') == '${TORCH_CUDA_VERSION}' and torch._C._GLIBCXX_USE_CXX11_ABI, (sys.version, torch.__version__, torch.version.cuda)"
ENV PATH=/opt/venv/bin:$PATH

# flash-attn: the release wheel built for exactly this torch minor, torch's CUDA major, C++ ABI and Python
# (named like flash_attn-2.8.3+cu12torch2.9cxx11abiTRUE-cp311-cp311-linux_x86_64.whl); if there is none,
# compile it here with ninja for Ampere and Hopper (sm80, sm90; about an hour at MAX_JOBS=4). v2.8.3's
# release wheels stop at torch 2.8 (its publish workflow's matrix), so for torch 2.9 this builds.
RUN if [ "${FLAVOUR}" = cpu ]; then echo "flash-attn: none in the cpu flavour"; exit 0; fi \
    && py="cp$(python -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')" \
    && torch_minor="$(python -c 'import torch; print(".".join(torch.__version__.split(".")[:2]))')" \
    && cuda_major="$(python -c 'import torch; print(torch.version.cuda.split(".")[0])')" \
    && abi="$(python -c 'import torch; print(str(torch._C._GLIBCXX_USE_CXX11_ABI).upper())')" \
    && wheel="flash_attn-${FLASH_ATTN_VERSION}+cu${cuda_major}torch${torch_minor}cxx11abi${abi}-${py}-${py}-linux_x86_64.whl" \
    && url="https://github.com/Dao-AILab/flash-attention/releases/download/v${FLASH_ATTN_VERSION}/${wheel}" \
    && if pip install -c /opt/constraints.txt "${url}"; then \
        echo "flash-attn: prebuilt ${wheel}"; \
    else \
        echo "flash-attn: no prebuilt ${wheel}; building from source with MAX_JOBS=${MAX_JOBS}" \
        && pip install -c /opt/constraints.txt ninja==1.11.1.1 packaging==24.1 psutil==6.0.0 wheel==0.44.0 setuptools==80.9.0 \
        && MAX_JOBS="${MAX_JOBS}" FLASH_ATTN_CUDA_ARCHS="80;90" pip install -c /opt/constraints.txt --no-build-isolation "flash-attn==${FLASH_ATTN_VERSION}"; \
    fi

# Dependencies straight from pyproject.toml (runtime + the gpu extra: flash-attn, torchao for
# train.float8; + the wandb extra for run.report_to wandb), in their own layer so code
# changes don't reinstall them. flash-attn is already there and must match the Dockerfile.
WORKDIR /src
COPY pyproject.toml ./
RUN python -c "import sys; toml = __import__('tomllib' if sys.version_info >= (3, 11) else 'pip._vendor.tomli', fromlist=['load']); p = toml.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + (p['optional-dependencies']['gpu'] if '${FLAVOUR}' == 'cuda' else []) + p['optional-dependencies']['wandb']))" > /tmp/requirements.txt \
    && { [ "${FLAVOUR}" = cpu ] || grep -qx "flash-attn==${FLASH_ATTN_VERSION}" /tmp/requirements.txt; } \
    && pip install -c /opt/constraints.txt -r /tmp/requirements.txt

# The project itself (trainer package + entrypoint module + the bundled configs as data files, so the
# `zh-pretrain` console script finds `--config demo`), from pyproject.toml with the gpu extra;
# `python -I` so the check imports the installed copy, not the one in this folder.
COPY entrypoint.py ./
COPY trainer ./trainer
COPY configs ./configs
RUN if [ "${FLAVOUR}" = cpu ]; then extras="wandb" gpu_mods=""; else extras="gpu,wandb" gpu_mods="flash_attn, flash_attn_2_cuda, torchao.float8, "; fi \
    && pip install -c /opt/constraints.txt ".[${extras}]" \
    && python -I -c "import ${gpu_mods}wandb, trainer.config, entrypoint" \
    && test -f /opt/venv/share/zh-pretrain/configs/demo.yaml


FROM ${RUNTIME_BASE}

ARG TORCH_VERSION
ARG TORCH_CUDA_VERSION
ARG PYTHON_VERSION
ARG FLASH_ATTN_VERSION=2.8.3
ARG DEBIAN_FRONTEND=noninteractive
ARG FLAVOUR

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# The same Python as the builder (the venv links to /usr/bin/python3.11), with its headers and gcc:
# Triton, under torch.compile, compiles a small C launcher per kernel at run time. tini as PID 1:
# forwards SIGTERM to the job (which checkpoints within train.grace_seconds and exits 75) and reaps
# zombies. add-apt-repository is removed again once the PPA is configured.
# hadolint ignore=DL3008
RUN apt-get update \
    && if [ "${FLAVOUR}" = cuda ]; then \
        apt-get install -y --no-install-recommends software-properties-common \
        && add-apt-repository -y ppa:deadsnakes/ppa \
        && apt-get update; \
    fi \
    && apt-get install -y --no-install-recommends ca-certificates \
        "python${PYTHON_VERSION}" "python${PYTHON_VERSION}-dev" gcc libc6-dev tini \
    && { [ "${FLAVOUR}" = cpu ] || apt-get purge -y --auto-remove software-properties-common; } \
    && rm -rf /var/lib/apt/lists/*

# A non-root user that owns the writable places. Group 0 gets the same rights, so the image also runs
# as root (RunPod, some SkyPilot images) or as an arbitrary UID in group 0 (OpenShift).
RUN groupadd --gid 1000 trainer \
    && useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash trainer \
    && mkdir -p /app /scratch \
    && chown -R 1000:0 /app /scratch /home/trainer \
    && chmod -R g=u /app /scratch /home/trainer

COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
COPY --chown=1000:0 entrypoint.py ./
COPY --chown=1000:0 configs ./configs
COPY --chown=1000:0 data/sample ./data/sample
COPY --chown=1000:0 data/sft-sample ./data/sft-sample

# LOCAL_DIR: scratch for the pulled corpus, shards and staged checkpoints (mount a volume here).
# HOME is fixed so caches land in one writable place whichever user runs the container.
# NVIDIA_REQUIRE_CUDA: the base image asks the NVIDIA container runtime for a driver that runs CUDA 12.4;
# torch needs one that runs 12.8, so a too-old driver is refused at `docker run`, not deep in CUDA init.
ENV PATH=/opt/venv/bin:$PATH \
    NVIDIA_REQUIRE_CUDA="cuda>=${TORCH_CUDA_VERSION}" \
    CONFIG=/app/configs/demo.yaml \
    LOCAL_DIR=/scratch \
    HOME=/home/trainer \
    HF_HOME=/scratch/huggingface \
    TRITON_CACHE_DIR=/scratch/triton \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

# Fail the build, not the run: the compiled extensions must load against this image's libraries,
# torch.optim.Muon must exist, and torch must find the cuDNN it was built with (its own wheel's).
RUN if [ "${FLAVOUR}" = cpu ]; then \
        python -c "import torch, transformers, trainer.job.run, entrypoint; assert transformers.utils.is_torch_available(), 'transformers rejects this torch'; assert hasattr(torch.optim, 'Muon'), 'no torch.optim.Muon'; assert torch.__version__.split('+')[0] == '${TORCH_VERSION}' and torch.version.cuda is None, (torch.__version__, torch.version.cuda)"; \
    else \
        python -c "import torch, transformers, flash_attn, flash_attn_2_cuda, trainer.job.run, entrypoint; assert transformers.utils.is_torch_available(), 'transformers rejects this torch'; assert hasattr(torch.optim, 'Muon'), 'no torch.optim.Muon'; assert torch.backends.cudnn.version() is not None, 'torch finds no cuDNN'; assert torch.__version__.split('+')[0] == '${TORCH_VERSION}' and torch.version.cuda == '${TORCH_CUDA_VERSION}' and flash_attn.__version__ == '${FLASH_ATTN_VERSION}', (torch.__version__, torch.version.cuda, flash_attn.__version__)"; \
    fi

# The user `trainer`, by number so Kubernetes can verify runAsNonRoot.
USER 1000:1000
ENTRYPOINT ["tini", "--", "python", "/app/entrypoint.py"]
# `run` with no --config reads the CONFIG environment variable (entrypoint.py).
CMD ["run"]
