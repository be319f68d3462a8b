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
import signal
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import Tensor, nn
from tqdm.auto import tqdm

from dali_bilevel.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from dali_bilevel.config import TrainConfig
from dali_bilevel.data import BilevelData, FolderData
from dali_bilevel.hypergrad import NoDoubleBackward, StepRecord, hypergradient, train_gradient
from dali_bilevel.viz import augmentation_grid, save_grid
from models import Augmenter, create_backbone, magnitudes, random_flip, random_translate
from models.augmenter import load_policy, save_policy
from models.predefined import random_affine, random_affine_magnitude, random_color_jitter
from pipelines.torch_loader import pil_flavour


class SetupError(Exception):
    """A problem with the user's flags or data, found before any training step."""


@contextmanager
def setup_errors():
    try:
        yield
    except (ValueError, FileNotFoundError, RuntimeError, TypeError) as e:
        raise SetupError(str(e)) from e


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
def evaluate(model: nn.Module, loader: Iterable, acc: Accelerator) -> dict[str, float]:
    """Accuracy over every real sample exactly once (padding has label -1).

    Batches of ``(x, y, group)`` (tiles of one image share a group) are also scored per group,
    by averaging the tiles' softmax probabilities: ``group_acc``.
    """
    model.eval()
    correct = torch.zeros((), device=acc.device)
    total = torch.zeros((), device=acc.device)
    n_groups = getattr(loader, "num_groups", 0)
    probs = labels = None
    for batch in loader:
        x, y = batch[0].to(acc.device), batch[1].to(acc.device)
        with acc.autocast():
            logits = model(x).float()
        mask = y >= 0
        correct += (logits.argmax(1)[mask] == y[mask]).sum()
        total += mask.sum()
        if n_groups:
            g = batch[2].to(acc.device)[mask]
            if probs is None:
                probs = torch.zeros(n_groups, logits.shape[1], device=acc.device)
                labels = torch.full((n_groups,), -1, device=acc.device, dtype=torch.long)
            probs.index_add_(0, g, logits[mask].softmax(1))
            labels[g] = y[mask]
    model.train()
    correct, total = acc.reduce(correct, "sum"), acc.reduce(total, "sum")
    out = {"acc": (correct / total.clamp(min=1)).item() * 100, "count": int(total.item())}
    if probs is not None:
        probs, labels = acc.reduce(probs, "sum"), acc.reduce(labels, "max")
        seen = labels >= 0
        out["group_acc"] = (probs[seen].argmax(1) == labels[seen]).float().mean().item() * 100
        out["group_count"] = int(seen.sum().item())
    return out


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


class LossScaler:
    """Dynamic loss scale for fp16 (1.0 otherwise): back off on overflow, grow after a clean run.

    Our own rather than torch's GradScaler because the bilevel step scales inside
    ``create_graph`` backwards and divides the scale out of g before the look-ahead.
    """

    def __init__(self, enabled: bool, init: float = 2.0**16, growth_interval: int = 2000) -> None:
        self.enabled, self.growth_interval = enabled, growth_interval
        self.scale, self.good = (init if enabled else 1.0), 0

    def update(self, finite: bool) -> None:
        if not self.enabled:
            return
        if not finite:
            self.scale, self.good = max(self.scale / 2, 1.0), 0
        else:
            self.good += 1
            if self.good % self.growth_interval == 0:
                self.scale *= 2

    def state_dict(self) -> dict[str, float]:
        return {"scale": self.scale, "good": self.good}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.scale, self.good = float(state["scale"]), int(state["good"])


def all_finite(tensors: Iterable[Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


class Preempted(Exception):
    """SIGTERM/SIGINT arrived; a checkpoint was written after the current step."""


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop finishes its step, checkpoints and exits cleanly."""

    def __init__(self) -> None:
        self.raised = False
        self._old = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.raised = True

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def any_process(self, acc: Accelerator) -> bool:
        if acc.num_processes == 1:
            return self.raised
        return bool(acc.reduce(torch.tensor(float(self.raised), device=acc.device), "sum").item() > 0)


def training_function(cfg: TrainConfig, make_data: Callable[..., BilevelData] = FolderData) -> dict[str, Any]:
    """Train ω (and θ when ``augment == 'learned'``) and return the metrics written to metrics.json."""
    if cfg.mixed_precision == "fp16" and (cfg.cpu or not torch.cuda.is_available()):
        raise SetupError("--mixed-precision fp16: fp16 autocast does nothing on the CPU; use bf16")
    out_dir = Path(cfg.output)
    acc = Accelerator(cpu=cfg.cpu, mixed_precision=cfg.mixed_precision, project_dir=str(out_dir),
                      log_with="tensorboard" if cfg.tensorboard else None)
    if acc.device.type == "cpu":
        # Intra-op threads per process; DALI_BILEVEL_THREADS overrides (e.g. 1 for concurrent runs).
        torch.set_num_threads(int(os.environ.get("DALI_BILEVEL_THREADS", 0))
                              or max(1, (os.cpu_count() or 1) // acc.num_processes))
    learned = cfg.augment == "learned"
    stn = cfg.augment == "stn"  # Table 1's STN-invariant baseline: θ follows the *training* loss
    flip = cfg.flip if cfg.augment != "none" else "none"
    J, K = cfg.aug_period, cfg.unroll

    # ---- data, networks and optimizers: user errors surface here, before any compute ----
    with setup_errors():
        if J < 1 or not 1 <= K <= J:
            raise ValueError(f"--aug-period J={J} and --unroll K={K} need 1 <= K <= J")
        # Only the learned augmenter needs a validation split; baselines train on everything.
        data = make_data(cfg, acc, cfg.val_fraction if learned else cfg.holdout)
        set_seed(cfg.seed)  # identical initial weights on every process
        model = create_backbone(cfg.model, len(data.classes), cfg.weights)
        augmenter = None
        if learned or stn:
            augmenter = Augmenter(cfg.transforms, cfg.aug_size, cfg.center_hidden, cfg.padding_mode,
                                  init_translate=2 * cfg.aug_init_translate_px / cfg.image_size,
                                  warp_mode=cfg.warp_mode)
        if cfg.augment.startswith("frozen:"):  # an exported policy, applied like a predefined one
            augmenter = load_policy(cfg.augment.split(":", 1)[1])
        resume_from = find_checkpoint(cfg.resume, out_dir)
    if learned and cfg.hypergrad == "exact":
        import timm.layers

        timm.layers.set_fused_attn(False)  # fused SDPA has no double backward
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    steps = data.steps_per_epoch()
    opt, sched, aug_opt = build_optimizers(cfg, model, augmenter if learned or stn else None, steps * cfg.epochs,
                                           steps)
    model = acc.prepare(model)
    if augmenter is not None:
        augmenter.to(acc.device)
    unwrapped = acc.unwrap_model(model)
    params = [p for p in unwrapped.parameters() if p.requires_grad]
    theta = list(augmenter.parameters()) if learned or stn else []
    torch.manual_seed(cfg.seed * 1000 + acc.process_index)  # per-process noise and flips
    scaler = LossScaler(cfg.mixed_precision == "fp16")
    modules = {"model": unwrapped, **({"augmenter": augmenter} if theta else {})}
    optims = {"opt": opt, "sched": sched, "scaler": scaler, **({"aug_opt": aug_opt} if aug_opt else {})}
    metrics: dict[str, Any] = {"config": cfg.to_dict(), "num_processes": acc.num_processes,
                               "device": str(acc.device), "pil": pil_flavour(), "train_images": data.train_size,
                               "epochs": []}
    progress: dict[str, Any] = {"epoch": 0, "step": 0, "global_step": 0, "mode": cfg.hypergrad, "sums": None}
    if resume_from is not None:
        saved = load_checkpoint(resume_from, acc, modules)
        for name, obj in optims.items():
            obj.load_state_dict(saved[name])
        progress, metrics = saved["progress"], saved["metrics"]
        acc.print(f"resumed from {resume_from} at epoch {progress['epoch'] + 1}, step {progress['step']}")
    mode = progress["mode"]
    hyper_kw: dict[str, Any] = dict(reduce_mean=flat_reduce_mean(acc), autocast=acc.autocast)

    def checkpoint(epoch: int, step: int, sums: dict[str, float] | None) -> None:
        progress.update(epoch=epoch, step=step, mode=mode, sums=sums)
        state = {name: obj.state_dict() for name, obj in optims.items()}
        save_checkpoint(out_dir / "checkpoints", progress["global_step"], acc, modules,
                        {**state, "progress": progress, "metrics": metrics})

    def augment(x: Tensor) -> Tensor:
        """The train-time augmentation, for the grid (flips first, as in the paper)."""
        return augment_no_flip(random_flip(x, flip), augmenter, cfg)

    if acc.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        acc.print(f"{data.train_size} train images, {len(data.classes)} classes; {steps} steps/epoch of "
                  f"{cfg.batch_size} on {acc.num_processes} process(es), device {acc.device}, {metrics['pil']}")
    if cfg.tensorboard:
        acc.init_trackers("tensorboard", config={k: v if isinstance(v, int | float | str | bool) else str(v)
                                                 for k, v in cfg.to_dict().items()})
    t_run = time.perf_counter()
    with StopFlag() as stop:
        for epoch in range(progress["epoch"], cfg.epochs):
            start = progress["step"] if epoch == progress["epoch"] else 0
            train_iter = data.train_batches(epoch, start)
            val_iter = data.val_batches(epoch, steps // J, start // J) if learned else iter(())
            model.train()
            sums = progress["sums"] if start else None
            sums = sums or {"train_loss": 0.0, "val_loss": 0.0, "updates": 0, "skipped": 0, "skipped_steps": 0}
            trace: list[StepRecord] = []
            wait = compute = 0.0
            bar = tqdm(total=steps, initial=start, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                       dynamic_ncols=True, disable=not (acc.is_main_process and cfg.progress))
            t_epoch = t0 = time.perf_counter()
            for step, (x, y, *_) in enumerate(train_iter, start=start):
                x = random_flip(x.to(acc.device), flip).contiguous(memory_format=memory_format)
                y = y.to(acc.device)
                t1 = time.perf_counter()
                wait += t1 - t0
                if learned and step % J >= J - K:
                    # One of the K steps the hypergradient unrolls (Eq. 3-5): keep what Eq. 7 revisits.
                    rec, loss, grads = train_gradient(unwrapped, augmenter, opt, x, y, mode=mode,
                                                      loss_scale=scaler.scale, **hyper_kw)
                    trace.append(rec)
                    finite = all_finite(grads)
                    if finite:
                        for p, g in zip(params, grads, strict=True):
                            p.grad = g  # the real step reuses the train gradient: no extra backward
                else:
                    with torch.set_grad_enabled(stn):  # STN-invariant: θ joins ω on the training loss
                        x = augment_no_flip(x, augmenter, cfg)
                    with acc.autocast():
                        loss = F.cross_entropy(model(x), y)
                    acc.backward(loss * scaler.scale)
                    if scaler.enabled:
                        for p in [*params, *theta]:
                            if p.grad is not None:
                                p.grad /= scaler.scale
                    if stn:  # the augmenter is not DDP-wrapped: average its gradients by hand
                        for t, g in zip(theta, hyper_kw["reduce_mean"]([t.grad for t in theta]), strict=True):
                            t.grad = g
                    finite = all_finite(p.grad for p in [*params, *theta] if p.grad is not None)
                if finite and stn:
                    aug_opt.step()
                if stn:
                    aug_opt.zero_grad(set_to_none=True)
                if finite:
                    opt.step()
                else:  # an fp16 overflow: skip the step, back off the scale, drop the unroll
                    sums["skipped_steps"] += 1
                    trace = []
                scaler.update(finite)
                sched.step()
                opt.zero_grad(set_to_none=True)
                if learned and step % J == J - 1 and trace:
                    # Eq. 6-8: θ follows the validation loss at the weights the K real steps reached.
                    xv, yv, *_ = next(val_iter)
                    xv = xv.to(acc.device).contiguous(memory_format=memory_format)
                    try:
                        val_loss, h = hypergradient(unwrapped, augmenter, trace, params, xv, yv.to(acc.device),
                                                    mode=mode, loss_scale=scaler.scale, **hyper_kw)
                    except NoDoubleBackward as e:
                        acc.print(f"warning: exact hypergradient impossible ({e}); switching to --hypergrad "
                                  "finite_difference for the rest of the run")
                        mode = metrics["hypergrad_switched_to"] = "finite_difference"
                        val_loss, h = hypergradient(unwrapped, augmenter, trace, params, xv, yv.to(acc.device),
                                                    mode=mode, loss_scale=scaler.scale, **hyper_kw)
                    trace = []
                    if all_finite(h):
                        for t, hi in zip(theta, h, strict=True):
                            t.grad = hi
                        aug_opt.step()
                        sums["updates"] += 1
                    else:  # never let a non-finite hypergradient reach θ
                        sums["skipped"] += 1
                    aug_opt.zero_grad(set_to_none=True)
                    sums["val_loss"] += val_loss.item()
                sums["train_loss"] += loss.item()
                progress["global_step"] += 1
                t0 = time.perf_counter()
                compute += t0 - t1
                bar.update(1)
                img_s = (step + 1 - start) * cfg.batch_size / (t0 - t_epoch)
                bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{img_s:.0f}")
                if cfg.tensorboard and acc.is_main_process:
                    acc.log({"train/loss": loss.item(), "train/lr": sched.get_last_lr()[0]},
                            step=progress["global_step"])
                if cfg.log_every and (step + 1) % cfg.log_every == 0:
                    acc.print(f"epoch {epoch + 1} step {step + 1}/{steps} loss {loss.item():.4f}", flush=True)
                if not trace:  # a step boundary the hypergradient does not straddle
                    if stop.any_process(acc):
                        checkpoint(epoch, step + 1, sums)
                        raise Preempted(f"stopped by signal at epoch {epoch + 1}, step {step + 1}; "
                                        f"checkpoint in {out_dir / 'checkpoints'}; rerun with --resume auto")
                    if cfg.checkpoint_every and progress["global_step"] % cfg.checkpoint_every == 0:
                        checkpoint(epoch, step + 1, sums)
            bar.close()
            epoch_time = time.perf_counter() - t_epoch

            # ---- evaluate and log: the test split is only reported, never used for choices ----
            sync_buffers(unwrapped, acc)
            # STN-invariant applies its (noise-driven) augmenter at test time too.
            net = nn.Sequential(augmenter, unwrapped) if stn else unwrapped
            scores = {name: evaluate(net, loader, acc) for name, loader in data.eval_splits(epoch).items()}
            train_loss = acc.reduce(torch.tensor(sums["train_loss"] / max(1, steps), device=acc.device),
                                    "mean").item()
            done = steps - start
            row: dict[str, Any] = {
                "epoch": epoch + 1, "train_loss": train_loss,
                "val_acc": scores["val"]["acc"] if "val" in scores else None,
                "test_acc": scores["test"]["acc"], "test_count": scores["test"]["count"],
                "images_per_s": done * cfg.batch_size / epoch_time, "step_time_s": compute / max(1, done),
                "data_wait_frac": wait / max(epoch_time, 1e-9), "epoch_time_s": epoch_time,
                "lr": sched.get_last_lr()[0], "resumed_at_step": start or None,
            }
            for name, sc in scores.items():
                if "group_acc" in sc:
                    row[f"{name}_image_acc"] = sc["group_acc"]
            if learned:
                row["aug_val_loss"] = sums["val_loss"] / max(1, sums["updates"] + sums["skipped"])
                row["aug_updates"], row["aug_skipped_nonfinite"] = sums["updates"], sums["skipped"]
            if theta:
                with torch.no_grad():
                    row["aug_magnitudes"] = magnitudes(augmenter.sample_params(256), cfg.image_size)
            row["skipped_steps_nonfinite"] = sums["skipped_steps"]
            row["loss_scale"] = scaler.scale
            metrics["epochs"].append(row)
            metrics["test_acc"] = row["test_acc"]
            metrics["wall_time_s"] = metrics.get("wall_time_s", 0.0) + epoch_time
            if acc.is_main_process:
                acc.print(epoch_summary(row, cfg.epochs))
                grid = None
                if cfg.grid_every and cfg.augment != "none" and (epoch + 1) % cfg.grid_every == 0:
                    grid = augmentation_grid(data.grid_images().to(acc.device), augment)
                    save_grid(grid, out_dir / f"augmentations_epoch{epoch + 1:03d}.png")
                if cfg.tensorboard:
                    log_epoch(acc, row, grid, progress["global_step"])
                write_json(out_dir / "metrics.json", metrics)
            checkpoint(epoch + 1, 0, None)
    acc.wait_for_everyone()
    if theta and acc.is_main_process:
        save_policy(augmenter, out_dir / "augmenter.pt")
    metrics["run_time_s"] = time.perf_counter() - t_run
    acc.end_training()
    return metrics


def log_epoch(acc: Accelerator, row: dict[str, Any], grid: Tensor | None, step: int) -> None:
    """Epoch scalars (and the augmentation grid) to TensorBoard."""
    scalars = {f"epoch/{k}": float(v) for k, v in row.items() if isinstance(v, int | float) and v is not None}
    scalars.update({f"augmenter/{k}": v for k, v in row.get("aug_magnitudes", {}).items()})
    acc.log(scalars, step=step)
    if grid is not None:
        acc.get_tracker("tensorboard").log_images({"augmentations": grid.unsqueeze(0)}, step=step)


def augment_no_flip(x: Tensor, augmenter: nn.Module | None, cfg: TrainConfig) -> Tensor:
    """The augmentation of a plain (non-unrolled) step; flips were already applied."""
    if augmenter is not None:
        return augmenter(x)
    if cfg.augment != "predefined":
        return x
    if cfg.rotate_deg or cfg.scales() != (1.0, 1.0):
        x = random_affine(x, cfg.translate_px, cfg.rotate_deg, cfg.scales())
    else:
        x = random_translate(x, cfg.translate_px)
    x = random_affine_magnitude(x, cfg.affine_magnitude)
    return random_color_jitter(x, cfg.color_jitter)


def epoch_summary(row: dict[str, Any], epochs: int) -> str:
    msg = f"epoch {row['epoch']}/{epochs}: loss {row['train_loss']:.3f}"
    if row["val_acc"] is not None:
        msg += f", val acc {row['val_acc']:.1f}"
    msg += f", test acc {row['test_acc']:.1f}, {row['images_per_s']:.0f} img/s"
    if "aug_magnitudes" in row:
        mag = row["aug_magnitudes"]
        msg += f", |A-I| {mag.get('affine_abs_dev', 0):.3f}, shift {mag.get('translation_px', 0):.2f}px"
    return msg
