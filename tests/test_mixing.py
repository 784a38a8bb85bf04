"""The sample-mixing check of ``batch_dim=0``: losses that mix samples raise, nothing changes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from jdoptim import JacobianOptimizer
from jdoptim.aggregation import UPGrad
from jdoptim.engine import SampleMixingError, _per_sample


class _Centred(nn.Module):
    """Hidden features centred over the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x):
        h = self.a(x)
        return self.b(torch.tanh(h - h.mean(dim=0)))


class _BatchAttention(nn.Module):
    """Each sample attends over the other samples of the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x):
        h = self.a(x)
        return self.b(torch.softmax(h @ h.T / 6**0.5, dim=1) @ h)


def _plain() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))


def _losses(out):
    return out.pow(2).mean(dim=1)


def _two_sample_losses(out):
    losses = _losses(out)
    return torch.cat([losses[:1] + losses[1:2], losses[1:]])  # loss 0 also covers sample 1


def _in_batch_softmax_losses(out):
    return -torch.log_softmax(out[:, 0], dim=0)  # a contrastive loss over the batch


MIXING = {
    "batch-centred": (_Centred, _losses),
    "batch-attention": (_BatchAttention, _losses),
    "two-sample-loss": (_plain, _two_sample_losses),
    "in-batch-softmax": (_plain, _in_batch_softmax_losses),
}


@pytest.mark.parametrize("case", sorted(MIXING))
def test_losses_that_mix_samples_raise_and_change_nothing(case):
    torch.manual_seed(0)
    make, losses_of = MIXING[case]
    model = make()
    opt = JacobianOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), UPGrad(), batch_dim=0)
    before = [p.detach().clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    with pytest.raises(SampleMixingError, match=r"batch_dim=0 .* these losses mix samples"):
        opt.step(lambda: losses_of(model(torch.randn(8, 4))))
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    rng_after = torch.get_rng_state()
    torch.manual_seed(0)
    make()
    torch.randn(8, 4)
    assert torch.equal(rng_after, torch.get_rng_state())  # the check drew from its own generator
    assert not torch.equal(rng, rng_after)


def _digits():
    sklearn = pytest.importorskip("sklearn.datasets")
    data = sklearn.load_digits()
    x = torch.tensor(data.data[:64], dtype=torch.float32) / 16
    return x, torch.tensor(data.target[:64])


PER_SAMPLE = {
    "mlp-random": lambda: (
        nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 3)),
        torch.randn(16, 4),
        torch.randint(0, 3, (16,)),
    ),
    "cnn-random": lambda: (
        nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.LayerNorm(64),
            nn.Linear(64, 3),
        ),
        torch.randn(16, 1, 4, 4),
        torch.randint(0, 3, (16,)),
    ),
    "mlp-digits": lambda: (
        nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)),
        *_digits(),
    ),
}


@pytest.mark.parametrize("case", sorted(PER_SAMPLE))
def test_per_sample_losses_pass_the_check_over_training(case):
    torch.manual_seed(1)
    model, x, y = PER_SAMPLE[case]()
    opt = JacobianOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.5), UPGrad(), batch_dim=0, mixing_check_every=1
    )  # every step: early and late in training
    for _ in range(30):
        opt.step(lambda: nn.functional.cross_entropy(model(x), y, reduction="none"))


def _spy(monkeypatch) -> list[int]:
    calls: list[int] = []
    original = _per_sample.check_per_sample
    monkeypatch.setattr(
        _per_sample, "check_per_sample", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    return calls


@pytest.mark.parametrize(("every", "checked"), [(100, 1), (3, 3), (1, 7), (None, 0)])
def test_mixing_check_every_n_steps(monkeypatch, every, checked):
    calls = _spy(monkeypatch)
    model = _plain()
    opt = JacobianOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        UPGrad(),
        batch_dim=0,
        mixing_check_every=every,
    )
    for _ in range(7):
        opt.step(lambda: _losses(model(torch.randn(8, 4))))
    assert len(calls) == checked  # 3: steps 1, 4 and 7


def test_mixing_check_counts_micro_batches(monkeypatch):
    calls = _spy(monkeypatch)
    model = _plain()
    opt = JacobianOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), UPGrad(), batch_dim=0, mixing_check_every=2
    )
    for k in range(5):  # five micro-batches, one step: passes 1, 3 and 5 are checked
        opt.backward(_losses(model(torch.randn(8, 4))), accumulate=k < 4)
    assert len(calls) == 3


def test_mixing_losses_raise_exactly_on_the_checked_steps():
    torch.manual_seed(0)
    model = _plain()
    opt = JacobianOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), UPGrad(), batch_dim=0, mixing_check_every=3
    )
    x = torch.randn(8, 4)
    opt.step(lambda: _losses(model(x)))  # step 1: checked, per-sample
    for _ in range(2):  # steps 2 and 3: not checked, so mixing losses go through
        opt.step(lambda: _two_sample_losses(model(x)))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(SampleMixingError, match="mix"):  # step 4: checked
        opt.step(lambda: _two_sample_losses(model(x)))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


@pytest.mark.parametrize("every", [0, -3, True, 2.5, "10"])
def test_mixing_check_every_rejects_what_is_not_a_positive_int_or_none(every):
    model = _plain()
    with pytest.raises(ValueError, match=r"mixing_check_every must be a positive int .* got"):
        JacobianOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1), batch_dim=0, mixing_check_every=every
        )
    assert all(not m._forward_hooks for m in model.modules())  # nothing was hooked
