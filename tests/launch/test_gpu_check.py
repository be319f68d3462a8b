"""`launch/gpu_check.sh --dry-run` runs every command of the GPU check on the CPU at toy sizes, so its
flags cannot rot between the sessions that have a GPU."""

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_dry_run_passes_every_stage(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(["bash", "launch/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    stages = json.loads((tmp_path / "gpu_results.json").read_text())["stages"]
    assert {s["status"] for s in stages} <= {"PASS", "SKIP"}, stages
    names = " ".join(s["stage"] for s in stages)
    for stage in ("cuda tests", "end to end: learned", "end to end: predefined", "step cost", "loader throughput"):
        assert stage in names, stage
    assert (tmp_path / "gpu_results.md").read_text().startswith("# GPU check: no GPU (dry run)")
