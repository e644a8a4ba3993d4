# dist-dml on a CUDA PyTorch base: NCCL, bf16, faiss-gpu.
#   docker build -t dist-dml . && docker run --gpus all --rm dist-dml dist-dml demo
FROM pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime
RUN apt-get update && apt-get install -y --no-install-recommends build-essential ninja-build git \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/dist-dml
COPY pyproject.toml README.md ./
COPY dist_dml ./dist_dml
COPY data_prep ./data_prep
COPY launch ./launch
COPY configs ./configs
# torch comes from the base image; deepspeed builds against it, hence no build isolation.
RUN pip install --no-cache-dir --no-build-isolation ".[gpu]"
ENV DS_ACCELERATOR=cuda
CMD ["dist-dml", "--help"]
