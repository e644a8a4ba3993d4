# dist-dml on GPUs: NCCL, bf16, faiss-gpu, installed by ./dml itself (the same pins and the same check of torch's and
# DeepSpeed's internals as on a fresh machine), with the launch scripts, configs and benchmarks.
#   docker build -t dist-dml . && docker run --gpus all --shm-size 8g --rm dist-dml ./dml bench gpu
FROM python:3.11-slim-bookworm
RUN apt-get update && apt-get install -y --no-install-recommends build-essential ninja-build git \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/dist-dml
COPY . .
# The environment ./dml uses (DIST_DML_VENV), with faiss-gpu instead of faiss-cpu; building it runs
# `dist-dml setup --check-internals`, so an image whose torch or DeepSpeed moved an internal fails here.
ENV DIST_DML_VENV=/opt/venv DIST_DML_EXTRAS=gpu,dev
RUN ./dml setup
ENV PATH=/opt/venv/bin:$PATH DS_ACCELERATOR=cuda
CMD ["./dml", "run", "--help"]
