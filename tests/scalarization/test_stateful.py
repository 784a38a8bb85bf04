"""UW, IMTL-L, DWA and FAMO against their papers, their state round trips, and ``reset``."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch

from jdoptim.scalarization import DWA, FAMO, IMTLL, UW, Random
from tests.scalarization._values import digits_losses, leaf


def _roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("cls", [UW, IMTLL])
def test_learned_weights_value_and_gradients(cls):
    values = leaf(digits_losses(50))
    scalarizer = cls(10).double()
    name = "log_var" if cls is UW else "log_scale"
    s = np.linspace(-1.0, 1.0, 10)
    with torch.no_grad():
        getattr(scalarizer, name).copy_(torch.from_numpy(s))
    out = scalarizer(values)
    grad_values, grad_s = torch.autograd.grad(out, [values, getattr(scalarizer, name)])
    L = values.detach().numpy()
    if cls is UW:  # Kendall et al., Eq. 7 with s = log σ²
        value, d_values, d_s = (
            (0.5 * np.exp(-s) * L + 0.5 * s).sum(),
            0.5 * np.exp(-s),
            (0.5 - 0.5 * np.exp(-s) * L),
        )
    else:  # Liu et al., Eq. 2
        value, d_values, d_s = (np.exp(s) * L - s).sum(), np.exp(s), np.exp(s) * L - 1
    np.testing.assert_allclose(float(out.detach()), value, rtol=1e-12)
    np.testing.assert_allclose(grad_values.numpy(), d_values, rtol=1e-12)
    np.testing.assert_allclose(grad_s.numpy(), d_s, rtol=1e-12)


@pytest.mark.parametrize("cls", [UW, IMTLL])
def test_learning_the_parameters_reaches_the_papers_optimum(cls):
    """Minimising over s alone: e^{s} = L (UW) and e^{s} L = 1 (IMTL-L)."""
    losses = torch.tensor([0.05, 1.0, 20.0], dtype=torch.float64)
    scalarizer = cls(3).double()
    opt = torch.optim.Adam(scalarizer.parameters(), lr=0.05)
    for _ in range(2000):
        opt.zero_grad()
        scalarizer(losses).backward()
        opt.step()
    (s,) = scalarizer.parameters()
    target = losses.log() if cls is UW else -losses.log()
    torch.testing.assert_close(s.detach(), target, rtol=1e-4, atol=1e-4)
    scalarizer.reset()
    assert torch.equal(s.detach(), torch.zeros(3, dtype=torch.float64))


def _dwa_reference(epochs: list[list[np.ndarray]], temperature: float) -> list[list[float]]:
    """Liu et al. (2019), Eq. 7, written as a loop over epochs: the scalar of every batch."""
    averages, scalars = [], []
    for batches in epochs:
        if len(averages) < 2:
            weights = np.ones_like(batches[0])
        else:
            rates = averages[-1] / averages[-2]
            e = np.exp(rates / temperature)
            weights = len(rates) * e / e.sum()
        scalars.append([float(weights @ b) for b in batches])
        averages.append(np.mean(batches, axis=0))
    return scalars


def test_dwa_against_the_paper_and_state_round_trip():
    rng = np.random.default_rng(0)
    epochs = [[rng.uniform(0.5, 2.0, 3) * 0.7**e for _ in range(4)] for e in range(5)]
    expected = _dwa_reference(epochs, 2.0)
    dwa = DWA(2.0)
    for e, batches in enumerate(epochs):
        if e == 3:  # checkpoint mid-run, resume in a fresh instance
            resumed = DWA(2.0)
            resumed.load_state_dict(_roundtrip(dwa.state_dict()))
            dwa = resumed
        for b, batch in enumerate(batches):
            out = dwa(torch.tensor(batch, dtype=torch.float64))
            np.testing.assert_allclose(float(out), expected[e][b], rtol=1e-12)
        dwa.step()
    dwa.reset()
    assert dwa.get_extra_state() == {"sum": None, "batches": 0, "averages": []}
    with pytest.raises(KeyError, match="missing keys"):
        dwa.load_state_dict({"_extra_state": {"sum": None}})
    with pytest.raises(ValueError, match="temperature"):
        DWA(0.0)


def test_dwa_rejects_a_change_of_shape_within_its_history():
    dwa = DWA()
    for _ in range(2):
        dwa(torch.ones(3))
        dwa.step()
    with pytest.raises(ValueError, match=r"averages have shape \(3,\)"):
        dwa(torch.ones(2))


def _famo_reference(steps, min_losses, lr, weight_decay, eps):
    """FAMO's Algorithm 1 with torch's own Adam on the logits and autograd through softmax."""
    logits = torch.zeros(len(min_losses), dtype=torch.float64, requires_grad=True)
    adam = torch.optim.Adam([logits], lr=lr, weight_decay=weight_decay)
    outputs = []
    for before, after in steps:
        z = torch.softmax(logits.detach(), dim=0)
        shifted = before - min_losses + eps
        c = 1.0 / (z / shifted).sum()
        outputs.append((float((c * z * shifted.log()).sum()), c * z / shifted))
        delta = (before - min_losses + eps).log() - (after - min_losses + eps).log()
        adam.zero_grad()
        torch.autograd.backward(torch.softmax(logits, dim=0), delta)
        adam.step()
    return outputs, logits.detach()


def test_famo_against_algorithm_1_and_bit_exact_resume():
    rng = np.random.default_rng(1)
    min_losses = torch.tensor([0.0, 0.1, 0.2], dtype=torch.float64)
    steps = []
    for _ in range(6):
        before = torch.from_numpy(rng.uniform(0.3, 3.0, 3))
        steps.append((before, before * torch.from_numpy(rng.uniform(0.7, 1.1, 3))))
    expected, logits = _famo_reference(steps, min_losses, 0.025, 1e-3, 1e-8)
    famo = FAMO(3, min_losses=min_losses).double()
    for i, (before, after) in enumerate(steps):
        if i == 3:
            fresh = FAMO(3, min_losses=torch.zeros(3)).double()
            fresh.load_state_dict(_roundtrip(famo.state_dict()))
            famo = fresh
        values = leaf(before.numpy())
        out = famo(values)
        (grad,) = torch.autograd.grad(out, values)
        np.testing.assert_allclose(float(out.detach()), expected[i][0], rtol=1e-12)
        torch.testing.assert_close(grad, expected[i][1], rtol=1e-12, atol=0)
        famo.update(after)
    torch.testing.assert_close(famo.logits.detach(), logits, rtol=1e-12, atol=1e-15)
    assert famo.logits.grad is None
    famo.reset()
    assert float(famo.logits.detach().abs().max()) == 0.0


def test_famo_bad_use():
    with pytest.raises(RuntimeError, match="needs a call on the losses"):
        FAMO(2).update(torch.ones(2))
    with pytest.raises(ValueError, match=r"min_losses has shape \(3,\), expected \(2,\)"):
        FAMO(2, min_losses=torch.zeros(3))
    with pytest.raises(ValueError, match=r"logits has shape \(2,\)"):
        FAMO(2)(torch.ones(3))
    with pytest.raises(ValueError, match="lr must be finite and >= 0"):
        FAMO(2, lr=-1.0)


def test_random_state_round_trip_and_reset():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0])
    first = Random(seed=5)
    draws = [first(values) for _ in range(3)]
    saved = copy.deepcopy(first.state_dict())
    expected = [first(values) for _ in range(2)]
    fresh = Random(seed=9)
    fresh.load_state_dict(saved)
    assert [fresh(values) for _ in range(2)] == expected
    first.reset()
    assert first(values) == draws[0]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
def test_stateful_scalarizers_follow_the_values_to_cuda():
    """FAMO moves with ``.to()``; DWA keeps its float64 history on the host; both match CPU."""
    rng = np.random.default_rng(6)
    runs = {}
    for device in ("cpu", "cuda"):
        famo, dwa = FAMO(3).double().to(device), DWA()
        outputs = []
        for _ in range(4):
            values = torch.from_numpy(rng.uniform(0.5, 2.0, 3)).to(device)
            outputs += [famo(values).cpu(), dwa(values).cpu()]
            famo.update(values * 0.9)
            dwa.step()
        runs[device] = (torch.stack(outputs), famo.logits.detach().cpu())
        rng = np.random.default_rng(6)
    torch.testing.assert_close(runs["cuda"][0], runs["cpu"][0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(runs["cuda"][1], runs["cpu"][1], rtol=1e-12, atol=1e-14)
