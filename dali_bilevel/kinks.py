"""Freeze a network's kinks, so that a finite difference of its gradient sees a smooth function.

The gradient of a ReLU network jumps wherever a unit changes sign (and a max-pool its argmax). The
central difference ``(∇L(ω + ελ) − ∇L(ω − ελ)) / 2ε`` of the finite-difference hypergradient flips
some of those units at ω ± ελ, and every flip adds a jump divided by 2ε: on this project's ResNets
the estimate had cosine −0.48 to 0.13 to the exact one, in float64 too, and shrinking ε made it
worse (docs/hypergradient.md). The exact double backward differentiates the *local* linear piece:
ReLU'' = 0, the max-pool's argmax fixed.

So: `KinkTape` records, on the forward at ω, which branch every piecewise-linear op took; replayed at
ω ± ελ, each op keeps that branch (``relu(x)`` becomes ``x · mask``, a max-pool gathers at the
recorded argmax). The network is then smooth in ω between the two points (convolutions, BatchNorm,
softmax), and the central difference converges to the exact product as ε → 0. Random ops (dropout,
drop-path) repeat because the caller replays the forward from the same RNG state.

Ops with a kink that this cannot freeze (hard-swish, adaptive max-pool, ...) stop the recording
with `UnsupportedKink`, naming the op: use ``--hypergrad exact`` for such networks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

_RELU = {F.relu, F.relu_, torch.relu, torch.relu_, Tensor.relu, Tensor.relu_}
_LEAKY = {F.leaky_relu, F.leaky_relu_}
_HARDTANH = {F.hardtanh, F.hardtanh_, F.relu6}
_MAXPOOL = {F.max_pool2d}
#: Piecewise ops with kinks in the classifier that are not frozen: FD would be wrong on them.
_UNSUPPORTED = {F.hardswish: "hardswish", F.hardsigmoid: "hardsigmoid", F.threshold: "threshold",
                F.adaptive_max_pool1d: "adaptive_max_pool1d", F.adaptive_max_pool2d: "adaptive_max_pool2d",
                F.adaptive_max_pool3d: "adaptive_max_pool3d", F.max_pool1d: "max_pool1d", F.max_pool3d: "max_pool3d",
                F.rrelu: "rrelu", F.hardshrink: "hardshrink", F.softshrink: "softshrink"}


class UnsupportedKink(RuntimeError):
    """The classifier uses a piecewise op that `KinkTape` cannot freeze."""


class KinkTape:
    """The branches one forward took, in call order; `record()` fills it, `replay()` reuses it."""

    def __init__(self) -> None:
        self.entries: list[Tensor] = []

    def record(self) -> TorchFunctionMode:
        return _Kinks(self, replay=False)

    def replay(self) -> TorchFunctionMode:
        return _Kinks(self, replay=True)


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


class _Kinks(TorchFunctionMode):
    def __init__(self, tape: KinkTape, replay: bool) -> None:
        super().__init__()
        self.tape, self.replaying, self.i = tape, replay, 0

    def __exit__(self, *exc: Any) -> Any:
        if self.replaying and exc[0] is None and self.i != len(self.tape.entries):
            raise RuntimeError(f"kink replay used {self.i} of {len(self.tape.entries)} recorded branches: the "
                               "forward changed between recording and replay")
        return super().__exit__(*exc)

    def _branch(self, make: Any, x: Tensor) -> Tensor:
        """The recorded branch (replay), or ``make()`` stored (record); ``x`` is the op's input."""
        if not self.replaying:
            b = make()
            self.tape.entries.append(b)
            return b
        if self.i >= len(self.tape.entries) or self.tape.entries[self.i].shape[:2] != x.shape[:2]:
            raise RuntimeError("kink replay: the forward differs from the recorded one (an op's shape or count)")
        self.i += 1
        return self.tape.entries[self.i - 1]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _UNSUPPORTED:
            raise UnsupportedKink(f"--hypergrad finite_difference: the classifier uses {_UNSUPPORTED[func]}, a "
                                  "piecewise op whose kinks the finite difference cannot freeze; use --hypergrad exact")
        x = args[0] if args else None
        if func in _RELU:
            inplace = func in (F.relu_, torch.relu_, Tensor.relu_) or _arg(args, kwargs, 1, "inplace", False)
            mask = self._branch(lambda: x.detach() > 0, x)  # relu' as torch's backward defines it
            if not self.replaying:
                return func(*args, **kwargs)
            return x.mul_(mask) if inplace else x * mask
        if func in _LEAKY:
            slope = _arg(args, kwargs, 1, "negative_slope", 0.01)
            inplace = func is F.leaky_relu_ or _arg(args, kwargs, 2, "inplace", False)
            mask = self._branch(lambda: x.detach() > 0, x)
            if not self.replaying:
                return func(*args, **kwargs)
            out = torch.where(mask, x, x * slope)
            return x.copy_(out) if inplace else out
        if func in _HARDTANH:
            if func is F.relu6:
                lo, hi, inplace = 0.0, 6.0, _arg(args, kwargs, 1, "inplace", False)
            else:
                lo, hi = _arg(args, kwargs, 1, "min_val", -1.0), _arg(args, kwargs, 2, "max_val", 1.0)
                inplace = func is F.hardtanh_ or _arg(args, kwargs, 3, "inplace", False)
            # 0: at or below lo, 1: linear (lo < x < hi), 2: at or above hi; as hardtanh's backward
            region = self._branch(lambda: (x.detach() > lo).to(torch.uint8) + (x.detach() >= hi).to(torch.uint8), x)
            if not self.replaying:
                return func(*args, **kwargs)
            out = torch.where(region == 1, x, torch.where(region == 0, x.new_full((), lo), x.new_full((), hi)))
            return x.copy_(out) if inplace else out
        if func in _MAXPOOL:
            names, defaults = ("kernel_size", "stride", "padding", "dilation", "ceil_mode"), (None, None, 0, 1, False)
            kw = {n: _arg(args, kwargs, i + 1, n, d) for i, (n, d) in enumerate(zip(names, defaults, strict=True))}
            want_idx = _arg(args, kwargs, 6, "return_indices", False)
            if not self.replaying:
                out, idx = F.max_pool2d(x, **kw, return_indices=True)
                self.tape.entries.append(idx)
            else:  # gather at the recorded argmax: indices are flat within each (N, C) plane
                idx = self._branch(lambda: None, x)
                out = x.flatten(2).gather(2, idx.flatten(2)).view(idx.shape)
            return (out, idx) if want_idx else out
        return func(*args, **kwargs)
