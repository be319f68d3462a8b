# dali-bilevel on NVIDIA's PyTorch image (CUDA 13), with the DALI wheel that matches its CUDA.
#   docker build -t dali-bilevel .
#   docker run --gpus all --ipc=host -v /data/imagenet:/data dali-bilevel \
#     accelerate launch --multi_gpu --num_processes 8 launch/imagenet.py --data /data --output /runs/r18
FROM nvcr.io/nvidia/pytorch:25.10-py3

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

WORKDIR /opt/dali-bilevel

# Dependencies first (kept in step with pyproject.toml by tests/test_packaging.py). torch and
# torchvision come from the image; installing them again would replace NVIDIA's builds. The image
# may ship DALI already: the same flavour (cuda130) is installed or upgraded in place, never a second one.
RUN pip install \
        "timm==1.0.31" \
        "kornia==0.9.0" \
        "accelerate==1.15.0" \
        "nvidia-dali-cuda130==2.4.0" \
        "safetensors==0.8.0" \
        "tqdm==4.70.1" \
        "tensorboard==2.21.0"

COPY pyproject.toml README.md ./
COPY dali_bilevel ./dali_bilevel
COPY pipelines ./pipelines
COPY models ./models
COPY launch ./launch
RUN pip install --no-deps -e .

CMD ["python", "launch/imagenet.py", "--help"]
