# Helix daemon image: CPU PyTorch on python:3.11-slim.
# For NVIDIA GPUs build with a CUDA wheel index, e.g.
#   docker compose build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, in its own layer: it is by far the largest and changes least often. Installing it
# from the CPU index means `pip install .` then finds torch>=2.4 satisfied instead of pulling
# PyPI's CUDA build.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "${TORCH_INDEX_URL}" torch

WORKDIR /app
COPY pyproject.toml README.md ./
COPY kvpool ./kvpool
COPY scheduler ./scheduler
COPY helix_daemon ./helix_daemon
RUN pip install ".[gateway]"

RUN useradd --create-home --uid 10001 helix \
    && mkdir -p /home/helix/.cache/huggingface \
    && chown -R helix /home/helix/.cache
USER helix
ENV HF_HOME=/home/helix/.cache/huggingface

CMD ["helix", "--help"]
