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
  * ``exact``: the gradient with respect to θ and ω of the scalar g_kᵀλ, the directional derivative
    d/dε L_tr^k(θ, ω_k + ελ). ``products="forward"`` takes it in one forward pass that
    carries λ as ω's tangent (forward mode) and one backward; no g_k, no graph of g_k is kept, which
    measured 0.7× the time of ``products="double"``, the double backward through g_k
    (``create_graph=True``), on resnet18. Both are exact; a run checks once on its own network that
    they agree (`forward_products_error`), since forward mode is only as right as each op's tangent rule.
    ``products="auto"`` (the default) takes forward mode for a hyper-batch, whose record needs no pass
    of its own, and the double backward when the record is the real step's own full-batch pass (its
    graph is there already; forward mode would run that forward again: 1.2-1.4× slower measured on
    cifar_resnet18_w16 at batch 128);
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

Step length (``step_length``): Eq. 7 rewards θ for any g with a larger inner product with λ, and a
longer g in the same direction is one, so augmentation that only makes the train batch harder (a larger
loss, a larger step) lowers the one-step validation loss. ``"fixed"`` holds each look-ahead step's
length at the real step's own and lets θ turn it only: λ loses its component along g before the
products (`fixed_length_adjoint`). The look-ahead itself is still exactly the real step.

Hyper-batch (``hyper_batch = b < B``): the real step keeps its full-batch gradient, taken in a plain
pass under ``autocast``; the products of Eq. 7 use the first b samples of the train batch, an
unbiased estimate of the full batch's whose cost scales with b/B (docs/benchmarks/step_cpu.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import forward_ad
from torch.func import functional_call
from torch.overrides import TorchFunctionMode

from dali_bilevel.kinks import KinkTape
from dali_bilevel.precision import HYPERGRAD_PRECISIONS, full_fp32

ReduceMean = Callable[[list[Tensor]], list[Tensor]]
LossFn = Callable[[Tensor, Tensor], Tensor]
Autocast = Callable[[], AbstractContextManager]
MODES = ("exact", "finite_difference")
PRODUCTS = ("auto", "forward", "double")


def no_reduce(tensors: list[Tensor]) -> list[Tensor]:
    """The single-process all-reduce."""
    return tensors


class NoDoubleBackward(RuntimeError):
    """The classifier uses an op with no exact second-order products: its backward is not differentiable
    or it has no forward-mode rule (e.g. fused SDPA)."""


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
    rng: tuple[Tensor, Tensor | None] | None = None  # RNG state before that forward (dropout's masks again)
    step_grad: list[Tensor] | None = None  # the real step's averaged g_k (``step_length="fixed"`` only)


@dataclass
class BilevelGrads:
    """What one K = 1 bilevel step produces; the caller applies both optimizer steps."""

    train_loss: Tensor  # local L_tr, detached
    val_loss: Tensor  # local L_val at ω', detached
    classifier_grads: list[Tensor]  # process-averaged g: the real step's gradient
    augmenter_grads: list[Tensor]  # process-averaged ∇_θ L_val
    lookahead: list[Tensor] | None  # ω', equal to the parameters after the real optimizer step (if kept)


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
    with torch.no_grad():  # torch's own sequence of ops (its foreach SGD): the same bits, few temporaries
        for p, g, c in zip(params, grads, sgd_coefs(optimizer, params), strict=True):
            d = torch.add(g, p, alpha=c.weight_decay) if c.weight_decay else g
            k = 1.0
            if c.momentum:
                kb = 1.0 if c.first else 1 - c.dampening  # torch starts the buffer undampened
                buf_new = d if c.first else optimizer.state[p]["momentum_buffer"].mul(c.momentum).add_(
                    d, alpha=1 - c.dampening)
                d, k = (torch.add(d, buf_new, alpha=c.momentum), 1 + c.momentum * kb) if c.nesterov else (buf_new, kb)
            new.append(torch.add(p, d, alpha=-c.lr))
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


@contextmanager
def _replayed_rng(rec: StepRecord) -> Iterator[None]:
    """Dropout and drop-path draw the masks of the recorded forward again (nothing recorded: fresh ones)."""
    if rec.rng is None:
        yield
        return
    with torch.random.fork_rng([rec.x.device] if rec.x.device.type == "cuda" else []):
        torch.set_rng_state(rec.rng[0])
        if rec.rng[1] is not None:
            torch.cuda.set_rng_state(rec.rng[1], rec.x.device)
        yield


def _batch_norm(x: Tensor, running_mean: Tensor | None, running_var: Tensor | None, weight: Tensor | None = None,
                bias: Tensor | None = None, training: bool = False, momentum: float | None = 0.1,
                eps: float = 1e-5) -> Tensor:
    if not training:
        return F.batch_norm(x, running_mean, running_var, weight, bias, False, momentum, eps)
    shape = [1, -1] + [1] * (x.dim() - 2)
    xf = x.float()  # statistics in float32, as the fused kernel keeps them under autocast
    var, mean = torch.var_mean(xf, [0, *range(2, x.dim())], correction=0, keepdim=True)
    out = (xf - mean) * torch.rsqrt(var + eps)
    out = out * weight.reshape(shape) if weight is not None else out
    return (out + bias.reshape(shape) if bias is not None else out).to(x.dtype)


def _layer_norm(x: Tensor, normalized_shape: Sequence[int], weight: Tensor | None = None, bias: Tensor | None = None,
                eps: float = 1e-5) -> Tensor:
    xf = x.float()
    var, mean = torch.var_mean(xf, list(range(x.dim() - len(normalized_shape), x.dim())), correction=0, keepdim=True)
    out = (xf - mean) * torch.rsqrt(var + eps)
    out = out * weight if weight is not None else out
    return (out + bias if bias is not None else out).to(x.dtype)


def _softmax(x: Tensor, dim: int | None = None, *_: object, dtype: torch.dtype | None = None,
             **__: object) -> Tensor:
    x = x if dtype is None else x.to(dtype)
    e = torch.exp(x - x.amax(dim, keepdim=True).detach())
    return e / e.sum(dim, keepdim=True)


class PlainOps(TorchFunctionMode):
    """Batch norm (training), layer norm and softmax as plain ops inside the tangent pass.

    Differentiating their fused kernels' forward-mode rules again goes wrong: batch norm's treats the
    batch statistics as constants (measured: 18% error in float64 on a conv-BN net, silently); softmax's
    overwrites a tensor the backward needs (an error; log-softmax's too, so the loss is differentiated
    at the logits, `_tangent_products`). Written out, each is exact.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm:
            return _batch_norm(*args, **kwargs)
        if func is F.layer_norm:
            return _layer_norm(*args, **kwargs)
        if func in (F.softmax, torch.softmax, Tensor.softmax):
            return _softmax(*args, **kwargs)
        return func(*args, **kwargs)


def real_gradient(model: nn.Module, augmenter: nn.Module, x: Tensor, y: Tensor, noise: Tensor, *,
                  autocast: Autocast = nullcontext, loss_fn: LossFn = F.cross_entropy,
                  reduce_mean: ReduceMean = no_reduce) -> tuple[Tensor, list[Tensor]]:
    """The real step's gradient from a plain pass over the whole batch, in the run's precision (with a
    hyper-batch, Eq. 7 does not reuse it). It is the real forward: BatchNorm statistics move, once."""
    _, params = trainable(model)
    with torch.no_grad():
        xa = augmenter(x, noise)
    with autocast():
        loss = loss_fn(model(xa), y)
    g = _zeros_for_none(torch.autograd.grad(loss, params, allow_unused=True), params)
    return loss.detach(), reduce_mean(g)


def record_step(model: nn.Module, augmenter: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor,
                noise: Tensor, *, mode: str, passes: Autocast, loss_fn: LossFn, live: bool, real: bool,
                products: str = "auto") -> tuple[StepRecord, Tensor | None, list[Tensor] | None]:
    """Eq. 3-4 on (x, y) at ω_k: the record Eq. 7 revisits, the local loss, and g_k (both None when a
    hyper-batch's record needs no pass of its own).

    ``live``: the parameters themselves are ω_k's leaves, which holds while no optimizer step comes
    before Eq. 7 (`bilevel_step`); otherwise a copy (the K-step trace). ``real``: this forward is the
    real step's (BatchNorm statistics move); else they land on throwaway copies. What is kept for the
    products: g_k's graph (``products="double"``), the kink tape (finite difference), or nothing but
    the RNG state (forward mode runs its own pass later). ``auto``: double if ``real``, else forward.
    """
    if mode not in MODES:
        raise ValueError(f"--hypergrad: unknown mode {mode!r}; choose {', '.join(MODES)}")
    if products not in PRODUCTS:
        raise ValueError(f"--hypergrad-products: unknown {products!r}; choose {', '.join(PRODUCTS)}")
    if products == "auto":
        products = "double" if real else "forward"
    names, params = trainable(model)
    weights = params if live else [p.detach().clone().requires_grad_(True) for p in params]
    double, fd = mode == "exact" and products == "double", mode == "finite_difference"
    rec = StepRecord(x, y, noise, weights, None, sgd_coefs(optimizer, params))
    if not (real or double or fd):  # the tangent pass of a hyper-batch draws its own dropout masks
        return rec, None, None
    rec.kinks = KinkTape() if fd else None
    rec.rng = None if double else _rng_state(x.device)  # the difference's or the tangent pass's dropout masks
    with torch.set_grad_enabled(double):  # only g's own graph needs the augmenter's
        xa = augmenter(x, noise)
    need_grad = double or real  # finite difference needs only the branches of a hyper-batch's forward
    with passes(), torch.set_grad_enabled(need_grad), rec.kinks.record() if fd else nullcontext():
        loss = _loss_at(model, names, weights, dict(model.named_buffers()), xa, y, loss_fn, scratch=not real)
    g = None
    if need_grad:
        g = _zeros_for_none(torch.autograd.grad(loss, weights, create_graph=double, allow_unused=True), weights)
    rec.grads = g if double else None
    return rec, loss.detach(), g


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
    products: str = "auto",
) -> tuple[StepRecord, Tensor, list[Tensor]]:
    """Eq. 3-4 for one of the K real steps the hypergradient unrolls: its record (ω_k copied, since the
    real step moves the parameters before Eq. 7), the local loss and the averaged g of the real step.

    ``x`` is already flipped (predefined, outside the graph). With ``hyper_batch = b`` in (0, B) the
    record holds the first b samples and g comes from a plain full-batch pass; otherwise one pass
    gives both.
    """
    noise = augmenter.sample_noise(x.shape[0]) if noise is None else noise
    passes = bilevel_autocast(autocast, precision, x.device)
    kw = dict(mode=mode, passes=passes, loss_fn=loss_fn, live=False, products=products)
    if 0 < hyper_batch < x.shape[0]:
        loss, g_bar = real_gradient(model, augmenter, x, y, noise, autocast=autocast, loss_fn=loss_fn,
                                    reduce_mean=reduce_mean)
        b = hyper_batch
        rec, _, _ = record_step(model, augmenter, optimizer, x[:b], y[:b], noise[:b], real=False, **kw)
        return rec, loss, g_bar
    rec, loss, g = record_step(model, augmenter, optimizer, x, y, noise, real=True, **kw)
    return rec, loss, reduce_mean([gi.detach() for gi in g])


def _tangent_products(model: nn.Module, augmenter: nn.Module, rec: StepRecord, lam: list[Tensor], want_hvp: bool,
                      *, passes: Autocast, loss_fn: LossFn) -> list[Tensor]:
    """∇_{θ,ω} (g_kᵀλ) with g_kᵀλ = d/dε L_tr^k(θ, ω_k + ελ): ω_k carries λ as its tangent through one
    forward pass, whose tangent output is then differentiated. BatchNorm statistics stay put."""
    names, _ = trainable(model)
    theta = [p for p in augmenter.parameters() if p.requires_grad]
    w = [wk.detach().requires_grad_(want_hvp) for wk in rec.weights]
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    xa = augmenter(rec.x, rec.noise)
    with forward_ad.dual_level():
        duals = {n: forward_ad.make_dual(wi, li) for n, wi, li in zip(names, w, lam, strict=True)}
        try:
            with _replayed_rng(rec), passes(), PlainOps():
                z, z_dot = forward_ad.unpack_dual(functional_call(model, {**duals, **buffers}, (xa,)))
        except NotImplementedError as e:  # an op without a forward-mode rule
            raise NoDoubleBackward(str(e).splitlines()[0]) from e
    wrt = theta + (w if want_hvp else [])
    if z_dot is None:  # the logits do not depend on ω: every product is zero
        return [torch.zeros_like(t) for t in wrt]
    with passes():  # ∂L/∂z with its graph: the loss's own tangent rule is not differentiated (log-softmax's fails)
        (dl_dz,) = torch.autograd.grad(loss_fn(z, rec.y), z, create_graph=True)
    directional = (dl_dz * z_dot).sum()
    return _zeros_for_none(torch.autograd.grad(directional, wrt, allow_unused=True), wrt)


def _products(model: nn.Module, augmenter: nn.Module, rec: StepRecord, lam: list[Tensor], want_hvp: bool, *,
              mode: str, passes: Autocast, loss_fn: LossFn, fd_eps: float) -> tuple[list[Tensor], list[Tensor] | None]:
    """(∂g_k/∂θ)ᵀ λ and, if wanted, (∂g_k/∂ω_k)ᵀ λ: forward mode, or double backward through the
    record's g_k (``products="double"`` kept its graph), or central difference."""
    names, _ = trainable(model)
    theta = [p for p in augmenter.parameters() if p.requires_grad]
    wrt = theta + (rec.weights if want_hvp else [])
    if mode == "exact" and rec.grads is None:
        out = _tangent_products(model, augmenter, rec, lam, want_hvp, passes=passes, loss_fn=loss_fn)
    elif mode == "exact":
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
        sides = []
        for sign in (1.0, -1.0):
            w = [(wk + sign * eps * li).detach().requires_grad_(want_hvp) for wk, li in zip(rec.weights, lam,
                                                                                              strict=True)]
            xa = augmenter(rec.x, rec.noise)
            with _replayed_rng(rec), passes(), rec.kinks.replay():
                loss = _loss_at(model, names, w, buffers, xa, rec.y, loss_fn, scratch=True)
            grads = torch.autograd.grad(loss, theta + (w if want_hvp else []), allow_unused=True)
            sides.append(_zeros_for_none(grads, theta + (w if want_hvp else [])))
        out = [(a - b) / (2 * eps) for a, b in zip(*sides, strict=True)]
    return out[: len(theta)], (out[len(theta) :] if want_hvp else None)


def forward_products_error(model: nn.Module, augmenter: nn.Module, x: Tensor, y: Tensor, *,
                           loss_fn: LossFn = F.cross_entropy) -> float | str:
    """How far this network's forward-mode products are from its double backward's, in float32: the
    relative L2 error of (∂g/∂θ, ∂g/∂ω)ᵀλ for a random λ on (x, y), or why forward mode cannot run.

    Forward mode is exact only if every op's tangent rule can itself be differentiated (`PlainOps`
    fixes the ones known not to be); a run asks once, on its own network, before trusting it. Leaves
    the RNG streams, the parameters and the BatchNorm statistics as they were.
    """
    names, params = trainable(model)
    with torch.random.fork_rng([x.device] if x.device.type == "cuda" else []), full_fp32(x.device.type):
        gen = torch.Generator(device=x.device).manual_seed(0)
        lam = [torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype) for p in params]
        noise = augmenter.sample_noise(x.shape[0], device=x.device, generator=gen)
        rng = _rng_state(x.device)
        w = [p.detach().requires_grad_(True) for p in params]
        loss = _loss_at(model, names, w, dict(model.named_buffers()), augmenter(x, noise), y, loss_fn, scratch=True)
        g = _zeros_for_none(torch.autograd.grad(loss, w, create_graph=True, allow_unused=True), w)
        rec = StepRecord(x, y, noise, w, g, [], rng=rng)  # as `record_step` keeps it for the double backward
        kw = dict(mode="exact", passes=nullcontext, loss_fn=loss_fn, fd_eps=0.0)
        try:  # both through `_products`, the dispatch a run uses
            ref = [t for part in _products(model, augmenter, rec, lam, True, **kw) for t in part]
        except RuntimeError as e:
            raise NoDoubleBackward(str(e).splitlines()[0]) from e
        rec.grads = None  # what forward mode's record holds
        try:
            out = [t for part in _products(model, augmenter, rec, lam, True, **kw) for t in part]
        except (RuntimeError, NotImplementedError) as e:  # NoDoubleBackward included
            return str(e).splitlines()[0]
    num = torch.sqrt(sum(((a.double() - b.double()) ** 2).sum() for a, b in zip(out, ref, strict=True)))
    den = torch.sqrt(sum((b.double() ** 2).sum() for b in ref)).clamp_min(1e-300)
    return float(num / den)


def sgd_adjoint(lam_w: list[Tensor], lam_b: list[Tensor | None], coefs: Sequence[SGDCoef],
                last: bool) -> tuple[list[Tensor], list[Tensor | None]]:
    """Adjoint of one SGD step ω' = ω − lr·s, s = d + μb' (Nesterov) or b', b' = μb + (1−τ)d, d = g + wd·ω:
    from the adjoints of ω' and b', those of d (λ_d, what Eq. 7 contracts with ∂g/∂θ) and of b.

    A zero adjoint is None (no parameter-sized zeros). ``last`` (the first step of the unroll): nothing
    earlier needs λ_ω or λ_b, so λ_d is made in place from λ_ω.
    """
    lam_d, lam_b_prev = [], []
    for lw, lb, c in zip(lam_w, lam_b, coefs, strict=True):
        kb = 1.0 if c.first else 1 - c.dampening  # ∂b'/∂d
        if lb is None:  # λ_d is a multiple of λ_ω
            factor = -c.lr * ((1 + c.momentum * kb if c.nesterov else kb) if c.momentum else 1.0)
            lb_total = None
            if c.momentum and not last and not c.first:
                lb_total = lw * (-c.lr * (c.momentum if c.nesterov else 1.0))
            ld = lw.mul_(factor) if last else lw * factor
        else:
            ls = -c.lr * lw
            lb_total = lb + (c.momentum * ls if c.nesterov else ls)
            ld = (ls if c.nesterov else 0) + kb * lb_total
        lam_b_prev.append(None if lb_total is None else c.momentum * lb_total)
        lam_d.append(ld)
    return lam_d, lam_b_prev


def validation_adjoint(model: nn.Module, final_weights: Sequence[Tensor], x_val: Tensor, y_val: Tensor, *,
                       passes: Autocast, loss_fn: LossFn, reduce_mean: ReduceMean) -> tuple[Tensor, list[Tensor]]:
    """Eq. 6: L_val at ω_K on an unaugmented batch, and its process-averaged gradient (the adjoint of ω_K)."""
    names, _ = trainable(model)
    w_final = [w.detach().requires_grad_(True) for w in final_weights]
    with passes():
        val_loss = _loss_at(model, names, w_final, dict(model.named_buffers()), x_val, y_val, loss_fn, scratch=True)
    v = torch.autograd.grad(val_loss, w_final, allow_unused=True)
    return val_loss.detach(), reduce_mean(_zeros_for_none(v, w_final))


STEP_LENGTHS = ("free", "fixed")


def _check_step_length(step_length: str) -> None:
    if step_length not in STEP_LENGTHS:
        raise ValueError(f"--lookahead-length: unknown {step_length!r}; choose {', '.join(STEP_LENGTHS)}")


def _step_grad(rec: StepRecord) -> list[Tensor]:
    if rec.step_grad is None:
        raise ValueError("step_length='fixed' needs each record's step_grad (the real step's g)")
    return rec.step_grad


def fixed_length_adjoint(lam: list[Tensor], g: Sequence[Tensor]) -> list[Tensor]:
    r"""The adjoint of g when θ may turn the classifier's step but not lengthen it: λ − (λ·ĝ) ĝ.

    Eq. 7 contracts ∂g/∂θ with λ, so θ is rewarded for every g whose inner product with λ is larger,
    and a *longer* g in the same direction is one: augmentation that only makes the train batch harder
    (a larger loss, a larger gradient, a larger step) lowers the one-step validation loss without making
    the step's direction any better. With the look-ahead ω' = ω − η·‖g₀‖·g/‖g‖ (the length held at the
    real step's own ‖g₀‖), ∇_θ L_val = (∂g/∂θ)ᵀ (λ − (λ·ĝ) ĝ) at g = g₀: the same product, with λ's
    component along g removed. One global dot product, on the device; ``g`` is the real step's
    (process-averaged) gradient, the direction every rank shares.
    """
    dot = sum((li.double() * gi.double()).sum() for li, gi in zip(lam, g, strict=True))
    gg = sum((gi.double() ** 2).sum() for gi in g).clamp_min(1e-300)
    coef = dot / gg
    return [li - coef.to(li.dtype) * gi for li, gi in zip(lam, g, strict=True)]


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
    step_length: str = "free",
) -> tuple[Tensor, list[Tensor]]:
    """Eq. 6-7: the validation loss at ω_K and its process-averaged gradient with respect to θ.

    ``trace`` holds the K recorded steps ω_0 → ω_K in order; ``final_weights`` is ω_K (the
    look-ahead, or the real parameters after the K real steps). Pure: writes no ``.grad``.
    ``step_length="fixed"``: θ turns each step but does not lengthen it (`fixed_length_adjoint`; each
    record then carries its step's g as ``step_grad``).
    """
    _check_step_length(step_length)
    passes = bilevel_autocast(autocast, precision, x_val.device)
    val_loss, lam_w = validation_adjoint(model, final_weights, x_val, y_val, passes=passes, loss_fn=loss_fn,
                                         reduce_mean=reduce_mean)
    lam_b: list[Tensor | None] = [None] * len(lam_w)  # adjoint of the momentum buffer b_K: 0 (L_val ignores it)
    theta_grad: list[Tensor] | None = None
    for k in range(len(trace) - 1, -1, -1):
        rec = trace[k]
        lam_d, lam_b_prev = sgd_adjoint(lam_w, lam_b, rec.coefs, last=k == 0)
        # g's adjoint; the weight decay's, below, keeps λ_d itself (only g's length is held)
        lam_g = lam_d if step_length == "free" else fixed_length_adjoint(lam_d, _step_grad(rec))
        th, hvp = _products(model, augmenter, rec, lam_g, want_hvp=k > 0, mode=mode, passes=passes,
                            loss_fn=loss_fn, fd_eps=fd_eps)
        theta_grad = th if theta_grad is None else [a + b for a, b in zip(theta_grad, th, strict=True)]
        if k > 0:
            hvp = reduce_mean(hvp)
            lam_w = [lw + c.weight_decay * ld + h for lw, ld, h, c in zip(lam_w, lam_d, hvp, rec.coefs, strict=True)]
            lam_b = lam_b_prev
    return val_loss, reduce_mean(theta_grad)


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
    keep_lookahead: bool = True,
    products: str = "auto",
    step_length: str = "free",
) -> BilevelGrads:
    """The paper's K = 1 step, pure: g (Eq. 4), ω' from the real optimizer state (Eq. 5), L_val at ω'
    and its adjoint (Eq. 6), then Eq. 7 with the live parameters as ω (nothing has stepped yet).

    ``model`` is the unwrapped classifier (not DDP) in train mode; ``x_val`` is unaugmented. The
    caller's real step with ``classifier_grads`` lands exactly on ``lookahead`` (None unless kept).
    The order keeps at most two parameter-sized tensors beside the model and g (ω' until its adjoint
    is taken, then λ, and g_k too with ``products="double"``); a hyper-batch's record comes after ω'.
    ``step_length="fixed"``: θ may turn the step, not lengthen it (`fixed_length_adjoint`).
    """
    _check_step_length(step_length)
    noise = augmenter.sample_noise(x_tr.shape[0]) if noise is None else noise
    passes = bilevel_autocast(autocast, precision, x_tr.device)
    _, params = trainable(model)
    coefs = sgd_coefs(optimizer, params)
    kw = dict(mode=mode, passes=passes, loss_fn=loss_fn, live=True, products=products)
    hyper = 0 < hyper_batch < x_tr.shape[0]
    if hyper:
        loss, g_bar = real_gradient(model, augmenter, x_tr, y_tr, noise, autocast=autocast, loss_fn=loss_fn,
                                    reduce_mean=reduce_mean)
    else:
        rec, loss, g = record_step(model, augmenter, optimizer, x_tr, y_tr, noise, real=True, **kw)
        g_bar = reduce_mean([gi.detach() for gi in g])
    lookahead, _ = sgd_lookahead(optimizer, params, g_bar)
    val_loss, lam_w = validation_adjoint(model, lookahead, x_val, y_val, passes=passes, loss_fn=loss_fn,
                                         reduce_mean=reduce_mean)
    if not keep_lookahead:
        lookahead = None
    lam_d, _ = sgd_adjoint(lam_w, [None] * len(lam_w), coefs, last=True)
    if step_length == "fixed":
        lam_d = fixed_length_adjoint(lam_d, g_bar)
    if hyper:
        b = hyper_batch
        rec, _, _ = record_step(model, augmenter, optimizer, x_tr[:b], y_tr[:b], noise[:b], real=False, **kw)
    theta_grad, _ = _products(model, augmenter, rec, lam_d, want_hvp=False, mode=mode, passes=passes,
                              loss_fn=loss_fn, fd_eps=fd_eps)
    return BilevelGrads(loss, val_loss, g_bar, reduce_mean(theta_grad), lookahead)


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
