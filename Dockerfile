# syntax=docker/dockerfile:1.7
# tailrec training image: CUDA PyTorch 2.13.0 + fbgemm-gpu 1.8.0 + torchrec 1.8.0, the project, non-root.
#   docker build -t tailrec:0.1 .
#   docker run --gpus all tailrec:0.1 train --config configs/movielens_deepfm.yaml
#   torchx run -s local_docker deploy/components.py:train --profile demo-cpu --image tailrec:0.1
#
# CUDA comes from the PyPI torch wheel itself: torch==2.13.0 on PyPI is the CUDA 13.0 build and pins
# its runtime exactly (cuda-toolkit 13.0.3, cuDNN 9.20.0.48, NCCL 2.29.7), and fbgemm-gpu==1.8.0 on
# PyPI is the matching default-CUDA build of the same release line. So the base only needs Python
# 3.11 (the version the project is tested with); the host provides the driver (--gpus /
# NVIDIA container toolkit, enabled by the NVIDIA_* variables below).
FROM python:3.11.13-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    TAILREC_METRICS_PORT=9400

WORKDIR /app

# Build tools pinned; the project is then built without isolation so nothing unpinned is fetched.
RUN python -m pip install pip==25.2 setuptools==80.9.0 wheel==0.45.1

# Heavy, rarely changing layer first. torchrec declares an unpinned fbgemm-gpu dependency, so it goes
# in with --no-deps; what it really needs is pinned in pyproject's dependencies (next layer).
RUN python -m pip install torch==2.13.0 fbgemm-gpu==1.8.0 \
 && python -m pip install --no-deps torchrec==1.8.0

# The project's own pinned dependencies, read from pyproject.toml (all `==` there).
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
 && python -m pip install -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

COPY trainer/ trainer/
COPY models/ models/
COPY data/ data/
COPY deploy/ deploy/
COPY configs/ configs/
COPY torchx.yaml ./
RUN python -m pip install --no-deps --no-build-isolation . \
 && python -c "import torch, torchrec, fbgemm_gpu, trainer.metrics; print('torch', torch.__version__)"

# Our fused optimizer's CPU op, compiled once here so that no run compiles it (or silently falls back
# to the slow pure-torch path for want of a compiler). The compiler and ninja live only in this layer;
# the built op stays in $TAILREC_EXT_DIR, where trainer/optim/kernel.py loads it without a compiler.
ENV TAILREC_EXT_DIR=/opt/tailrec_ext
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++=4:12.2.0-3 \
 && python -m pip install ninja==1.13.2 \
 && python -m trainer.optim.build_ext --require \
 && python -m pip uninstall -y ninja \
 && apt-get purge -y --auto-remove g++ \
 && rm -rf /var/lib/apt/lists/* \
 && python -c "from trainer.optim import kernel; assert kernel.load_extension() is not None, 'op not loadable without a compiler'"

# torchx passes its command (`bash -c "torchrun ..."`) as arguments, which Docker appends to the
# ENTRYPOINT: run such commands as they are; anything else is a trainer subcommand, so
# `docker run IMAGE train --config ...` == `python -m trainer train --config ...`.
COPY --chmod=0755 <<'EOF' /usr/local/bin/tailrec-entrypoint
#!/bin/sh
case "$1" in
  bash|sh|torchrun|python|python3|tailrec) exec "$@" ;;
esac
exec python -m trainer "$@"
EOF

RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin tailrec \
 && mkdir -p /app/runs /data \
 && chown -R tailrec:tailrec /app/runs /data
USER 10001:10001

# Rank r serves Prometheus metrics on 9400 + local rank (metrics.enabled=true; the component's
# cluster profiles bind 0.0.0.0 inside the container).
EXPOSE 9400-9407
# Healthy = local rank 0's trainer touched its heartbeat file recently (trainer/health.py): it exists
# with metrics on or off. Evaluations/checkpoints get TAILREC_HEALTH_MAX_AGE (default 900 s) per beat.
HEALTHCHECK --interval=30s --timeout=10s --start-period=300s --retries=3 \
    CMD ["python", "-m", "trainer.health"]

ENTRYPOINT ["tailrec-entrypoint"]
CMD ["--help"]
