#!/usr/bin/env bash
# Every GPU check in one command (< 8 minutes on an H100/H200), for the device tool's machine; the logic
# and its assertions are in launch/gpu_check.py. `bash launch/gpu_check.sh --dry-run` runs every command on
# the CPU at toy sizes (CI does, so the flags cannot rot).
#
# Here, before the calls (see /work/.library/device/README.md):
#   Tier 1 (no DALI): ../shared/device/stage-wheels --kornia-only     # kornia + kornia-rs, one small part
#     run(command="mkdir -p /root/wheels && cp .devwheels/p1/* /root/wheels/ && bash launch/gpu_check.sh --tier 1",
#         carry=[".devwheels"], timeout_s=540)
#   Tier 2 (DALI): ../shared/device/stage-wheels, then one transfer per part (stage-wheels prints them), and
#     mkdir -p .gpudata && cp -r ../shared/data/imagenet_sample .gpudata/ && echo /.gpudata/ >> .git/info/exclude
#     run(command="bash launch/gpu_check.sh --tier 2", carry=[".gpudata"], timeout_s=540)
# Results: $OUT/gpu_results.md (the card named) and gpu_results.json, the benchmarks' JSON beside them.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
if [ -d /root/wheels ] && [ ! -d /tmp/site ]; then  # wheels carried in parts (stage-wheels)
  (cd /root/wheels && cat part.* | tar -x) \
    && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /root/wheels/*.whl
fi
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ "${1:-}" = "--dry-run" ] && PYTHON=.venv/bin/python
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1
exec "$PYTHON" launch/gpu_check.py --out "$OUT" "$@"
