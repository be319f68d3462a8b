"""Two gloo processes, each with half of a global batch, give the same augmenter and classifier
updates as one process with the whole batch."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dali_bilevel.hypergrad import bilevel_step

from .test_hypergrad import setup


def dist_reduce_mean(tensors):
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    out, i = [], 0
    for t in tensors:
        out.append(flat[i : i + t.numel()].view_as(t))
        i += t.numel()
    return out


def run_step(rank: int, world: int, mode: str, out_dir: str, init: str) -> None:
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    # No BatchNorm and no hidden-feature centring: both are per-process batch statistics,
    # which (as in any data-parallel run) legitimately differ from the global batch's.
    model, aug, opt, data = setup(bn=False)
    aug.center_hidden = False
    n = data["x_tr"].shape[0] // world
    sl = slice(rank * n, (rank + 1) * n)
    out = bilevel_step(model, aug, opt, data["x_tr"][sl], data["y_tr"][sl], data["x_val"][sl], data["y_val"][sl],
                       noise=data["noise"][sl], mode=mode, reduce_mean=dist_reduce_mean if world > 1 else lambda t: t)
    torch.save({"aug": out.augmenter_grads, "cls": out.classifier_grads}, os.path.join(out_dir, f"{world}_{rank}.pt"))
    if world > 1:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["exact", "finite_difference"])
def test_two_processes_match_one(tmp_path, mode):
    run_step(0, 1, mode, str(tmp_path), "")
    mp.spawn(run_step, args=(2, mode, str(tmp_path), f"file://{tmp_path}/rendezvous"), nprocs=2, join=True)
    one = torch.load(tmp_path / "1_0.pt")
    for rank in range(2):
        two = torch.load(tmp_path / f"2_{rank}.pt")
        tol = 1e-9  # FD too: every process uses the same ε, set by the global u
        for key in ("aug", "cls"):
            for a, b in zip(one[key], two[key], strict=True):
                torch.testing.assert_close(b, a, rtol=tol, atol=tol * a.abs().max().item())
