#!/usr/bin/env bash
# Every GPU check in one run (< 8 minutes on an H100/H200), for the device tool's machine.
#
# Here, before the call:
#   ../shared/device/stage-wheels                     # DALI (cuda130) + kornia wheels in parts under .devwheels/
#   mkdir -p .gpudata && cp -r ../shared/data/imagenet_sample .gpudata/ && echo /.gpudata/ >> .git/info/exclude
# Then one transfer per wheel part (see stage-wheels' output), and finally:
#   run(command="bash launch/gpu_check.sh", carry=[".gpudata"], timeout_s=540)
# Results: $OUT/gpu_results.md (tables, card named) and the JSON files next to it.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/gpu_log.txt"; }

if [ ! -d /tmp/site ]; then
  if [ -d /root/wheels ]; then
    (cd /root/wheels && cat part.* | tar -x) && \
      python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /root/wheels/*.whl
  fi
fi
export PYTHONPATH=/tmp/site:$PWD
CARD=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)
log "card: $CARD"
python3 -c "import torch, nvidia.dali, kornia, timm, accelerate; print('torch', torch.__version__, 'dali', nvidia.dali.__version__, 'kornia', kornia.__version__)" 2>&1 | tee -a "$OUT/gpu_log.txt"

log "1/4 unit tests on the GPU machine (hypergradient, loaders, training loop)"
timeout 150 python3 -m pytest -q -x tests/dali_bilevel/test_hypergrad.py tests/pipelines -p no:cacheprovider \
  2>&1 | tail -5 | tee -a "$OUT/gpu_log.txt"

log "2/4 end to end on the GPU: DALI mixed decode, bf16 and fp16 bilevel steps"
python3 -m dali_bilevel.demo_data --out /tmp/shapes --train-per-class 64 --test-per-class 16 >/dev/null
for mp in bf16 fp16; do
  timeout 90 python3 launch/imagenet.py --data /tmp/shapes --output "$OUT/e2e_$mp" --model resnet18 \
    --image-size 64 --crop-pct 1 --batch-size 64 --epochs 2 --lr 0.05 --mixed-precision $mp --no-progress \
    2>&1 | tail -3 | tee -a "$OUT/gpu_log.txt"
done

log "3/4 step cost: resnet50 @ 224, bf16"
timeout 200 python3 launch/bench_step.py --model resnet50 --image-size 224 --batch-size 64 --precision bf16 \
  --warmup 3 --repeats 10 --out "$OUT/step_gpu.json" 2>&1 | tail -12 | tee -a "$OUT/gpu_log.txt"

log "4/4 loader throughput (imagenet_sample, 224 random-resized crops)"
if [ -d .gpudata/imagenet_sample ] && [ -f launch/bench_loaders.py ]; then
  timeout 150 python3 launch/bench_loaders.py --data .gpudata/imagenet_sample --devices gpu,cpu --threads 16 \
    --out "$OUT/loaders_gpu.json" 2>&1 | tail -12 | tee -a "$OUT/gpu_log.txt"
else
  log "skipped: carry .gpudata/imagenet_sample"
fi
{ echo "# GPU check: $CARD"; echo; echo '```'; cat "$OUT/gpu_log.txt"; echo '```'; } > "$OUT/gpu_results.md"
log "done"
