# The training image: CUDA 12.4 + cuDNN 9, PyTorch, flash-attn and this project.
#
#   docker build -t zh-pretrain:latest .
#   docker run --rm --gpus all --ipc=host -e BUCKET=s3://... zh-pretrain:latest   # = run --config $CONFIG
#
# Two stages on the official PyTorch images of one tag: `-devel` (nvcc, for a flash-attn source build
# when no prebuilt wheel matches) builds a virtual environment; `-runtime` (several GB smaller) gets
# only that environment. tests/test_infra.py checks these versions against pyproject.toml.
# No credentials are baked in: S3 keys come from the environment at run time (docs/design.md).

# transformers 5 needs torch >= 2.6 and 2.6 is the last PyTorch with CUDA 12.4 wheels, so: 2.6.0.
ARG TORCH_VERSION=2.6.0
ARG CUDA_VERSION=12.4
ARG BASE_TAG=${TORCH_VERSION}-cuda${CUDA_VERSION}-cudnn9

FROM pytorch/pytorch:${BASE_TAG}-devel AS builder

ARG TORCH_VERSION
ARG CUDA_VERSION
ARG FLASH_ATTN_VERSION=2.8.3
# Parallel nvcc jobs for a flash-attn source build: each takes several GB of RAM, so keep it bounded.
ARG MAX_JOBS=4

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A venv over the base image's Python sees its CUDA build of torch (system site packages); the
# constraint keeps every later install from replacing it with a wheel for another CUDA or the CPU.
RUN python -m venv --system-site-packages /opt/venv \
    && echo "torch==${TORCH_VERSION}" > /opt/constraints.txt \
    && /opt/venv/bin/python -c "import torch; assert torch.__version__.split('+')[0] == '${TORCH_VERSION}' and torch.version.cuda == '${CUDA_VERSION}', (torch.__version__, torch.version.cuda)"
ENV PATH=/opt/venv/bin:$PATH

# flash-attn: the release wheel built for exactly this torch minor, CUDA major, C++ ABI and Python
# (named like flash_attn-2.8.3+cu12torch2.6cxx11abiFALSE-cp311-cp311-linux_x86_64.whl); if there is
# none, compile it here with ninja (about an hour at MAX_JOBS=4).
RUN py="cp$(python -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')" \
    && torch_minor="$(python -c 'import torch; print(".".join(torch.__version__.split(".")[:2]))')" \
    && abi="$(python -c 'import torch; print(str(torch._C._GLIBCXX_USE_CXX11_ABI).upper())')" \
    && wheel="flash_attn-${FLASH_ATTN_VERSION}+cu${CUDA_VERSION%%.*}torch${torch_minor}cxx11abi${abi}-${py}-${py}-linux_x86_64.whl" \
    && url="https://github.com/Dao-AILab/flash-attention/releases/download/v${FLASH_ATTN_VERSION}/${wheel}" \
    && if pip install -c /opt/constraints.txt "${url}"; then \
        echo "flash-attn: prebuilt ${wheel}"; \
    else \
        echo "flash-attn: no prebuilt ${wheel}; building from source with MAX_JOBS=${MAX_JOBS}" \
        && pip install -c /opt/constraints.txt ninja==1.11.1.1 packaging==24.1 psutil==6.0.0 wheel==0.44.0 \
        && MAX_JOBS="${MAX_JOBS}" pip install -c /opt/constraints.txt --no-build-isolation "flash-attn==${FLASH_ATTN_VERSION}"; \
    fi

# Dependencies straight from pyproject.toml (runtime + the gpu extra), in their own layer so code
# changes don't reinstall them. flash-attn is already there and must match the Dockerfile.
WORKDIR /src
COPY pyproject.toml ./
RUN python -c "import sys; toml = __import__('tomllib' if sys.version_info >= (3, 11) else 'pip._vendor.tomli', fromlist=['load']); p = toml.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['gpu']))" > /tmp/requirements.txt \
    && grep -qx "flash-attn==${FLASH_ATTN_VERSION}" /tmp/requirements.txt \
    && pip install -c /opt/constraints.txt -r /tmp/requirements.txt

# The project itself (trainer package + entrypoint module), from pyproject.toml with the gpu extra;
# `python -I` so the check imports the installed copy, not the one in this folder.
COPY entrypoint.py ./
COPY trainer ./trainer
RUN pip install -c /opt/constraints.txt ".[gpu]" \
    && python -I -c "import flash_attn, flash_attn_2_cuda, trainer.config, entrypoint"


FROM pytorch/pytorch:${BASE_TAG}-runtime

ARG TORCH_VERSION
ARG CUDA_VERSION
ARG FLASH_ATTN_VERSION=2.8.3

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# tini as PID 1: forwards SIGTERM to the job (which checkpoints within train.grace_seconds and exits 75)
# and reaps zombies. Ubuntu's package; its version follows the base image.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
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
ENV PATH=/opt/venv/bin:$PATH \
    CONFIG=/app/configs/demo.yaml \
    LOCAL_DIR=/scratch \
    HOME=/home/trainer \
    HF_HOME=/scratch/huggingface \
    TRITON_CACHE_DIR=/scratch/triton \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

# Fail the build, not the run: the compiled extensions must load against this image's libraries.
RUN python -c "import torch, transformers, flash_attn, flash_attn_2_cuda, trainer.job, entrypoint; assert transformers.utils.is_torch_available(), 'transformers rejects this torch'; assert torch.__version__.split('+')[0] == '${TORCH_VERSION}' and torch.version.cuda == '${CUDA_VERSION}' and flash_attn.__version__ == '${FLASH_ATTN_VERSION}', (torch.__version__, torch.version.cuda, flash_attn.__version__)"

# The user `trainer`, by number so Kubernetes can verify runAsNonRoot.
USER 1000:1000
ENTRYPOINT ["tini", "--", "python", "/app/entrypoint.py"]
# `run` with no --config reads the CONFIG environment variable (entrypoint.py).
CMD ["run"]
