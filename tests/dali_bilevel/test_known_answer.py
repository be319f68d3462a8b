"""Known-answer tests of the hypergradient's signal (dali_bilevel/known_answer.py).

The validation images are a known transformation T* of the training distribution; the augmenter,
trained online from the identity by `bilevel_step`'s hypergradient while the classifier takes its
real SGD steps, must recover T* within ±25% in 300 updates: translation family → a (+3, −2) px
shift, affine family → a 30° rotation, colour family → a +0.2 brightness offset. A control that
replaces the hypergradient by a random direction of the same norm must not. Seed 0; seeds 0-4 all
pass (docs/results/known_answer.md). Each run pins one CPU thread, so the numbers do not depend on
the machine's core count.
"""

from __future__ import annotations

import functools

import pytest
import torch

from dali_bilevel.hypergrad import random_direction
from dali_bilevel.known_answer import DEFAULT_ANSWERS, RunConfig, apply_known, known_matrix, run_known_answer
from models.augmenter import apply_transform

#: One known answer per augmenter family.
FAMILY_TASK = {"translation": "shift", "affine": "rotation", "color": "brightness"}


@functools.cache
def final(task: str, mode: str, control: bool = False) -> dict[str, float]:
    """The readout after a 300-update run (cached: the control test compares with the exact run)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_known_answer(RunConfig(DEFAULT_ANSWERS[task], mode=mode, control=control, seed=0)).final
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("family", list(FAMILY_TASK))
def test_known_answer_exact_hypergradient_recovers_it(family):
    out = final(FAMILY_TASK[family], "exact")
    assert out["rel_error"] <= 0.25, out  # the magnitude (shift: the 2-D vector) within ±25%
    assert out["full_error"] <= 0.5, out  # and the rest of the transform stays near the identity


@pytest.mark.parametrize("family", list(FAMILY_TASK))
def test_known_answer_finite_difference_recovers_it(family):
    """The classifier is smooth (SiLU, no pooling), where the finite-difference mode is valid."""
    out = final(FAMILY_TASK[family], "finite_difference")
    assert out["rel_error"] <= 0.25, out
    assert out["full_error"] <= 0.5, out


@pytest.mark.parametrize("family", list(FAMILY_TASK))
def test_known_answer_random_control_does_not(family):
    control, real = final(FAMILY_TASK[family], "exact", control=True), final(FAMILY_TASK[family], "exact")
    assert control["rel_error"] > 0.5, control  # outside ±50% of the known magnitude
    assert control["full_error"] > 2 * real["full_error"], (control, real)  # and clearly worse than the real one


@pytest.mark.parametrize("task", ["shift", "rotation", "zoom", "brightness", "erase"])
def test_known_answer_is_expressible_by_the_augmenter(task):
    """At A_θ = T* the augmented training images are exactly the validation images: T* is reachable."""
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    answer = DEFAULT_ANSWERS[task]
    mat = known_matrix(answer, 16)
    if task == "erase":  # the same boxes (centres anywhere, off the pixel grid too), T*'s opacity, side 1/2
        centres = torch.rand(4, 2, generator=torch.Generator().manual_seed(1)) * 2.2 - 1.1
        params = {"erase": torch.cat([torch.tensor([[answer.value[0], 0.5]]).expand(4, 2), centres], 1)}
        torch.testing.assert_close(apply_transform(x, params), apply_known(x, answer, centres=centres),
                                   rtol=0, atol=1e-6)
        return
    if mat is None:
        params = {"color": torch.tensor([[answer.value[0], 0.0, 0.0, 0.0]]).expand(4, 4)}
    else:
        params = {"affine": (mat - torch.eye(2, 3, dtype=mat.dtype)).float().reshape(1, 6).expand(4, 6)}
    torch.testing.assert_close(apply_transform(x, params), apply_known(x, answer), rtol=0, atol=1e-6)


def test_known_answer_random_direction():
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(3, 4, dtype=torch.float64, generator=gen), torch.randn(5, generator=gen).float()]
    d = random_direction(grads, torch.Generator().manual_seed(1))
    assert [t.shape for t in d] == [t.shape for t in grads]
    assert [t.dtype for t in d] == [torch.float64, torch.float32]
    assert [t.device for t in d] == [t.device for t in grads]

    def flat(ts):
        return torch.cat([t.double().flatten() for t in ts])

    assert flat(d).norm().item() == pytest.approx(flat(grads).norm().item(), rel=1e-6)
    assert abs(torch.nn.functional.cosine_similarity(flat(d), flat(grads), dim=0)) < 0.9  # not the gradient
    again = random_direction(grads, torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(d, again, strict=True))  # the generator decides
    zeros = random_direction([torch.zeros(3)])
    assert torch.equal(zeros[0], torch.zeros(3))
