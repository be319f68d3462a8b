"""`training_function(config)`: online bilevel augmentation learning on Accelerate, top to bottom.

Per epoch: re-draw the validation split, build the loaders, then for every train batch take
one classifier step on augmented images; every J-th step the augmenter follows the
hypergradient of the validation loss through the look-ahead of that same step
(`dali_bilevel.hypergrad.bilevel_step`). Evaluate, log, draw the augmentation grid.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import Tensor, nn
from tqdm.auto import tqdm

from dali_bilevel.config import TrainConfig
from dali_bilevel.data import FileList, epoch_rng, eval_list, split_train_val, stream_list, take, train_list
from dali_bilevel.hypergrad import bilevel_step
from dali_bilevel.viz import augmentation_grid, save_grid
from models import Augmenter, create_backbone, magnitudes, random_flip, random_translate
from pipelines import DaliLoader, TorchLoader, find_splits


class SetupError(Exception):
    """A problem with the user's flags or data, found before any training step."""


@contextmanager
def setup_errors():
    try:
        yield
    except (ValueError, FileNotFoundError, RuntimeError, TypeError) as e:
        raise SetupError(str(e)) from e


def make_loader(cfg: TrainConfig, flist: FileList, batch: int, train: bool, acc: Accelerator,
                seed: int, shards: bool = True) -> DaliLoader | TorchLoader:
    """One process's loader over a pre-arranged list; contiguous shard per process."""
    kw: dict[str, Any] = dict(
        batch_size=batch, image_size=cfg.image_size, crop=cfg.resolved_train_crop() if train else "center",
        crop_pct=cfg.crop_pct, shard_id=acc.process_index if shards else 0,
        num_shards=acc.num_processes if shards else 1, seed=seed,
    )
    if cfg.loader == "dali":
        device = cfg.dali_device
        if device == "auto":
            device = "gpu" if acc.device.type == "cuda" else "cpu"
        return DaliLoader(flist.files, flist.labels, device=device, device_id=acc.local_process_index,
                          num_threads=cfg.workers, **kw)
    return TorchLoader(flist.files, flist.labels, device=acc.device, num_workers=cfg.workers, **kw)


def lr_lambda(cfg: TrainConfig, total_steps: int, steps_per_epoch: int) -> Callable[[int], float]:
    warm = int(cfg.warmup_epochs * steps_per_epoch)

    def f(step: int) -> float:
        if cfg.schedule == "constant":
            return 1.0
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, total_steps - warm)
        return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    return f


def build_optimizers(cfg: TrainConfig, model: nn.Module, augmenter: nn.Module | None, total_steps: int,
                     steps_per_epoch: int):
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                          weight_decay=cfg.weight_decay)
    if cfg.schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total_steps)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total_steps, steps_per_epoch))
    aug_opt = None
    if augmenter is not None:
        if cfg.aug_optimizer == "adam":
            aug_opt = torch.optim.Adam(augmenter.parameters(), lr=cfg.aug_lr, weight_decay=cfg.aug_weight_decay)
        else:
            aug_opt = torch.optim.SGD(augmenter.parameters(), lr=cfg.aug_lr, momentum=cfg.aug_momentum,
                                      weight_decay=cfg.aug_weight_decay)
    return opt, sched, aug_opt


def flat_reduce_mean(acc: Accelerator) -> Callable[[list[Tensor]], list[Tensor]]:
    """All-reduce a list of tensors as one flat buffer (one collective per call)."""

    def reduce(tensors: list[Tensor]) -> list[Tensor]:
        if acc.num_processes == 1:
            return tensors
        flat = acc.reduce(torch.cat([t.reshape(-1).float() for t in tensors]), reduction="mean")
        out, i = [], 0
        for t in tensors:
            out.append(flat[i : i + t.numel()].view_as(t).to(t.dtype))
            i += t.numel()
        return out

    return reduce


@torch.no_grad()
def evaluate(model: nn.Module, loader, acc: Accelerator) -> tuple[float, int]:
    """Accuracy over every real sample exactly once (padding has label -1)."""
    model.eval()
    correct = torch.zeros((), device=acc.device)
    total = torch.zeros((), device=acc.device)
    for x, y in loader:
        x, y = x.to(acc.device), y.to(acc.device)
        with acc.autocast():
            pred = model(x).argmax(1)
        mask = y >= 0
        correct += (pred[mask] == y[mask]).sum()
        total += mask.sum()
    model.train()
    correct, total = acc.reduce(correct, "sum"), acc.reduce(total, "sum")
    return (correct / total.clamp(min=1)).item() * 100, int(total.item())


def sync_buffers(model: nn.Module, acc: Accelerator) -> None:
    """Average BatchNorm running statistics: bilevel steps bypass DDP's buffer broadcast."""
    if acc.num_processes == 1:
        return
    for b in model.buffers():
        if b.is_floating_point():
            b.copy_(acc.reduce(b.detach().clone(), "mean"))


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def training_function(cfg: TrainConfig) -> dict[str, Any]:
    acc = Accelerator(cpu=cfg.cpu, mixed_precision=cfg.mixed_precision)
    if acc.device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // acc.num_processes))
    world = acc.num_processes
    flip = cfg.flip if cfg.augment != "none" else "none"
    out_dir = Path(cfg.output)

    # ---- data, networks and optimizers (all user errors surface here, before compute) ----
    with setup_errors():
        if cfg.batch_size % world:
            raise ValueError(f"--batch-size {cfg.batch_size} must divide evenly over {world} processes")
        if cfg.aug_period < 1:
            raise ValueError(f"--aug-period must be >= 1, got {cfg.aug_period}")
        train_set, test_set = find_splits(cfg.data)
        n_train = len(train_set)
        learned = cfg.augment == "learned"
        # Only the learned augmenter needs a validation split; baselines train on everything.
        val_fraction = cfg.val_fraction if learned else 0.0
        tr_idx0, _ = split_train_val(n_train, val_fraction, cfg.seed, 0)
        steps = len(train_list(train_set.files, train_set.labels, tr_idx0, cfg.batch_size)) // cfg.batch_size
        if cfg.max_steps_per_epoch:
            steps = min(steps, cfg.max_steps_per_epoch)
        set_seed(cfg.seed)  # identical initial weights on every process
        model = create_backbone(cfg.model, len(train_set.classes), cfg.weights)
        augmenter = (Augmenter(cfg.transforms, cfg.aug_size, cfg.center_hidden, cfg.padding_mode)
                     if learned else None)
        if learned and cfg.model.startswith(("vit", "deit", "swin", "eva")):
            import timm.layers  # fused SDPA has no double backward

            timm.layers.set_fused_attn(False)
    per_proc = cfg.batch_size // world
    total_steps = steps * cfg.epochs
    opt, sched, aug_opt = build_optimizers(cfg, model, augmenter, total_steps, steps)
    model = acc.prepare(model)
    if augmenter is not None:
        augmenter.to(acc.device)
    unwrapped = acc.unwrap_model(model)
    torch.manual_seed(cfg.seed * 1000 + acc.process_index)  # per-process noise and flips
    reduce_mean = flat_reduce_mean(acc)

    test_loader = make_loader(cfg, eval_list(test_set.files, test_set.labels, cfg.batch_size), per_proc, False,
                              acc, cfg.seed)
    grid_idx = [int(i) for i in torch.linspace(0, len(test_set) - 1, 8)]
    grid_list = take(test_set.files, test_set.labels, grid_idx)

    def augment_for_grid(x: Tensor) -> Tensor:
        x = random_flip(x, flip)
        if augmenter is not None:
            return augmenter(x)
        return random_translate(x, cfg.translate_px)

    metrics: dict[str, Any] = {"config": cfg.to_dict(), "num_processes": world, "device": str(acc.device),
                               "train_images": n_train, "test_images": len(test_set), "epochs": []}
    if acc.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        acc.print(f"{n_train} train / {len(test_set)} test images, {len(train_set.classes)} classes; "
                  f"{steps} steps/epoch of {cfg.batch_size} on {world} process(es), device {acc.device}")
    t_run = time.perf_counter()
    params = [p for p in unwrapped.parameters() if p.requires_grad]
    theta = list(augmenter.parameters()) if augmenter is not None else []

    for epoch in range(cfg.epochs):
        # ---- the epoch's fresh train/validation split ----
        tr_idx, va_idx = split_train_val(n_train, val_fraction, cfg.seed, epoch)
        tr_list = train_list(train_set.files, train_set.labels, tr_idx, cfg.batch_size)
        tr_list = FileList(tr_list.files[: steps * cfg.batch_size], tr_list.labels[: steps * cfg.batch_size])
        train_loader = make_loader(cfg, tr_list, per_proc, True, acc, cfg.seed * 1000 + epoch)
        val_iter = iter(())
        if learned:
            n_updates = -(-steps // cfg.aug_period)
            va_list = stream_list(train_set.files, train_set.labels, va_idx, n_updates * cfg.batch_size,
                                  epoch_rng(cfg.seed, epoch, 2))
            val_iter = iter(make_loader(cfg, va_list, per_proc, False, acc, cfg.seed * 1000 + epoch))

        model.train()
        sums = {"train_loss": 0.0, "val_loss": 0.0, "updates": 0, "skipped": 0}
        wait = compute = 0.0
        bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not (acc.is_main_process
                   and cfg.progress), dynamic_ncols=True, leave=False)
        t_epoch = t0 = time.perf_counter()
        for step, (x, y) in enumerate(train_loader):
            x, y = random_flip(x.to(acc.device), flip), y.to(acc.device)
            t1 = time.perf_counter()
            wait += t1 - t0
            if learned and step % cfg.aug_period == 0:
                xv, yv = next(val_iter)
                out = bilevel_step(unwrapped, augmenter, opt, x, y, xv.to(acc.device), yv.to(acc.device),
                                   mode=cfg.hypergrad, reduce_mean=reduce_mean, autocast=acc.autocast)
                for p, g in zip(params, out.classifier_grads, strict=True):
                    p.grad = g
                if all(torch.isfinite(h).all() for h in out.augmenter_grads):
                    for t, h in zip(theta, out.augmenter_grads, strict=True):
                        t.grad = h
                    aug_opt.step()
                    sums["updates"] += 1
                else:
                    sums["skipped"] += 1
                aug_opt.zero_grad(set_to_none=True)
                loss, sums["val_loss"] = out.train_loss, sums["val_loss"] + out.val_loss.item()
            else:
                with torch.no_grad():
                    x = augmenter(x) if learned else random_translate(x, cfg.translate_px) \
                        if cfg.augment == "predefined" else x
                with acc.autocast():
                    loss = F.cross_entropy(model(x), y)
                acc.backward(loss)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            sums["train_loss"] += loss.item()
            t0 = time.perf_counter()
            compute += t0 - t1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{(step + 1) * cfg.batch_size / (t0 - t_epoch):.0f}")
        bar.close()
        epoch_time = time.perf_counter() - t_epoch

        # ---- evaluate and log (test only reported, never used for choices) ----
        sync_buffers(unwrapped, acc)
        val_acc = None
        if val_fraction > 0:
            va_eval = take(train_set.files, train_set.labels, va_idx)
            va_eval = eval_list(va_eval.files, va_eval.labels, cfg.batch_size)
            val_acc, _ = evaluate(unwrapped, make_loader(cfg, va_eval, per_proc, False, acc, 0), acc)
        test_acc, n_test = evaluate(unwrapped, test_loader, acc)
        train_loss = acc.reduce(torch.tensor(sums["train_loss"] / max(1, steps), device=acc.device), "mean").item()
        row: dict[str, Any] = {
            "epoch": epoch + 1, "train_loss": train_loss, "val_acc": val_acc, "test_acc": test_acc,
            "test_count": n_test, "images_per_s": steps * cfg.batch_size / epoch_time,
            "step_time_s": compute / max(1, steps), "data_wait_frac": wait / max(epoch_time, 1e-9),
            "lr": sched.get_last_lr()[0], "epoch_time_s": epoch_time,
        }
        if learned:
            row["aug_val_loss"] = sums["val_loss"] / max(1, sums["updates"] + sums["skipped"])
            row["aug_updates"], row["aug_skipped_nonfinite"] = sums["updates"], sums["skipped"]
            with torch.no_grad():
                row["aug_magnitudes"] = magnitudes(augmenter.sample_params(256), cfg.image_size)
        metrics["epochs"].append(row)
        metrics["test_acc"] = test_acc
        metrics["wall_time_s"] = time.perf_counter() - t_run
        if acc.is_main_process:
            msg = (f"epoch {epoch + 1}/{cfg.epochs}: loss {train_loss:.3f}"
                   + (f", val acc {val_acc:.1f}" if val_acc is not None else "")
                   + f", test acc {test_acc:.1f}, {row['images_per_s']:.0f} img/s")
            if learned:
                mag = row["aug_magnitudes"]
                msg += f", |A-I| {mag.get('affine_abs_dev', 0):.3f}, shift {mag.get('translation_px', 0):.2f}px"
            acc.print(msg)
            if cfg.grid_every and cfg.augment != "none" and (epoch + 1) % cfg.grid_every == 0:
                gx, _ = next(iter(make_loader(cfg, grid_list, len(grid_list), False, acc, 0, shards=False)))
                save_grid(augmentation_grid(gx.to(acc.device), augment_for_grid),
                          out_dir / f"augmentations_epoch{epoch + 1:03d}.png")
            write_json(out_dir / "metrics.json", metrics)
    acc.wait_for_everyone()
    if augmenter is not None and acc.is_main_process:
        torch.save(augmenter.state_dict(), out_dir / "augmenter.pt")
    acc.end_training()
    return metrics
