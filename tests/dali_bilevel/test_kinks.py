"""Frozen kinks: a replayed forward is the recorded one at the same weights, and makes the
finite-difference hypergradient exact on piecewise-linear networks (float64, against exact mode)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dali_bilevel.accuracy import cosine
from dali_bilevel.hypergrad import bilevel_step
from dali_bilevel.kinks import KinkTape, UnsupportedKink
from models.augmenter import Augmenter


class Kinky(nn.Module):
    """Every op the tape freezes, in-place and functional forms, plus dropout (replayed by RNG state)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3)
        self.bn, self.bn3 = nn.BatchNorm2d(8), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.bn(self.c1(x)), inplace=True)
        x = F.max_pool2d(x, 2)
        x = F.leaky_relu(self.c2(x), 0.1)
        x = F.dropout(x, 0.2, self.training)
        x = torch.relu(F.hardtanh(self.bn3(self.c3(x))) + 0.2)  # both of hardtanh's kinks in use
        x = F.relu6(x * 6).relu_()  # and relu6's top one
        return self.fc(x.mean((2, 3)))


def test_replay_at_the_same_weights_is_the_recorded_forward():
    torch.manual_seed(0)
    net, x = Kinky().double(), torch.randn(4, 3, 12, 12, dtype=torch.float64)
    tape = KinkTape()
    state = torch.get_rng_state()
    with tape.record():
        a = net(x)
    torch.set_rng_state(state)
    with tape.replay():
        b = net(x)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert len(tape.entries) == 7  # relu_, max-pool, leaky, hardtanh, relu, relu6, relu_ (dropout: by RNG state)
    with pytest.raises(RuntimeError, match="forward"), tape.replay():  # a different forward is refused
        net.c1(x)
        F.relu(torch.zeros(2, 2))


def kinky_state(seed: int = 0):
    torch.manual_seed(seed)
    model = Kinky().double()
    aug = Augmenter("affine,color").double()
    nn.init.normal_(aug.head.weight, std=0.05)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    for _ in range(2):
        F.cross_entropy(model(torch.rand(8, 3, 12, 12, dtype=torch.float64)), torch.randint(0, 5, (8,))).backward()
        opt.step()
        opt.zero_grad()
    data = (torch.rand(16, 3, 12, 12, dtype=torch.float64), torch.randint(0, 5, (16,)),
            torch.rand(16, 3, 12, 12, dtype=torch.float64), torch.randint(0, 5, (16,)))
    return model, aug, opt, data, aug.sample_noise(16)


@pytest.mark.parametrize("seed", [0, 1])
def test_frozen_finite_difference_is_exact_on_a_piecewise_network(seed):
    model, aug, opt, data, noise = kinky_state(seed)
    torch.manual_seed(5)
    exact = bilevel_step(*copy.deepcopy((model, aug, opt)), *data, noise=noise, mode="exact").augmenter_grads
    torch.manual_seed(5)  # the same dropout masks in the real forward
    fd = bilevel_step(*copy.deepcopy((model, aug, opt)), *data, noise=noise, mode="finite_difference").augmenter_grads
    a, b = torch.cat([t.flatten() for t in exact]), torch.cat([t.flatten() for t in fd])
    assert cosine(a, b) > 0.9999
    assert (b.norm() / a.norm()).item() == pytest.approx(1.0, abs=1e-3)


def test_without_freezing_the_difference_is_dominated_by_kinks():
    """The same central difference with the kinks free to flip (as before): far from exact."""
    model, aug, opt, data, noise = kinky_state(0)
    torch.manual_seed(5)
    exact = bilevel_step(*copy.deepcopy((model, aug, opt)), *data, noise=noise, mode="exact").augmenter_grads
    class Passthrough(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    class Free(KinkTape):  # records nothing and replays nothing: the old finite difference
        def record(self):
            return Passthrough()

        def replay(self):
            return Passthrough()

    import dali_bilevel.hypergrad as hg

    real, hg.KinkTape = hg.KinkTape, Free
    try:
        torch.manual_seed(5)
        free = bilevel_step(*copy.deepcopy((model, aug, opt)), *data, noise=noise, mode="finite_difference",
                            fd_eps=1e-2).augmenter_grads
    finally:
        hg.KinkTape = real
    a, b = torch.cat([t.flatten() for t in exact]), torch.cat([t.flatten() for t in free])
    assert cosine(a, b) < 0.9 or not 0.5 < (b.norm() / a.norm()).item() < 2


def test_unsupported_kink_is_refused_with_the_way_out():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Hardswish(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    aug = Augmenter("translation")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.rand(4, 3, 8, 8), torch.randint(0, 3, (4,))
    with pytest.raises(UnsupportedKink, match=r"hardswish.*--hypergrad exact"):
        bilevel_step(model, aug, opt, x, y, x, y, mode="finite_difference")
    bilevel_step(model, aug, opt, x, y, x, y, mode="exact")  # exact mode has no such limit
