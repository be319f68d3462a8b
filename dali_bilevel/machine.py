"""What machine a run or benchmark ran on, recorded beside its numbers.

Two CPUs that both call themselves "AMD EPYC" can run different vector kernels (AVX2, AVX-512): the
sums come out in another order, and a trained network's trajectory parts from the first epoch on
(docs/results.md, *Reproducibility*). A rerun can only match a run made on the same kind of CPU, so the
model, family and torch's kernel level are kept with every result.
"""

from __future__ import annotations

import os
import platform
import subprocess
from typing import Any

import torch


def cpu_fields() -> dict[str, str]:
    """``lscpu``'s fields (empty where it is missing), read once per call, outside any step."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {k.strip(): v.strip() for k, v in (ln.split(":", 1) for ln in out.splitlines() if ":" in ln)}


def machine_info() -> dict[str, Any]:
    """CPU model, family/model numbers, torch's CPU kernel level, core count, GPU and library versions."""
    f = cpu_fields()
    info: dict[str, Any] = {
        "cpu": f.get("Model name") or platform.processor() or platform.machine(),
        "cpu_family_model": f"{f['CPU family']}/{f['Model']}" if "CPU family" in f and "Model" in f else None,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "hypervisor": f.get("Hypervisor vendor") or None,
        "python": platform.python_version(),
        "torch": str(torch.__version__),  # a plain str: checkpoints hold this record, and weights_only loads
        # refuse torch's TorchVersion class
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    try:
        import nvidia.dali

        info["dali"] = nvidia.dali.__version__
    except ImportError:
        info["dali"] = None
    return info
