# dali-bilevel with exactly the versions the project is tested with (Makefile, CI): Python 3.11,
# torch 2.14.1 + torchvision 0.29.1 from PyPI (CUDA 13.0 builds that bring their own CUDA libraries),
# DALI for CUDA 13.0, kornia, timm and accelerate pinned, pillow-simd built against libjpeg-turbo.
# The host needs an NVIDIA driver for CUDA 13 (R580 or newer) and the NVIDIA container toolkit.
#   docker build -t dali-bilevel .
#   docker run --gpus all --ipc=host -v /data/imagenet:/data -v $PWD/runs:/runs dali-bilevel \
#     accelerate launch --multi_gpu --num_processes 8 launch/imagenet.py --data /data --output /runs/r18
#
# Why not NVIDIA's PyTorch image: its 25.10 release ships torch 2.9, three minor versions behind what
# every test here ran on; pinning the project to the image instead would leave it untested.
# Checked: hadolint (tests/packaging); every pin equals the tested environment and satisfies
# pyproject.toml (tests/packaging). Not checked: an actual `docker build` or GPU run of this image
# (no Docker engine on the development machine); the pip wheels' CUDA libraries on a real driver.
FROM python:3.11.7-slim-bookworm

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

WORKDIR /opt/dali-bilevel

# Build headers for pillow-simd (libjpeg-turbo, zlib, libtiff) and its compiler.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev libjpeg62-turbo-dev zlib1g-dev libtiff-dev \
    && rm -rf /var/lib/apt/lists/*

RUN pip install "torch==2.14.1" "torchvision==0.29.1" \
    && pip install \
        "timm==1.0.31" \
        "kornia==0.9.0" \
        "accelerate==1.15.0" \
        "nvidia-dali-cuda130==2.4.0" \
        "numpy==2.4.6" \
        "safetensors==0.8.0" \
        "tqdm==4.70.1" \
        "tensorboard==2.21.0" \
    && pip uninstall -y pillow \
    && pip install --no-build-isolation "pillow-simd==12.1.1.post0"

COPY pyproject.toml README.md ./
COPY dali_bilevel ./dali_bilevel
COPY pipelines ./pipelines
COPY models ./models
COPY launch ./launch
RUN pip install --no-deps -e .

CMD ["python", "launch/imagenet.py", "--help"]
