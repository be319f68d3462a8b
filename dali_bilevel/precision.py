"""The precision policy: which pass of a step runs in which dtype, and fp16's loss scale.

================================  ===============================  ===================================
pass                              ``--hypergrad-precision fp32``   ``--hypergrad-precision autocast``
                                  (the default)
================================  ===============================  ===================================
plain steps (none, predefined,    ``--mixed-precision``            ``--mixed-precision``
frozen, DALI policies, STN, the   (auto: bf16 on a GPU; fp16 with
bilevel steps outside the K)      a loss scale)
the augmenter: MLP, matrix,       float32 (autocast off)           float32 (autocast off)
``affine_grid``, colour ops
the K unrolled train steps, the   float32, TF32 off                bf16 (fp16 is refused)
validation pass, the products
================================  ===============================  ===================================

Why (docs/hypergradient.md, measured on this project's networks): the exact hypergradient with every
pass under bf16 autocast has cosine 0.34–0.95 to the float64 one, and a bf16 augmenter matrix loses
residuals below about 0.004 (its diagonal moves in steps of 2⁻⁷); with this policy it is above 0.99.
TF32 keeps 10 mantissa bits, so it is switched off for those passes only and restored after; plain
steps keep whatever the user set. fp16 is refused for those passes: fp16 steps need a loss scale of up
to 2¹⁶, and through a graph built with that scale the double backward overflowed (inf already at a
scale of 16 on cifar_resnet18_w16, with ``grad_outputs = λS`` and the result divided by S², measured
during development); the passes would need a second dynamic scale of their own, which is not
implemented. float32 passes have the accuracy (above) at no risk.

fp16 plain steps need a loss scale S (dynamic: halve on overflow, double after ``growth_interval``
clean steps). It lives on the device and is updated by ``torch._amp_update_scale_``, so no step reads
it on the host; a step whose gradients overflowed is skipped on the device by the fused optimizers'
``found_inf`` (see `dali_bilevel.steps`). Every gradient is unscaled exactly once, and Accelerate's own
GradScaler is never created (`training_function` leaves its ``mixed_precision`` at "no").
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor

MIXED = ("no", "bf16", "fp16")
HYPERGRAD_PRECISIONS = ("fp32", "autocast")
AutocastFn = Callable[[], AbstractContextManager]


@contextmanager
def full_fp32(device_type: str) -> Iterator[None]:
    """Autocast off and TF32 off (matmul and cuDNN convolutions) inside; the old settings after."""
    matmul = torch.backends.cuda.matmul.fp32_precision
    conv = torch.backends.cudnn.conv.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    try:
        with torch.autocast(device_type, enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.fp32_precision = matmul
        torch.backends.cudnn.conv.fp32_precision = conv


def no_autocast(device_type: str) -> AbstractContextManager:
    """The augmenter's passes: float32 even inside an autocast region."""
    return torch.autocast(device_type, enabled=False)


@dataclass(frozen=True)
class Precision:
    """The policy above for one device; contexts are zero-argument callables, as `hypergrad` takes them."""

    mixed: str = "no"
    hypergrad: str = "fp32"
    device_type: str = "cpu"

    def __post_init__(self) -> None:
        if self.mixed not in MIXED:
            raise ValueError(f"--mixed-precision: unknown {self.mixed!r}; choose {', '.join(MIXED)}")
        if self.hypergrad not in HYPERGRAD_PRECISIONS:
            raise ValueError(f"--hypergrad-precision: unknown {self.hypergrad!r}; "
                             f"choose {', '.join(HYPERGRAD_PRECISIONS)}")
        if self.mixed == "fp16" and self.hypergrad == "autocast":
            raise ValueError("--hypergrad-precision autocast with --mixed-precision fp16: the double backward of a "
                             "loss-scaled graph overflows fp16 and an unscaled one underflows; use "
                             "--hypergrad-precision fp32 (the default) or bf16")

    @property
    def dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.mixed)

    def plain(self) -> AbstractContextManager:
        """Autocast for plain steps and evaluation."""
        return torch.autocast(self.device_type, dtype=self.dtype) if self.dtype else nullcontext()

    def bilevel(self) -> AbstractContextManager:
        """The unrolled steps, the validation pass and the second-order products."""
        return full_fp32(self.device_type) if self.hypergrad == "fp32" else self.plain()

    def augmenter(self) -> AbstractContextManager:
        return no_autocast(self.device_type)



class LossScale:
    """fp16's dynamic loss scale S, on the device (1 and inert otherwise).

    ``unscale_(grads)`` divides by S in place and returns ``found_inf`` (1.0 when any entry is not
    finite): one fused kernel, no host read. ``update(found_inf)`` backs off or grows S on the device.
    Disabled (float32, bf16), both do nothing: without scaling nothing overflows, and ``clean`` (a
    zero flag) is returned.
    """

    def __init__(self, enabled: bool, device: torch.device, init: float = 2.0**16, growth_interval: int = 2000,
                 growth_factor: float = 2.0, backoff_factor: float = 0.5) -> None:
        self.enabled = enabled
        self.scale = torch.full((), init if enabled else 1.0, dtype=torch.float32, device=device)
        self.growth_tracker = torch.zeros((), dtype=torch.int32, device=device)
        self.growth_interval, self.growth_factor, self.backoff_factor = growth_interval, growth_factor, backoff_factor
        self.clean = torch.zeros((), dtype=torch.float32, device=device)

    def unscale_(self, grads: list[Tensor]) -> Tensor:
        """Divide ``grads`` by S in place and flag any non-finite entry, on the device (enabled only)."""
        if not self.enabled or not grads:
            return self.clean
        found_inf = torch.zeros((), dtype=torch.float32, device=self.scale.device)
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, self.scale.reciprocal())
        return found_inf

    def update(self, found_inf: Tensor) -> None:
        if self.enabled:
            torch._amp_update_scale_(self.scale, self.growth_tracker, found_inf, self.growth_factor,
                                     self.backoff_factor, self.growth_interval)

    def state_dict(self) -> dict[str, Tensor]:
        return {"scale": self.scale.detach().cpu(), "growth_tracker": self.growth_tracker.detach().cpu()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.scale.copy_(state["scale"])
        self.growth_tracker.copy_(state["growth_tracker"])
