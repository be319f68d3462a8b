r"""The online bilevel hypergradient (Mounsaveng et al., WACV 2021, Eq. 3-8, with K = J = 1).

The classifier ω is trained on augmented images A_θ(x_tr); the augmenter θ is trained so that
one real SGD step of ω lowers the loss on an *unaugmented* validation batch:

    (3)  L_tr(θ, ω)  = L(f_ω(A_θ(x_tr)), y_tr)
    (4)  g(θ)        = ∇_ω L_tr(θ, ω)
    (5)  ω'(θ)       = ω − η · D(g(θ))                  the optimizer's own step: lr, momentum, wd
    (6)  L_val(θ)    = L(f_ω'(θ)(x_val), y_val)
    (7)  ∇_θ L_val   = (∂ω'/∂g · ∂g/∂θ)ᵀ ∇_ω' L_val = (∂g/∂θ)ᵀ u,   u = c ⊙ ∇_ω' L_val
    (8)  θ ← θ − β ∇_θ L_val

For SGD (momentum μ, dampening τ, weight decay, optionally Nesterov) ω' is affine in g, so
∂ω'/∂g is a scalar c per tensor (c = −η, −η(1−τ) or −η(1+μ(1−τ))). That turns Eq. 7 into one
vector-Jacobian product, which is what lets the look-ahead use the *global* gradient under
data parallelism: every process all-reduces g (as DDP would), builds the same ω', all-reduces
the validation gradient, and takes its local VJP, whose mean over processes is exact.

Two ways to form (∂g/∂θ)ᵀ u:
  * ``exact``: double backward through the train gradient (``create_graph=True``);
  * ``finite_difference``: DARTS' central difference
    [∇_θ L_tr(θ, ω + εu) − ∇_θ L_tr(θ, ω − εu)] / 2ε, with no double backward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

ReduceMean = Callable[[list[Tensor]], list[Tensor]]
MODES = ("exact", "finite_difference")


def no_reduce(tensors: list[Tensor]) -> list[Tensor]:
    """The single-process all-reduce."""
    return tensors


@dataclass
class BilevelGrads:
    """What one bilevel step produces; the caller applies both optimizer steps."""

    train_loss: Tensor  # local L_tr, detached
    val_loss: Tensor  # local L_val at ω', detached
    classifier_grads: list[Tensor]  # process-averaged g: the real step's gradient
    augmenter_grads: list[Tensor]  # process-averaged ∇_θ L_val
    lookahead: list[Tensor]  # ω', equal to the parameters after the real optimizer step


def sgd_lookahead(
    optimizer: torch.optim.Optimizer, params: Sequence[Tensor], grads: Sequence[Tensor]
) -> tuple[list[Tensor], list[float]]:
    """ω' exactly as ``optimizer.step()`` would produce it from ``grads``, and ∂ω'/∂g per tensor.

    Reads the optimizer's real state (learning rate, momentum buffer, weight decay), so the
    look-ahead matches the classifier's actual trajectory. Computed without autograd.
    """
    if not isinstance(optimizer, torch.optim.SGD):
        raise TypeError(f"the look-ahead needs torch.optim.SGD for the classifier, got {type(optimizer).__name__}")
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    new, coefs = [], []
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            grp = group_of[id(p)]
            if grp.get("maximize", False):
                raise ValueError("the look-ahead does not support SGD(maximize=True)")
            lr, mu, tau, wd = grp["lr"], grp["momentum"], grp["dampening"], grp["weight_decay"]
            d = g + wd * p if wd else g
            k = 1.0
            if mu:
                buf = optimizer.state.get(p, {}).get("momentum_buffer")
                if buf is None:
                    buf_new, kb = d, 1.0  # torch initialises the buffer with the undampened step
                else:
                    buf_new, kb = mu * buf + (1 - tau) * d, 1 - tau
                d, k = (d + mu * buf_new, 1 + mu * kb) if grp["nesterov"] else (buf_new, kb)
            new.append(p - lr * d)
            coefs.append(-lr * k)
    return new, coefs


def _forward_loss(
    model: nn.Module, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor, y: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
) -> Tensor:
    """A forward at given weights whose BatchNorm statistic updates land on throwaway copies."""
    scratch = {k: b.clone() for k, b in buffers.items()}
    return loss_fn(functional_call(model, {**params, **scratch}, (x,)), y)


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
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    fd_eps: float = 0.01,
) -> BilevelGrads:
    """Eq. 3-7 for one train batch and one validation batch. Pure: writes no ``.grad``.

    ``model`` must be the unwrapped classifier (not DDP) in train mode; its BatchNorm
    statistics are updated once, by the real train forward, and never by the look-ahead.
    ``x_tr`` is already flipped (predefined, outside the graph); ``x_val`` is unaugmented.
    """
    if mode not in MODES:
        raise ValueError(f"--hypergrad: unknown mode {mode!r}; choose {', '.join(MODES)}")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    theta = [p for p in augmenter.parameters() if p.requires_grad]
    buffers = dict(model.named_buffers())
    if noise is None:
        noise = augmenter.sample_noise(x_tr.shape[0])
    exact = mode == "exact"

    # Eq. 3-4: the real train forward (BatchNorm statistics update here, once).
    with autocast():
        loss_tr = loss_fn(model(augmenter(x_tr, noise)), y_tr)
    g_local = torch.autograd.grad(loss_tr, params, create_graph=exact, allow_unused=True)
    g_local = [torch.zeros_like(p) if g is None else g for g, p in zip(g_local, params, strict=True)]
    g_bar = reduce_mean([g.detach() for g in g_local])

    # Eq. 5: the look-ahead ω' from the process-averaged gradient and the real optimizer state.
    lookahead, coefs = sgd_lookahead(optimizer, params, g_bar)

    # Eq. 6: validation gradient at ω' (first order only).
    w1 = [w.detach().requires_grad_(True) for w in lookahead]
    with autocast():
        loss_val = _forward_loss(model, dict(zip(names, w1, strict=True)), buffers, x_val, y_val, loss_fn)
    v = reduce_mean(list(torch.autograd.grad(loss_val, w1, allow_unused=True)))
    u = [c * (torch.zeros_like(w) if vi is None else vi) for c, vi, w in zip(coefs, v, w1, strict=True)]

    # Eq. 7: (∂g/∂θ)ᵀ u, by double backward or by a central difference of ∇_θ L_tr.
    if exact:
        h = torch.autograd.grad(g_local, theta, grad_outputs=u, allow_unused=True)
    else:
        eps = fd_eps / (torch.sqrt(sum((ui.float() ** 2).sum() for ui in u)) + 1e-12)
        grads = []
        for sign in (1.0, -1.0):
            shifted = {n: (p + sign * eps * ui).detach() for n, p, ui in zip(names, params, u, strict=True)}
            with autocast():
                loss = _forward_loss(model, shifted, buffers, augmenter(x_tr, noise), y_tr, loss_fn)
            grads.append(torch.autograd.grad(loss, theta, allow_unused=True))
        h = [None if a is None else (a - b) / (2 * eps) for a, b in zip(*grads, strict=True)]
    h = [torch.zeros_like(t) if hi is None else hi for hi, t in zip(h, theta, strict=True)]
    return BilevelGrads(
        train_loss=loss_tr.detach(),
        val_loss=loss_val.detach(),
        classifier_grads=g_bar,
        augmenter_grads=reduce_mean(list(h)),
        lookahead=lookahead,
    )
