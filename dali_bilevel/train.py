"""`training_function(config)`: online bilevel augmentation learning on Accelerate, top to bottom.

Set up (data, networks, optimizers and one step object, `dali_bilevel.steps`), resume or start, then
per epoch: every train batch is one call of the step (ω's update; every J-th also θ's), evaluation,
logging, the augmentation grid and a checkpoint. The step never reads a tensor on the host; this loop
does so every ``--log-every`` steps (progress, TensorBoard, the multi-process stop flag) and at epoch
ends.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import Tensor, nn
from tqdm.auto import tqdm

from dali_bilevel.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from dali_bilevel.config import TrainConfig
from dali_bilevel.data import BilevelData, FolderData
from dali_bilevel.hypergrad import trainable
from dali_bilevel.machine import machine_info
from dali_bilevel.precision import LossScale, Precision
from dali_bilevel.steps import BilevelStep, PlainStep, Step, STNStep, checked_products, classifier_sgd
from dali_bilevel.viz import augmentation_grid, save_grid
from models import Augmenter, create_backbone, magnitudes
from models.augmenter import bound_fractions, load_policy, save_policy
from models.predefined import predefined_policy
from pipelines.colour_stats import hue_bound, hue_spread
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


def _dense(t: Tensor) -> Tensor:
    """The permutation of ``t`` whose layout is contiguous (a channels-last weight: N, H, W, C)."""
    return t.permute(sorted(range(t.dim()), key=lambda d: -t.stride(d)))


def pack(tensors: list[Tensor]) -> Tensor:
    """One flat float32 buffer, each tensor in its own memory order (no transposing copy)."""
    return torch.cat([_dense(t).reshape(-1).float() for t in tensors])


def unpack(flat: Tensor, like: list[Tensor]) -> list[Tensor]:
    """`pack`'s inverse: tensors with the layout (strides), dtype and device of ``like``."""
    out, i = [], 0
    for t in like:
        o = torch.empty_like(t)  # keeps t's strides: channels-last stays channels-last
        _dense(o).copy_(flat[i : i + t.numel()].view(_dense(o).shape))
        out.append(o)
        i += t.numel()
    return out


def flat_reduce_mean(acc: Accelerator) -> Callable[[list[Tensor]], list[Tensor]]:
    """All-reduce a list of tensors as one flat buffer (one collective per call).

    Gradients come back in their parameters' memory format, so SGD's update stays on its fast path.
    """

    def reduce(tensors: list[Tensor]) -> list[Tensor]:
        if acc.num_processes == 1:
            return tensors
        return unpack(acc.reduce(pack(tensors), reduction="mean"), tensors)

    return reduce


def build_step(cfg: TrainConfig, acc: Accelerator, num_classes: int, steps: int) -> Step:
    """The networks, their optimizers and the step object of ``cfg.augment`` (``steps`` per epoch, for
    the schedule). `launch/bench_step.py` times exactly this."""
    learned, stn = cfg.augment == "learned", cfg.augment == "stn"
    exact = learned and cfg.hypergrad == "exact"
    set_seed(cfg.seed)  # identical initial weights on every process
    model = create_backbone(cfg.model, num_classes, cfg.weights, image_size=cfg.image_size,
                            fused_attention=not exact)  # fused SDPA has no double backward
    augmenter = None
    if learned or stn:
        augmenter = Augmenter(cfg.transforms, cfg.aug_size, cfg.center_hidden, cfg.padding_mode,
                              init_translate=2 * cfg.aug_init_translate_px / cfg.image_size, warp_mode=cfg.warp_mode,
                              hue_slope=cfg.hue_slope, hue_bound=cfg.hue_bound_rad())
    elif cfg.augment.startswith("frozen:"):  # an exported policy, applied like a predefined one
        augmenter = load_policy(cfg.augment.split(":", 1)[1])
    torch.manual_seed(cfg.seed * 1000 + acc.process_index)  # per-process noise and flips
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    unwrapped = model.to(acc.device, memory_format=fmt)
    model = acc.prepare(unwrapped)  # DDP when there are several processes
    precision = Precision(cfg.resolved_precision(acc.device.type), cfg.hypergrad_precision, acc.device.type)
    scale = LossScale(precision.mixed == "fp16", acc.device)
    opt = classifier_sgd(trainable(unwrapped)[1], cfg.lr, cfg.momentum, cfg.nesterov, cfg.weight_decay,
                         fused=scale.enabled)
    if cfg.schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps * cfg.epochs)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, steps * cfg.epochs, steps))
    flip = cfg.flip if cfg.augment != "none" else "none"
    args = (model, unwrapped, opt, sched, scale, precision, flip, fmt)
    if augmenter is not None:
        augmenter.to(acc.device)
    if not (learned or stn):  # a frozen policy, the predefined one, or nothing (none, DALI's policies)
        transform = augmenter
        if cfg.augment == "predefined":
            transform = predefined_policy(cfg.translate_px, cfg.rotate_deg, cfg.scales(), cfg.affine_magnitude,
                                          cfg.color_jitter)
        return PlainStep(*args, transform=transform)
    if cfg.aug_optimizer == "adam":
        aug_opt = torch.optim.Adam(augmenter.parameters(), lr=cfg.aug_lr, weight_decay=cfg.aug_weight_decay,
                                   fused=True)
    else:
        aug_opt = torch.optim.SGD(augmenter.parameters(), lr=cfg.aug_lr, momentum=cfg.aug_momentum,
                                  weight_decay=cfg.aug_weight_decay, fused=True)
    kw = dict(augmenter=augmenter, aug_opt=aug_opt, reduce_mean=flat_reduce_mean(acc))
    if stn:
        return STNStep(*args, **kw)
    hyper_batch = round(cfg.hyper_batch * cfg.batch_size / acc.num_processes) if cfg.hyper_batch < 1 else 0
    products = cfg.hypergrad_products  # forward mode runs only if this network passes the check
    # auto uses forward mode exactly where a record is not the real step's own pass: with a hyper-batch
    if cfg.hypergrad == "exact" and (products == "forward" or (products == "auto" and hyper_batch)):
        if checked_products(unwrapped, augmenter, cfg.image_size, num_classes, fmt, acc.print) == "double":
            products = "double"
    return BilevelStep(*args, **kw, K=cfg.unroll, J=cfg.aug_period, mode=cfg.hypergrad, hyper_batch=hyper_batch,
                       control=cfg.hypergrad_control, products=products, step_length=cfg.lookahead_length,
                       on_switch=acc.print)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, acc: Accelerator, precision: Precision) -> dict[str, float]:
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
        with precision.plain():
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


class Diverged(Exception):
    """The training loss became non-finite in float32 or bf16 (nothing overflows by scaling there)."""


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

    def any_process(self, acc: Accelerator, step: int, every: int) -> bool:
        """One process: the local flag, every step. Several: a collective, every ``every`` steps."""
        if acc.num_processes == 1:
            return self.raised
        if step % max(1, every):
            return False
        return bool(acc.reduce(torch.tensor(float(self.raised), device=acc.device), "sum").item() > 0)


def training_function(cfg: TrainConfig, make_data: Callable[..., BilevelData] = FolderData) -> dict[str, Any]:
    """Train ω (and θ when ``augment == 'learned'``) and return the metrics written to metrics.json."""
    if cfg.mixed_precision == "fp16" and (cfg.cpu or not torch.cuda.is_available()):
        raise SetupError("--mixed-precision fp16: fp16 autocast does nothing on the CPU; use bf16")
    out_dir = Path(cfg.output)
    # Precision is ours (dali_bilevel.precision): left at "no", Accelerate neither wraps forward in
    # autocast nor creates a GradScaler, so no loss is scaled twice.
    acc = Accelerator(cpu=cfg.cpu, project_dir=str(out_dir), log_with="tensorboard" if cfg.tensorboard else None)
    if acc.device.type == "cpu":  # intra-op threads per process; DALI_BILEVEL_THREADS overrides
        torch.set_num_threads(int(os.environ.get("DALI_BILEVEL_THREADS", 0))
                              or max(1, (os.cpu_count() or 1) // acc.num_processes))
    else:
        torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
    learned = cfg.augment == "learned"
    with setup_errors():  # user errors surface here, before any compute
        if cfg.aug_period < 1 or not 1 <= cfg.unroll <= cfg.aug_period:
            raise ValueError(f"--aug-period J={cfg.aug_period} and --unroll K={cfg.unroll} need 1 <= K <= J")
        # Only the learned augmenter needs a validation split; baselines train on everything.
        data = make_data(cfg, acc, cfg.val_fraction if learned else cfg.holdout)
        if learned and data.steps_per_epoch() < cfg.aug_period:  # small data: θ still moves once an epoch
            if cfg.unroll > data.steps_per_epoch():
                raise ValueError(f"--unroll K={cfg.unroll} is more than the {data.steps_per_epoch()} steps of an "
                                 "epoch; lower --unroll or --batch-size")
            acc.print(f"note: --aug-period {cfg.aug_period} is more than the {data.steps_per_epoch()} steps of an "
                      f"epoch; the augmenter updates every {data.steps_per_epoch()} steps (once an epoch)")
            cfg = dataclasses.replace(cfg, aug_period=data.steps_per_epoch())
        hue_note = None
        # --hue-bound data: the training images' own hue spread bounds the learned hue (pipelines/colour_stats.py)
        if cfg.augment in ("learned", "stn") and cfg.hue_bound == "data":
            spread = hue_spread(data.train.files)
            cfg = dataclasses.replace(cfg, hue_bound=repr(hue_bound(spread)))
            hue_note = {"spread_rad": spread.spread if math.isfinite(spread.spread) else None,  # JSON has no inf
                        "images": spread.images, "with_hue": spread.with_hue}
            acc.print(f"note: --hue-bound data: the mean hues of {spread.with_hue} of {spread.images} training "
                      f"images spread {spread.spread:.3f} rad; learned hue rotations stay within "
                      f"±{cfg.hue_bound_rad():.3f} rad")
        step = build_step(cfg, acc, len(data.classes), data.steps_per_epoch())
        resume_from = find_checkpoint(cfg.resume, out_dir)
    steps, J = data.steps_per_epoch(), cfg.aug_period
    metrics: dict[str, Any] = {"config": cfg.to_dict(), "num_processes": acc.num_processes, "device": str(acc.device),
                               "pil": pil_flavour(), "machine": machine_info(), "train_images": data.train_size,
                               "epochs": []}
    if hue_note:
        metrics["hue_bound_data"] = hue_note
    progress: dict[str, Any] = {"epoch": 0, "step": 0, "global_step": 0}
    if resume_from is not None:
        saved = load_checkpoint(resume_from, acc, step.modules)
        for name, obj in step.optimizers.items():
            obj.load_state_dict(saved[name])
        step.load_state_dict(saved["step"])
        progress, metrics = saved["progress"], saved["metrics"]
        acc.print(f"resumed from {resume_from} at epoch {progress['epoch'] + 1}, step {progress['step']}")

    def checkpoint(epoch: int, i: int) -> None:
        progress.update(epoch=epoch, step=i)
        state = {name: obj.state_dict() for name, obj in step.optimizers.items()}
        save_checkpoint(out_dir / "checkpoints", progress["global_step"], acc, step.modules,
                        {**state, "step": step.state_dict(), "progress": progress, "metrics": metrics})

    if acc.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        acc.print(f"{data.train_size} train images, {len(data.classes)} classes; {steps} steps/epoch of "
                  f"{cfg.batch_size} on {acc.num_processes} process(es), device {acc.device}, {metrics['pil']}")
    if cfg.tensorboard:
        acc.init_trackers("tensorboard", config={k: v if isinstance(v, int | float | str | bool) else str(v)
                                                 for k, v in cfg.to_dict().items()})
    warned: set[str] = set()
    with StopFlag() as stop:
        for epoch in range(progress["epoch"], cfg.epochs):
            start = progress["step"] if epoch == progress["epoch"] else 0
            val = data.val_batches(epoch, steps // J, start // J, cfg.hyper_batch) if learned else None
            step.begin_epoch(epoch, start, val)
            bar = tqdm(total=steps, initial=start, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                       dynamic_ncols=True, disable=not (acc.is_main_process and cfg.progress))
            wait = compute = 0.0
            due = False
            t_epoch = t0 = time.perf_counter()
            for i, (x, y, *_) in enumerate(data.train_batches(epoch, start), start=start):
                t1 = time.perf_counter()
                wait += t1 - t0
                step(x.to(acc.device, non_blocking=True), y.to(acc.device, non_blocking=True))
                progress["global_step"] += 1
                t0 = time.perf_counter()
                compute += t0 - t1
                bar.update(1)
                due |= bool(cfg.checkpoint_every) and progress["global_step"] % cfg.checkpoint_every == 0
                if cfg.log_every and (i + 1) % cfg.log_every == 0:  # the loop's only host read in an epoch
                    img_s = (i + 1 - start) * cfg.batch_size / (t0 - t_epoch)
                    log_progress(acc, cfg, step, bar, f"epoch {epoch + 1} step {i + 1}/{steps}", img_s,
                                 progress["global_step"])
                if step.at_boundary():  # never inside a K-step unroll
                    if stop.any_process(acc, i + 1, cfg.log_every):
                        checkpoint(epoch, i + 1)
                        raise Preempted(f"stopped by signal at epoch {epoch + 1}, step {i + 1}; "
                                        f"checkpoint in {out_dir / 'checkpoints'}; rerun with --resume auto")
                    if due:
                        checkpoint(epoch, i + 1)
                        due = False
            bar.close()
            timing = {"epoch_time": time.perf_counter() - t_epoch, "wait": wait, "compute": compute,
                      "done": steps - start}
            row = end_epoch(cfg, acc, data, step, epoch, start, timing, warned)
            metrics["epochs"].append(row)
            metrics["test_acc"] = row["test_acc"]
            metrics["wall_time_s"] = metrics.get("wall_time_s", 0.0) + timing["epoch_time"]
            if acc.is_main_process:
                write_json(out_dir / "metrics.json", metrics)
            checkpoint(epoch + 1, 0)
    acc.wait_for_everyone()
    data.release()  # the pipelines' threads and buffers now, not at interpreter exit
    if "augmenter" in step.modules and acc.is_main_process:
        save_policy(step.augmenter, out_dir / "augmenter.pt")
    acc.end_training()
    return metrics


def run_main(argv: list[str] | None, config_cls: type, make_data: Callable[..., BilevelData],
             summary: Callable[[dict[str, Any], TrainConfig], str | None]) -> int:
    """A launch script's whole life: parse, train, one line per outcome. Exit 2 for bad flags or data (one
    line naming them), 1 for a diverged run, 0 after a preemption's checkpoint or a finished run."""
    from accelerate import PartialState

    from dali_bilevel.config import parse_config

    try:
        cfg = parse_config(argv, config_cls)
    except ValueError as e:  # a flag the config rejects
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        metrics = training_function(cfg, make_data=make_data)
    except SetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:  # SIGTERM/SIGINT: the step finished and a checkpoint was written
        print(str(e), file=sys.stderr)
        return 0
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    line = summary(metrics, cfg)
    if line and PartialState().is_main_process:  # the summary once, not once per process
        print(line)
    return 0


def log_progress(acc: Accelerator, cfg: TrainConfig, step: Step, bar: tqdm, where: str, img_s: float,
                 global_step: int) -> None:
    """Every --log-every steps: one host read of the last loss, for the bar, TensorBoard and the log."""
    loss = float(step.peek())
    if not math.isfinite(loss) and not step.scale.enabled:  # fp16 skips such steps; elsewhere ω is lost
        raise Diverged(f"training diverged: the loss is {loss} at {where}; lower --lr (or --aug-lr)")
    bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{img_s:.0f}")
    if cfg.tensorboard and acc.is_main_process:
        acc.log({"train/loss": loss, "train/lr": step.sched.get_last_lr()[0]}, step=global_step)
    if not cfg.progress:  # logs without a progress bar get a line
        acc.print(f"{where} loss {loss:.4f}", flush=True)


def end_epoch(cfg: TrainConfig, acc: Accelerator, data: BilevelData, step: Step, epoch: int, start: int,
              timing: dict[str, float], warned: set[str]) -> dict[str, Any]:
    """Evaluate (the test split is only reported, never used for choices), tally, draw and log."""
    sync_buffers(step.unwrapped, acc)
    scores = {name: evaluate(step.eval_model(), loader, acc, step.precision)
              for name, loader in data.eval_splits(epoch).items()}
    done = timing["done"]
    row: dict[str, Any] = {
        "epoch": epoch + 1, **step.stats(acc, data.steps_per_epoch()),
        "val_acc": scores["val"]["acc"] if "val" in scores else None,
        "test_acc": scores["test"]["acc"], "test_count": scores["test"]["count"],
        "images_per_s": done * cfg.batch_size / timing["epoch_time"], "step_time_s": timing["compute"] / max(1, done),
        "data_wait_frac": timing["wait"] / max(timing["epoch_time"], 1e-9), "epoch_time_s": timing["epoch_time"],
        "lr": step.sched.get_last_lr()[0], "resumed_at_step": start or None,
    }
    for name, sc in scores.items():
        if "group_acc" in sc:
            row[f"{name}_image_acc"] = sc["group_acc"]
    augmenter = getattr(step, "augmenter", None)
    if "augmenter" in step.modules:
        with torch.no_grad():
            row["aug_magnitudes"] = magnitudes(augmenter.sample_params(256), cfg.image_size)
            row["aug_at_bound"] = bound_fractions(augmenter.raw_params(256))
    for msg in health(row, len(data.classes)):
        if msg not in warned:
            warned.add(msg)
            acc.print(msg)
    if acc.is_main_process:
        acc.print(epoch_summary(row, cfg.epochs))
        grid = None
        if cfg.grid_every and cfg.augment != "none" and (epoch + 1) % cfg.grid_every == 0:
            grid = augmentation_grid(data.grid_images().to(acc.device), step.augment)
            save_grid(grid, Path(cfg.output) / f"augmentations_epoch{epoch + 1:03d}.png")
        if cfg.tensorboard:
            log_epoch(acc, row, grid, int(epoch + 1) * data.steps_per_epoch())
    return row


def health(row: dict[str, Any], num_classes: int) -> list[str]:
    """Warnings worth one line each (the caller prints each once): a runaway augmenter, a stuck classifier."""
    out = []
    at = {k: v for k, v in row.get("aug_at_bound", {}).items() if v > 0.5}
    if at:
        what = ", ".join(f"{k} {v:.0%}" for k, v in at.items())
        out.append(f"warning: the augmenter sits at its bounds ({what} of samples); its learning rate "
                   "(--aug-lr) is likely too high")
    if row["epoch"] >= 2 and row["train_loss"] > 0.95 * math.log(num_classes):
        out.append(f"warning: the training loss ({row['train_loss']:.2f}) is still at chance level "
                   f"(ln {num_classes} = {math.log(num_classes):.2f}) after {row['epoch']} epochs")
    return out


def log_epoch(acc: Accelerator, row: dict[str, Any], grid: Tensor | None, step: int) -> None:
    """Epoch scalars (and the augmentation grid) to TensorBoard."""
    scalars = {f"epoch/{k}": float(v) for k, v in row.items() if isinstance(v, int | float) and v is not None}
    scalars.update({f"augmenter/{k}": v for k, v in row.get("aug_magnitudes", {}).items()})
    acc.log(scalars, step=step)
    if grid is not None:
        acc.get_tracker("tensorboard").log_images({"augmentations": grid.unsqueeze(0)}, step=step)


def epoch_summary(row: dict[str, Any], epochs: int) -> str:
    msg = f"epoch {row['epoch']}/{epochs}: loss {row['train_loss']:.3f}"
    if row["val_acc"] is not None:
        msg += f", val acc {row['val_acc']:.1f}"
    msg += f", test acc {row['test_acc']:.1f}, {row['images_per_s']:.0f} img/s"
    if "aug_magnitudes" in row:
        mag = row["aug_magnitudes"]
        msg += f", |A-I| {mag.get('affine_abs_dev', 0):.3f}, shift {mag.get('translation_px', 0):.2f}px"
    return msg
