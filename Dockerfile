# One image for every lmq process: the API (`lmq serve`), the GPU workers
# (`lmq worker`) and the one-shot schema migration (`lmq db upgrade`).
# PyTorch's Linux wheels carry their own CUDA libraries, so the same image runs
# on an NVIDIA GPU (with the NVIDIA container toolkit on the host) or on CPU.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    KERAS_BACKEND=torch \
    LMQ_HOME=/data \
    HF_HOME=/data/huggingface

WORKDIR /app
# tcmalloc: the allocator the `lmq` command preloads where it is installed (lmq.core.config.allocator_environment).
RUN apt-get update && apt-get install -y --no-install-recommends libtcmalloc-minimal4 && rm -rf /var/lib/apt/lists/*
# Dependencies first, so that a change to lmq's code does not reinstall torch.
COPY pyproject.toml setup.py README.md ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['postgres'] + p['optional-dependencies']['s3']))" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt
COPY lmq lmq
COPY core core
COPY plugins plugins
COPY workers workers
COPY api api
RUN pip install --no-deps ".[postgres,s3]"
# The demo preset, servable as "demo/stdlib-tiny-llama" (the processes start in /app).
COPY demo demo
ENV LMQ_PRESET_ROOTS=/data/presets:/app/demo

# Not root; /data (LMQ_HOME) is each container's own: its cache of presets from the object store (LMQ_STORAGE_URL)
# and the hub cache; or, with no object store configured, the store itself (file://$LMQ_HOME).
RUN useradd --create-home --uid 1000 lmq && mkdir -p /data && chown lmq /data
USER lmq
VOLUME /data
EXPOSE 8000
CMD ["lmq", "serve", "--host", "0.0.0.0", "--port", "8000"]
