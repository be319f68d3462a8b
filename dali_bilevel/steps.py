"""One object per kind of training step, each owning its augmentation and its updates.

* `PlainStep`: none, predefined, a frozen policy, DALI's RandAugment/TrivialAugment (applied in the
  loader): flips + a fixed augmentation, then ω's step.
* `STNStep`: the STN-invariant baseline: θ joins ω on the *training* loss.
* `BilevelStep`: the paper's method: every J-th step θ follows the hypergradient through the K
  steps before it (`dali_bilevel.hypergrad`).

A step never reads a tensor on the host: losses and counters accumulate on the device (`Step.sums`,
read once per epoch by `Step.stats`, or by `Step.peek` every ``--log-every`` steps). Finiteness is
checked only where it can fail, in one fused kernel whose flag (``found_inf``) makes a fused
optimizer skip its update on the device: fp16's scaled gradients (`LossScale`), and every
hypergradient before it reaches θ. In float32 and bf16 nothing overflows by scaling; a diverged run
is stopped at the next ``--log-every`` read (`train.log_progress`). The classifier's SGD is torch's
default (foreach) there, bit for bit the old loop's updates, and fused only for fp16, with momentum
buffers created up front (the fused kernel leaves a skipped first step's buffer uninitialised).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import Tensor, nn

from dali_bilevel.hypergrad import (
    NoDoubleBackward,
    ReduceMean,
    StepRecord,
    bilevel_step,
    forward_products_error,
    hypergradient,
    random_direction,
    train_gradient,
    trainable,
)
from dali_bilevel.precision import LossScale, Precision
from models import random_flip

#: Per-epoch sums kept on the device, in this order.
SUMS = ("train_loss", "steps", "val_loss", "updates", "skipped_updates", "skipped_steps")


def classifier_sgd(params: list[Tensor], lr: float, momentum: float, nesterov: bool, weight_decay: float,
                   fused: bool = False) -> torch.optim.SGD:
    """ω's SGD. ``fused`` (fp16) skips a step on ``found_inf`` without a host read; its momentum buffers
    are created as zeros, which gives torch's first step (buffer := g; dampening is 0 here), and the
    look-ahead (`hypergrad.sgd_lookahead`) reads them like any later buffer. (The fused CPU kernel
    rounds small tensors differently from the default, hence not fused in float32.)
    """
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                          fused=fused)
    if fused and momentum:
        for p in params:
            opt.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return opt


def finite_flag(grads: list[Tensor]) -> Tensor:
    """1.0 when any entry of ``grads`` is not finite: one fused kernel, no host read, nothing rescaled."""
    found = torch.zeros((), device=grads[0].device)
    torch._amp_foreach_non_finite_check_and_unscale_(grads, found, torch.ones((), device=found.device))
    return found


def checked_products(model: nn.Module, augmenter: nn.Module, image_size: int, num_classes: int,
                     memory_format: torch.memory_format, say: Callable[[str], None]) -> str:
    """``forward`` if this network's forward-mode products agree with its double backward (relative
    error ≤ 1e-3 on four random images: the ops' rules are checked, not an estimate), else ``double``,
    said once. Run when the step is built, so no step waits on a host read; draws from no RNG stream the
    run uses. A network without double backward keeps ``double``, whose first step switches the run to
    finite difference as before.

    The check runs on float64 copies of both networks. In float32 a ReLU input within rounding of 0 can
    fall on the other side of its kink in one of the two passes, and one such unit is enough for a false
    alarm: cifar_resnet18_w16, channels-last, on an AVX2 CPU, measured 1.2e-2 at seeds 0 and 2 (6e-6 at
    seeds 1 and 3), against 6e-7 in float64 at every seed; a wrong rule stays wrong in float64.
    """
    p = next(model.parameters())
    gen = torch.Generator(device=p.device).manual_seed(0)
    x = torch.rand(4, 3, image_size, image_size, device=p.device, generator=gen, dtype=torch.float64)
    x = x.contiguous(memory_format=memory_format)
    y = torch.randint(0, num_classes, (4,), device=p.device, generator=gen)
    # copies: the run's networks keep their dtype, and train mode (the passes being checked are train-mode
    # ones, with batch statistics) touches no flag of theirs
    model64 = copy.deepcopy(model).to(torch.float64).train()
    augmenter64 = copy.deepcopy(augmenter).to(torch.float64)
    try:
        err = forward_products_error(model64, augmenter64, x, y)
    except NoDoubleBackward:
        return "double"
    if isinstance(err, str) or not err <= 1e-3:
        why = err if isinstance(err, str) else f"relative error {err:.1e} to the double backward"
        say(f"note: forward-mode hypergradient products unreliable on this model ({why}); "
            "using --hypergrad-products double")
        return "double"
    return "forward"


class Step:
    """What every kind shares: ω's update (scaled backward, fused finiteness check, device-side skip,
    scale and schedule steps) and the device sums."""

    def __init__(self, model: nn.Module, unwrapped: nn.Module, opt: torch.optim.SGD, sched: Any, scale: LossScale,
                 precision: Precision, flip: str, memory_format: torch.memory_format) -> None:
        self.model, self.unwrapped, self.opt, self.sched, self.scale = model, unwrapped, opt, sched, scale
        self.precision, self.flip, self.memory_format = precision, flip, memory_format
        self.params = trainable(unwrapped)[1]
        dev = next(unwrapped.parameters()).device
        self.sums = torch.zeros(len(SUMS), dtype=torch.float64, device=dev)
        self.last_loss = torch.zeros((), device=dev)

    # ---- what the loop sees ----
    @property
    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.unwrapped}

    @property
    def optimizers(self) -> dict[str, Any]:
        return {"opt": self.opt, "sched": self.sched, "scale": self.scale}

    def begin_epoch(self, epoch: int, start: int, val_batches: Iterator | None = None) -> None:
        self.model.train()
        if not start:
            self.sums.zero_()

    def augment(self, x: Tensor) -> Tensor:
        """Flips, then this kind's augmentation (the augmentation grid draws through this too)."""
        return random_flip(x, self.flip).contiguous(memory_format=self.memory_format)

    def __call__(self, x: Tensor, y: Tensor) -> None:
        x = self.augment(x)  # float32, outside autocast
        with self.precision.plain():
            loss = F.cross_entropy(self.model(x), y)
        self._update(self._backward(loss))
        self._count(loss)

    def at_boundary(self) -> bool:
        """False inside a K-step unroll: no checkpoint or preemption there."""
        return True

    def eval_model(self) -> nn.Module:
        return self.unwrapped

    def peek(self) -> Tensor:
        """The last step's local loss, for progress lines (the caller reads it every --log-every steps)."""
        return self.last_loss

    def stats(self, acc: Accelerator, steps: int) -> dict[str, float]:
        """The epoch's sums, averaged over processes: one all-reduce, one host read."""
        s = (acc.reduce(self.sums.clone(), "sum") if acc.num_processes > 1 else self.sums).cpu()
        n = acc.num_processes
        out = {"train_loss": float((s[0] / n / max(1, steps)).float()), "skipped_steps_nonfinite": int(s[5] / n),
               "loss_scale": float(self.scale.scale)}
        return out

    def state_dict(self) -> dict[str, Tensor]:
        return {"sums": self.sums.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums.copy_(state["sums"])

    # ---- shared mechanics ----
    def _backward(self, loss: Tensor, extra: list[Tensor] | None = None) -> Tensor:
        """Scaled backward, then unscale and flag non-finite gradients in one fused kernel."""
        (loss * self.scale.scale if self.scale.enabled else loss).backward()
        grads = [p.grad for p in self.params if p.grad is not None]
        return self.scale.unscale_(grads + (extra or []))

    def _update(self, found_inf: Tensor) -> None:
        if self.scale.enabled:
            self.opt.found_inf = found_inf  # fused SGD skips the whole step on the device when set
        self.opt.step()
        self.scale.update(found_inf)
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.sums[5] += found_inf

    def _count(self, loss: Tensor) -> None:
        self.last_loss = loss.detach()
        self.sums[0] += self.last_loss.double()
        self.sums[1] += 1


class PlainStep(Step):
    """none, predefined, frozen policies and the loader's RandAugment/TrivialAugment: a fixed
    ``transform`` after the flips, outside autograd and in float32."""

    def __init__(self, *args: Any, transform: Callable[[Tensor], Tensor] | None = None) -> None:
        super().__init__(*args)
        self.transform = transform

    def augment(self, x: Tensor) -> Tensor:
        x = super().augment(x)
        if self.transform is None:
            return x
        with torch.no_grad():
            return self.transform(x)


class AugmenterStep(Step):
    """A step that trains the augmenter too: it owns θ, its optimizer and the hand-made all-reduce (the
    augmenter is not DDP-wrapped), and both are checkpointed."""

    def __init__(self, *args: Any, augmenter: nn.Module, aug_opt: torch.optim.Optimizer,
                 reduce_mean: ReduceMean) -> None:
        super().__init__(*args)
        self.augmenter, self.aug_opt, self.reduce_mean = augmenter, aug_opt, reduce_mean
        self.theta = list(augmenter.parameters())

    @property
    def modules(self) -> dict[str, nn.Module]:
        return {**super().modules, "augmenter": self.augmenter}

    @property
    def optimizers(self) -> dict[str, Any]:
        return {**super().optimizers, "aug_opt": self.aug_opt}


class STNStep(AugmenterStep):
    """Table 1's STN-invariant baseline: θ follows the training loss with ω, and is applied at test time."""

    def augment(self, x: Tensor) -> Tensor:
        return self.augmenter(super().augment(x))  # with its graph: θ learns from this loss

    def __call__(self, x: Tensor, y: Tensor) -> None:
        xa = self.augment(x)
        with self.precision.plain():
            loss = F.cross_entropy(self.model(xa), y)
        (loss * self.scale.scale if self.scale.enabled else loss).backward()
        # The augmenter is not DDP-wrapped: average its gradients by hand, then one fused check.
        theta_grads = self.reduce_mean([t.grad for t in self.theta])
        for t, g in zip(self.theta, theta_grads, strict=True):
            t.grad = g
        found = self.scale.unscale_([p.grad for p in self.params if p.grad is not None] + theta_grads)
        self.aug_opt.found_inf = (found + finite_flag(theta_grads)).clamp(max=1)  # θ never takes a NaN
        self.aug_opt.step()
        self.aug_opt.zero_grad(set_to_none=True)
        self._update(found)
        self._count(loss)

    def eval_model(self) -> nn.Module:
        return nn.Sequential(self.augmenter, self.unwrapped)


class BilevelStep(AugmenterStep):
    """Eq. 3-8: every step is ω's real step; the K steps before each J-th one are recorded, and at
    the J-th θ follows the hypergradient of an unaugmented validation batch through them."""

    def __init__(self, *args: Any, augmenter: nn.Module, aug_opt: torch.optim.Optimizer, reduce_mean: ReduceMean,
                 K: int, J: int, mode: str, hyper_batch: int = 0, control: str = "none", products: str = "auto",
                 step_length: str = "free", on_switch: Callable[[str], None] = print) -> None:
        super().__init__(*args, augmenter=augmenter, aug_opt=aug_opt, reduce_mean=reduce_mean)
        self.K, self.J, self.mode, self.hyper_batch, self.control = K, J, mode, hyper_batch, control
        self.products, self.step_length = products, step_length
        self.on_switch = on_switch
        self.trace: list[StepRecord] = []
        self._pending: tuple[Tensor, list[Tensor]] | None = None
        self.window_inf = torch.zeros((), device=self.sums.device)
        self.i = 0
        self.val_batches: Iterator | None = None

    def begin_epoch(self, epoch: int, start: int, val_batches: Iterator | None = None) -> None:
        super().begin_epoch(epoch, start)
        self.i, self.trace, self._pending, self.val_batches = start, [], None, val_batches
        self.window_inf.zero_()

    def augment(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.augmenter(super().augment(x))

    def __call__(self, x: Tensor, y: Tensor) -> None:
        last = self.i % self.J == self.J - 1  # θ's update comes after this step
        if self.K == 1 and last:  # the paper's step: one pure function, the live parameters as ω
            loss, found = self._paper_step(x, y)
        elif self.i % self.J >= self.J - self.K:  # one of the K steps Eq. 7 unrolls: keep what it revisits
            x = super().augment(x)  # flips only: the augmenter runs inside, with its graph
            rec, loss, g = train_gradient(
                self.unwrapped, self.augmenter, self.opt, x, y, mode=self.mode, reduce_mean=self.reduce_mean,
                autocast=self.precision.plain, precision=self.precision.hypergrad, hyper_batch=self.hyper_batch,
                products=self.products)
            if self.step_length == "fixed":
                rec.step_grad = g  # the direction θ may turn but not lengthen (held until θ's step)
            self.trace.append(rec)
            found = self.scale.clean  # float32 (or bf16) passes: nothing to unscale; θ's check covers g
            for p, gi in zip(self.params, g, strict=True):
                p.grad = gi  # the real step reuses the train gradient: no extra backward
        else:
            x = self.augment(x)
            with self.precision.plain():
                loss = F.cross_entropy(self.model(x), y)
            found = self._backward(loss)
        self.window_inf += found
        self._update(found)
        self._count(loss)
        if last and (self.trace or self._pending):
            self._theta_step(*self._hypergradient())
        self.i += 1

    def _val_batch(self) -> tuple[Tensor, Tensor]:
        xv, yv, *_ = next(self.val_batches)
        b = self.hyper_batch or xv.shape[0]
        return xv[:b].contiguous(memory_format=self.memory_format), yv[:b]

    def _paper_step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """K = 1: `bilevel_step` before ω moves, then θ's update; returns the loss and ω's skip flag."""
        x, (xv, yv) = super().augment(x), self._val_batch()
        kw = dict(reduce_mean=self.reduce_mean, autocast=self.precision.plain, precision=self.precision.hypergrad,
                  hyper_batch=self.hyper_batch, keep_lookahead=False, products=self.products,
                  step_length=self.step_length)
        try:
            out = bilevel_step(self.unwrapped, self.augmenter, self.opt, x, y, xv, yv, mode=self.mode, **kw)
        except NoDoubleBackward as e:
            self._switch(e)
            out = bilevel_step(self.unwrapped, self.augmenter, self.opt, x, y, xv, yv, mode=self.mode, **kw)
        for p, g in zip(self.params, out.classifier_grads, strict=True):
            p.grad = g  # ω's real step: the gradient the look-ahead used
        self._pending = (out.val_loss, out.augmenter_grads)  # θ's update, once ω has stepped
        return out.train_loss, self.scale.clean

    def _hypergradient(self) -> tuple[Tensor, list[Tensor]] | tuple[None, None]:
        """Eq. 6-7 through the recorded K steps (or the K = 1 step's, already computed)."""
        if self.K == 1:
            return self._pending
        xv, yv = self._val_batch()
        try:
            return hypergradient(self.unwrapped, self.augmenter, self.trace, self.params, xv, yv, mode=self.mode,
                                 reduce_mean=self.reduce_mean, autocast=self.precision.plain,
                                 precision=self.precision.hypergrad, step_length=self.step_length)
        except NoDoubleBackward as e:  # this window's records lack what finite difference needs: skip it
            self._switch(e)
            return None, None

    def _switch(self, e: Exception) -> None:
        self.mode = "finite_difference"
        self.on_switch(f"warning: exact hypergradient impossible ({e}); switching to --hypergrad "
                       "finite_difference for the rest of the run")

    def _theta_step(self, val_loss: Tensor | None, h: list[Tensor] | None) -> None:
        """Eq. 8: θ follows the hypergradient; a non-finite one (or a skipped ω step) never reaches θ."""
        self.trace, self._pending = [], None
        if h is None:
            return
        if self.control == "random":  # the ablation: same norm, no signal
            h = random_direction(h)
        found = (finite_flag(h) + self.window_inf).clamp(max=1)
        for t, hi in zip(self.theta, h, strict=True):
            t.grad = hi
        self.aug_opt.found_inf = found  # fused Adam skips on the device
        self.aug_opt.step()
        self.aug_opt.zero_grad(set_to_none=True)
        self.sums[2] += val_loss.double()
        self.sums[3] += 1 - found
        self.sums[4] += found
        self.window_inf.zero_()

    def at_boundary(self) -> bool:
        return not self.trace

    def stats(self, acc: Accelerator, steps: int) -> dict[str, float]:
        out = super().stats(acc, steps)
        s = (acc.reduce(self.sums.clone(), "sum") if acc.num_processes > 1 else self.sums).cpu() / acc.num_processes
        out.update(aug_val_loss=float(s[2] / max(1.0, float(s[3] + s[4]))), aug_updates=int(s[3]),
                   aug_skipped_nonfinite=int(s[4]), hypergrad_mode=self.mode)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "mode": self.mode}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.mode = state["mode"]
