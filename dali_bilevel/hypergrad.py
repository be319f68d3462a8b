r"""The online bilevel hypergradient (Mounsaveng et al., WACV 2021, Eq. 3-8).

The classifier ω is trained on augmented images A_θ(x); the augmenter θ is trained so that the
real SGD steps of ω lower the loss on an *unaugmented* validation batch:

    (3)  L_tr^k(θ, ω)  = L(f_ω(A_θ(x_k)), y_k)                          train loss of step k
    (4)  g_k           = ∇_ω L_tr^k(θ, ω_k)                             its gradient, a function of θ
    (5)  ω_{k+1}       = ω_k − η_k · D(g_k, ω_k, b_k)                   the optimizer's own step: lr,
                                                                         momentum buffer b, weight decay
    (6)  L_val(θ)      = L(f_{ω_K(θ)}(x_val), y_val)                    after K unrolled steps
    (7)  ∇_θ L_val     = Σ_k (∂g_k/∂θ)ᵀ λ_k,   λ_k = (∂ω_K/∂g_k)ᵀ ∇_{ω_K} L_val
    (8)  θ ← θ − β ∇_θ L_val                                             every J classifier steps

With K = J = 1 this is the paper's one-step look-ahead ω' = ω − η ∇_ω L(A_θ(x_tr), ω).

Eq. 7 is evaluated in reverse mode. SGD (momentum μ, dampening τ, weight decay λ_wd, optionally
Nesterov) is affine in g and in (ω, b), so the adjoints of its state are scalar multiples per
tensor, plus one Hessian-vector product per earlier step for the curvature term ∂g_k/∂ω_k. Every
product is a local vector-Jacobian product of this process's g_k, so under data parallelism each
process all-reduces g (as DDP would), the validation gradient and the Hessian-vector products, and
the mean of the local θ-gradients is exact.

Two ways to form the products (∂g_k/∂θ)ᵀ λ and (∂g_k/∂ω)ᵀ λ:
  * ``exact``: double backward through g_k (``create_graph=True``);
  * ``finite_difference``: the central difference of ∇_{θ,ω} L_tr^k at ω_k ± ε λ, two extra gradient
    evaluations and no double backward (works with fused attention kernels). The classifier's kinks
    (ReLU signs, max-pool argmaxes) are frozen at ω_k (`dali_bilevel.kinks`): without that, units
    that flip inside ω ± ελ dominate the difference (cosine −0.48 to 0.13 to exact on ResNets).

Precision (`dali_bilevel.precision`): ``autocast`` is the run's mixed precision. With
``precision="fp32"`` (the default) the K train passes, the validation pass and the products run in
float32 with TF32 off, whatever ``autocast`` is; the augmenter always runs in float32 (its forward
switches autocast off). So no pass here needs fp16's loss scale (`dali_bilevel.precision` says why
fp16 is refused for them). ``precision="autocast"`` runs them in the run's bf16 (float32's range, a
coarser direction: docs/hypergradient.md).

Hyper-batch (``hyper_batch = b < B``): the real step keeps its full-batch gradient, taken in a plain
pass under ``autocast``; the products of Eq. 7 use the first b samples of the train batch, an
unbiased estimate of the full batch's whose cost scales with b/B (docs/benchmarks/step_cpu.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from dali_bilevel.kinks import KinkTape
from dali_bilevel.precision import HYPERGRAD_PRECISIONS, full_fp32

ReduceMean = Callable[[list[Tensor]], list[Tensor]]
LossFn = Callable[[Tensor, Tensor], Tensor]
Autocast = Callable[[], AbstractContextManager]
MODES = ("exact", "finite_difference")


def no_reduce(tensors: list[Tensor]) -> list[Tensor]:
    """The single-process all-reduce."""
    return tensors


class NoDoubleBackward(RuntimeError):
    """The classifier uses an op whose backward is not differentiable (e.g. fused SDPA)."""


class SGDCoef(NamedTuple):
    """One tensor's SGD hyper-parameters at one step; `first` means no momentum buffer yet."""

    lr: float
    momentum: float
    dampening: float
    weight_decay: float
    nesterov: bool
    first: bool


@dataclass
class StepRecord:
    """What the hypergradient needs to revisit one classifier step k."""

    x: Tensor  # the (hyper-)batch whose products form Eq. 7, before the augmenter
    y: Tensor
    noise: Tensor
    weights: list[Tensor]  # ω_k, detached leaves (the real parameters move on in place)
    grads: list[Tensor] | None  # g_k with its graph to θ and ω_k (exact mode only)
    coefs: list[SGDCoef]
    kinks: KinkTape | None = None  # finite difference: the branches the forward at ω_k took
    rng: tuple[Tensor, Tensor | None] | None = None  # finite difference: RNG state before that forward


@dataclass
class BilevelGrads:
    """What one K = 1 bilevel step produces; the caller applies both optimizer steps."""

    train_loss: Tensor  # local L_tr, detached
    val_loss: Tensor  # local L_val at ω', detached
    classifier_grads: list[Tensor]  # process-averaged g: the real step's gradient
    augmenter_grads: list[Tensor]  # process-averaged ∇_θ L_val
    lookahead: list[Tensor]  # ω', equal to the parameters after the real optimizer step


def trainable(model: nn.Module) -> tuple[list[str], list[Tensor]]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [n for n, _ in named], [p for _, p in named]


def sgd_coefs(optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> list[SGDCoef]:
    """Read the classifier optimizer's real state for the step about to be taken."""
    if not isinstance(optimizer, torch.optim.SGD):
        raise TypeError(f"the look-ahead needs torch.optim.SGD for the classifier, got {type(optimizer).__name__}")
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    out = []
    for p in params:
        g = group_of[id(p)]
        if g.get("maximize", False):
            raise ValueError("the look-ahead does not support SGD(maximize=True)")
        first = optimizer.state.get(p, {}).get("momentum_buffer") is None
        out.append(SGDCoef(float(g["lr"]), g["momentum"], g["dampening"], g["weight_decay"], g["nesterov"], first))
    return out


def sgd_lookahead(
    optimizer: torch.optim.Optimizer, params: Sequence[Tensor], grads: Sequence[Tensor]
) -> tuple[list[Tensor], list[float]]:
    """ω' exactly as ``optimizer.step()`` would produce it from ``grads``, and ∂ω'/∂g per tensor.

    Reads the optimizer's real state (learning rate, momentum buffer, weight decay), so the
    look-ahead matches the classifier's actual trajectory. Computed without autograd.
    """
    new, dw_dg = [], []
    with torch.no_grad():
        for p, g, c in zip(params, grads, sgd_coefs(optimizer, params), strict=True):
            d = g + c.weight_decay * p if c.weight_decay else g
            k = 1.0
            if c.momentum:
                buf = optimizer.state[p]["momentum_buffer"] if not c.first else None
                kb = 1.0 if c.first else 1 - c.dampening  # torch starts the buffer undampened
                buf_new = d if c.first else c.momentum * buf + (1 - c.dampening) * d
                d, k = (d + c.momentum * buf_new, 1 + c.momentum * kb) if c.nesterov else (buf_new, kb)
            new.append(p - c.lr * d)
            dw_dg.append(-c.lr * k)
    return new, dw_dg


def _loss_at(model: nn.Module, names: list[str], weights: Sequence[Tensor], buffers: dict[str, Tensor],
             x: Tensor, y: Tensor, loss_fn: LossFn, scratch: bool) -> Tensor:
    """Loss at given weights; with ``scratch`` BatchNorm statistic updates land on throwaway copies."""
    bufs = {k: b.clone() for k, b in buffers.items()} if scratch else buffers
    return loss_fn(functional_call(model, {**dict(zip(names, weights, strict=True)), **bufs}, (x,)), y)


def _zeros_for_none(grads: Sequence[Tensor | None], like: Sequence[Tensor]) -> list[Tensor]:
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, like, strict=True)]


def bilevel_autocast(autocast: Autocast, precision: str, device: torch.device) -> Autocast:
    """The context of the bilevel passes: float32 with TF32 off (``fp32``), or the run's ``autocast``."""
    if precision not in HYPERGRAD_PRECISIONS:
        raise ValueError(f"--hypergrad-precision: unknown {precision!r}; choose {', '.join(HYPERGRAD_PRECISIONS)}")
    return (lambda: full_fp32(device.type)) if precision == "fp32" else autocast


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def train_gradient(
    model: nn.Module,
    augmenter: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    *,
    noise: Tensor | None = None,
    mode: str = "exact",
    reduce_mean: ReduceMean = no_reduce,
    autocast: Autocast = nullcontext,
    precision: str = "fp32",
    loss_fn: LossFn = F.cross_entropy,
    hyper_batch: int = 0,
) -> tuple[StepRecord, Tensor, list[Tensor]]:
    """Eq. 3-4 for the real train step k: returns its record, the local loss and the averaged g.

    The full-batch forward is the real one: it updates BatchNorm running statistics, once. ``x`` is
    already flipped (predefined, outside the graph). With ``hyper_batch = b`` in (0, B) the record
    holds the first b samples (see the module's docstring); otherwise the whole batch, whose g is
    then both the real step's gradient and Eq. 7's.
    """
    if mode not in MODES:
        raise ValueError(f"--hypergrad: unknown mode {mode!r}; choose {', '.join(MODES)}")
    names, params = trainable(model)
    buffers = dict(model.named_buffers())
    noise = augmenter.sample_noise(x.shape[0]) if noise is None else noise
    coefs = sgd_coefs(optimizer, params)
    exact = mode == "exact"
    passes = bilevel_autocast(autocast, precision, x.device)
    weights = [p.detach().clone().requires_grad_(True) for p in params]
    full = not 0 < hyper_batch < x.shape[0]
    if not full:  # the real step: a plain pass over the whole batch, in the run's precision
        with torch.no_grad():
            xa = augmenter(x, noise)
        with autocast():
            loss = loss_fn(model(xa), y)
        g_real = _zeros_for_none(torch.autograd.grad(loss, params, allow_unused=True), params)
        x, y, noise = x[:hyper_batch], y[:hyper_batch], noise[:hyper_batch]
    tape, rng = (None, None) if exact else (KinkTape(), _rng_state(x.device))
    xa = augmenter(x, noise)
    need_grad = exact or full  # finite difference needs only the branches of the hyper-batch's forward
    with passes(), torch.set_grad_enabled(need_grad), tape.record() if tape else nullcontext():
        rec_loss = _loss_at(model, names, weights, buffers, xa, y, loss_fn, scratch=not full)
    g = None
    if need_grad:
        g = _zeros_for_none(torch.autograd.grad(rec_loss, weights, create_graph=exact, allow_unused=True), weights)
    if full:
        loss, g_real = rec_loss, g
    g_bar = reduce_mean([gi.detach() for gi in g_real])
    return StepRecord(x, y, noise, weights, g if exact else None, coefs, tape, rng), loss.detach(), g_bar


def _products(model: nn.Module, augmenter: nn.Module, rec: StepRecord, lam: list[Tensor], want_hvp: bool, *,
              mode: str, passes: Autocast, loss_fn: LossFn, fd_eps: float) -> tuple[list[Tensor], list[Tensor] | None]:
    """(∂g_k/∂θ)ᵀ λ and, if wanted, (∂g_k/∂ω_k)ᵀ λ, by double backward or central difference."""
    names, _ = trainable(model)
    theta = [p for p in augmenter.parameters() if p.requires_grad]
    wrt = theta + (rec.weights if want_hvp else [])
    if mode == "exact":
        try:
            out = torch.autograd.grad(rec.grads, wrt, grad_outputs=lam, allow_unused=True)
        except RuntimeError as e:
            if "double backward" in str(e) or "not implemented" in str(e) or "does not require grad" in str(e):
                raise NoDoubleBackward(str(e).splitlines()[0]) from e
            raise
        out = _zeros_for_none(out, wrt)
    else:
        buffers = dict(model.named_buffers())
        eps = fd_eps / (torch.sqrt(sum((li.float() ** 2).sum() for li in lam)) + 1e-12)
        devices = [rec.x.device] if rec.x.device.type == "cuda" else []
        sides = []
        for sign in (1.0, -1.0):
            w = [(wk + sign * eps * li).detach().requires_grad_(want_hvp) for wk, li in zip(rec.weights, lam,
                                                                                              strict=True)]
            xa = augmenter(rec.x, rec.noise)
            with torch.random.fork_rng(devices):  # dropout and drop-path draw the recorded masks again
                torch.set_rng_state(rec.rng[0])
                if rec.rng[1] is not None:
                    torch.cuda.set_rng_state(rec.rng[1], rec.x.device)
                with passes(), rec.kinks.replay():
                    loss = _loss_at(model, names, w, buffers, xa, rec.y, loss_fn, scratch=True)
            grads = torch.autograd.grad(loss, theta + (w if want_hvp else []), allow_unused=True)
            sides.append(_zeros_for_none(grads, theta + (w if want_hvp else [])))
        out = [(a - b) / (2 * eps) for a, b in zip(*sides, strict=True)]
    return out[: len(theta)], (out[len(theta) :] if want_hvp else None)


def hypergradient(
    model: nn.Module,
    augmenter: nn.Module,
    trace: Sequence[StepRecord],
    final_weights: Sequence[Tensor],
    x_val: Tensor,
    y_val: Tensor,
    *,
    mode: str = "exact",
    reduce_mean: ReduceMean = no_reduce,
    autocast: Autocast = nullcontext,
    precision: str = "fp32",
    loss_fn: LossFn = F.cross_entropy,
    fd_eps: float = 0.01,
) -> tuple[Tensor, list[Tensor]]:
    """Eq. 6-7: the validation loss at ω_K and its process-averaged gradient with respect to θ.

    ``trace`` holds the K recorded steps ω_0 → ω_K in order; ``final_weights`` is ω_K (the
    look-ahead, or the real parameters after the K real steps). Pure: writes no ``.grad``.
    """
    names, _ = trainable(model)
    buffers = dict(model.named_buffers())
    passes = bilevel_autocast(autocast, precision, x_val.device)
    w_final = [w.detach().requires_grad_(True) for w in final_weights]
    with passes():
        val_loss = _loss_at(model, names, w_final, buffers, x_val, y_val, loss_fn, scratch=True)
    v = torch.autograd.grad(val_loss, w_final, allow_unused=True)
    lam_w = reduce_mean(_zeros_for_none(v, w_final))  # adjoint of ω_K
    lam_b = [torch.zeros_like(w) for w in lam_w]  # adjoint of the momentum buffer b_K (unused by L_val)
    theta_grad: list[Tensor] | None = None
    for k in range(len(trace) - 1, -1, -1):
        rec = trace[k]
        # Adjoint of one SGD step: ω' = ω − lr·s,  s = d + μb' (Nesterov) or b',  b' = μb + (1−τ)d,  d = g + wd·ω.
        lam_d, lam_b_prev = [], []
        for lw, lb, c in zip(lam_w, lam_b, rec.coefs, strict=True):
            ls = -c.lr * lw
            if c.momentum:
                lb_total = lb + (c.momentum * ls if c.nesterov else ls)
                ld = (ls if c.nesterov else 0) + (1.0 if c.first else 1 - c.dampening) * lb_total
                lam_b_prev.append(torch.zeros_like(lb) if c.first else c.momentum * lb_total)
            else:
                ld = ls
                lam_b_prev.append(torch.zeros_like(lb))
            lam_d.append(ld)
        th, hvp = _products(model, augmenter, rec, lam_d, want_hvp=k > 0, mode=mode, passes=passes,
                            loss_fn=loss_fn, fd_eps=fd_eps)
        theta_grad = th if theta_grad is None else [a + b for a, b in zip(theta_grad, th, strict=True)]
        if k > 0:
            hvp = reduce_mean(hvp)
            lam_w = [lw + c.weight_decay * ld + h for lw, ld, h, c in zip(lam_w, lam_d, hvp, rec.coefs, strict=True)]
            lam_b = lam_b_prev
    return val_loss.detach(), reduce_mean(theta_grad)


def bilevel_step(
    model: nn.Module,
    augmenter: nn.Module,
    optimizer: torch.optim.Optimizer,
    x_tr: Tensor,
    y_tr: Tensor,
    x_val: Tensor,
    y_val: Tensor,
    *,
    noise: Tensor | None = None,
    mode: str = "exact",
    reduce_mean: ReduceMean = no_reduce,
    autocast: Autocast = nullcontext,
    precision: str = "fp32",
    loss_fn: LossFn = F.cross_entropy,
    fd_eps: float = 0.01,
    hyper_batch: int = 0,
) -> BilevelGrads:
    """The paper's K = J = 1 step, pure: look-ahead ω' from the real optimizer state, then Eq. 7.

    ``model`` is the unwrapped classifier (not DDP) in train mode; ``x_val`` is unaugmented.
    The caller's real step with ``classifier_grads`` lands exactly on ``lookahead``.
    """
    kw = dict(mode=mode, reduce_mean=reduce_mean, autocast=autocast, precision=precision, loss_fn=loss_fn)
    rec, loss, g_bar = train_gradient(model, augmenter, optimizer, x_tr, y_tr, noise=noise, hyper_batch=hyper_batch,
                                      **kw)
    _, params = trainable(model)
    lookahead, _ = sgd_lookahead(optimizer, params, g_bar)
    val_loss, theta_grad = hypergradient(model, augmenter, [rec], lookahead, x_val, y_val, fd_eps=fd_eps, **kw)
    return BilevelGrads(loss, val_loss, g_bar, theta_grad, lookahead)


def random_direction(grads: Sequence[Tensor], generator: torch.Generator | None = None) -> list[Tensor]:
    """A Gaussian direction over all tensors jointly, rescaled to the global L2 norm of ``grads``: the
    control ablation's "hypergradient", which moves θ as far as the real one every update but carries
    none of its information. Each tensor is drawn on its gradient's device and dtype (a ``generator``
    must live there, as ``torch.randn`` requires); zero gradients give a zero direction."""
    out = [torch.randn(g.shape, generator=generator, device=g.device, dtype=g.dtype) for g in grads]
    if not grads:
        return out
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
    drawn = torch.sqrt(sum((d.double() ** 2).sum() for d in out)).clamp_min(1e-300)
    return [d * (norm / drawn).to(device=d.device, dtype=d.dtype) for d in out]
