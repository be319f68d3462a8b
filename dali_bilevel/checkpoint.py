"""Atomic, resumable checkpoints that never unpickle arbitrary objects.

A checkpoint is a folder ``OUT/checkpoints/step-XXXXXXXX`` with
  * ``model.safetensors`` and ``augmenter.safetensors`` (weights and buffers),
  * ``state.pt``: optimizer, scheduler, loss-scale and progress state: tensors and plain Python
    values only, loaded with ``torch.load(weights_only=True)``,
  * ``rng_<rank>.pt``: each process's torch (and CUDA) generator states.
It is written into a temporary folder and renamed into place, then ``latest`` (a one-line text
file) is replaced atomically; a crash at any point leaves the previous checkpoint usable.

Accelerate's ``save_state``/``load_state`` would unpickle custom objects and RNG states with
``weights_only=False``, so this module writes the same contents itself.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

KEEP = 2


def _state_dict_for_safetensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: Path, step: int, acc, modules: dict[str, nn.Module], state: dict[str, Any]) -> Path:
    """Collective: every process calls it. Returns the checkpoint folder."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    acc.wait_for_everyone()
    torch.save(rng_state(), tmp / f"rng_{acc.process_index}.pt")
    if acc.is_main_process:
        for name, module in modules.items():
            save_file(_state_dict_for_safetensors(module), str(tmp / f"{name}.safetensors"))
        torch.save(state, tmp / "state.pt")
    acc.wait_for_everyone()
    if acc.is_main_process:
        for f in tmp.iterdir():  # flush file contents before the rename makes them visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer = root / ".latest.tmp"
        pointer.write_text(final.name + "\n")
        os.replace(pointer, root / "latest")
        for old in sorted(root.glob("step-*"))[:-KEEP]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def find_checkpoint(spec: str, output: Path) -> Path | None:
    """``auto``: OUT/checkpoints/latest if any; ``none``: start fresh; else a checkpoint folder."""
    if spec == "none":
        return None
    if spec == "auto":
        pointer = output / "checkpoints" / "latest"
        return output / "checkpoints" / pointer.read_text().strip() if pointer.exists() else None
    path = Path(spec)
    if (path / "latest").exists():
        path = path / (path / "latest").read_text().strip()
    if not (path / "state.pt").exists():
        raise FileNotFoundError(f"--resume: {spec}: not a checkpoint folder (no state.pt)")
    return path


def load_checkpoint(path: Path, acc, modules: dict[str, nn.Module]) -> dict[str, Any]:
    """Load weights into ``modules`` and this process's RNG state; return the saved state dict."""
    for name, module in modules.items():
        module.load_state_dict(load_file(str(path / f"{name}.safetensors"), device=str(acc.device)))
    rng = path / f"rng_{acc.process_index}.pt"
    if rng.exists():
        set_rng_state(torch.load(rng, weights_only=True))
    return torch.load(path / "state.pt", weights_only=True, map_location="cpu")
