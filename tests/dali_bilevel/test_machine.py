"""The machine record kept with every run: the CPU's family/model against /proc/cpuinfo, torch's kernels."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from dali_bilevel.machine import machine_info


def test_machine_info_names_the_kernels_and_the_cpu() -> None:
    info = machine_info()
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert info["cpu_count"] == os.cpu_count() and info["torch"] == torch.__version__
    assert info["cpu"]
    assert all(v is None or type(v) in (str, int) for v in info.values())  # checkpoints load it weights_only


@pytest.mark.skipif(shutil.which("lscpu") is None or not Path("/proc/cpuinfo").exists(), reason="needs lscpu and "
                    "/proc/cpuinfo (Linux)")
def test_family_and_model_match_proc_cpuinfo() -> None:
    """lscpu's CPU family/model against the kernel's own /proc/cpuinfo, a second reading."""
    fields = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if ":" in line:
            k, v = (t.strip() for t in line.split(":", 1))
            fields.setdefault(k, v)
    if "cpu family" not in fields:
        pytest.skip("/proc/cpuinfo has no 'cpu family' field on this architecture")
    assert machine_info()["cpu_family_model"] == f"{fields['cpu family']}/{fields['model']}"
