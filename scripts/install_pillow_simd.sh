#!/usr/bin/env bash
# Replace pillow with pillow-simd where it builds (needs libjpeg, zlib and libtiff headers, else
# compressed TIFFs fail); otherwise keep pillow. Either way, say which one is active.
set -u
PY=${1:-python3}
if "$PY" -m pip show -q pillow-simd >/dev/null 2>&1 && ! "$PY" -m pip show -q pillow >/dev/null 2>&1; then
  :
else
  if ! { dpkg -s libtiff-dev libjpeg-dev zlib1g-dev >/dev/null 2>&1; }; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libtiff-dev libjpeg-dev zlib1g-dev; } \
        >/dev/null 2>&1 || echo "pillow-simd: could not install build headers with apt-get"
    fi
  fi
  if "$PY" -m pip install -q --no-deps --no-build-isolation pillow-simd >/dev/null 2>&1 \
     || "$PY" -m pip install -q --no-deps pillow-simd >/dev/null 2>&1; then
    "$PY" -m pip uninstall -q -y pillow >/dev/null 2>&1
    # pillow-simd and pillow share the PIL package: reinstall simd so its files win.
    "$PY" -m pip install -q --no-deps --force-reinstall pillow-simd >/dev/null 2>&1
  else
    echo "pillow-simd: build failed; keeping pillow"
  fi
fi
"$PY" -c "from pipelines.torch_loader import pil_flavour; print('PIL backend:', pil_flavour())"
