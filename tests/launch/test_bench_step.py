"""launch/bench_step.py as a script: its rows run, the plain row is the reference, the machine is named."""

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def test_two_rows_side_by_side_write_ratios_and_the_machine(tmp_path):
    out = tmp_path / "step.json"
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "bench_step.py"), "--model", "cifar_resnet18_w16",
                        "--image-size", "16", "--batch-size", "8", "--device", "cpu", "--threads", "1",
                        "--warmup", "0", "--repeats", "1", "--rows", "plain,exact_j8_hb0.25", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    rows = {row["name"]: row for row in report["rows"]}
    assert rows["plain"]["time_ratio"] == 1.0 and rows["plain"]["median_s"] > 0
    # no timed assertion (benchmarks are not tests): one timed cycle per --repeats, per row
    assert all(row["median_s"] > 0 and len(row["times_s"]) == 1 for row in rows.values())
    assert rows["exact_j8_hb0.25"]["default"] is True  # the row of the configuration users get
    assert all(row["peak_mb"] > 0 for row in rows.values())
    m = report["machine"]
    assert m["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and m["threads"] == 1
    assert "exact_j8_hb0.25 (default)" in r.stdout and f"({m['cpu_capability']}), 1 threads" in r.stdout
