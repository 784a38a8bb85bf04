"""The Jacobian engine against torch.func.jacrev and a per-row loop of autograd.grad."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from jdoptim.engine import JacobianEngine, reachable_leaves


def _jacrev(model: nn.Module, x: torch.Tensor, loss_fn) -> dict[str, torch.Tensor]:
    params = {k: v.detach() for k, v in model.named_parameters()}
    return jacrev(lambda p: loss_fn(functional_call(model, p, (x,))))(params)


def _per_sample_mse(out: torch.Tensor) -> torch.Tensor:
    return out.pow(2).flatten(1).mean(dim=1)


MODELS = {
    "mlp": (lambda: nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)), (6, 5)),
    "cnn": (
        lambda: nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2)),
        (4, 1, 6, 6),
    ),
    "embedding_layernorm": (
        lambda: nn.Sequential(nn.Embedding(11, 4), nn.LayerNorm(4), nn.Linear(4, 2)),
        None,
    ),
}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("chunk", [None, 1, 4])
def test_jacobians_match_jacrev(name, chunk):
    torch.manual_seed(0)
    make, shape = MODELS[name]
    model = make().double()
    x = torch.randint(0, 11, (5, 3)) if shape is None else torch.randn(shape, dtype=torch.float64)
    losses = _per_sample_mse(model(x))
    names, params = zip(*model.named_parameters(), strict=True)
    got = JacobianEngine(chunk).jacobians(losses, list(params))
    expected = _jacrev(model, x, _per_sample_mse)
    for n, j in zip(names, got, strict=True):
        torch.testing.assert_close(j, expected[n], rtol=1e-10, atol=1e-12)


def test_unreached_input_is_none_and_partially_reached_rows_are_zero():
    a = torch.randn(3, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    unused = torch.randn(2, requires_grad=True)
    losses = torch.stack([a.sum(), (a * b).sum(), a.pow(2).sum()])
    ja, jb, ju = JacobianEngine(2).jacobians(losses, [a, b, unused])
    assert ju is None
    torch.testing.assert_close(jb, torch.stack([torch.zeros(3), a.detach(), torch.zeros(3)]))
    torch.testing.assert_close(ja, torch.stack([torch.ones(3), b.detach(), 2 * a.detach()]))


class _NoVmapSquare(torch.autograd.Function):
    """x² whose backward reads a Python scalar: impossible under vmap."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**2

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        _ = grad.sum().item()  # data-dependent: raises under vmap
        return 2 * x * grad


def test_falls_back_to_a_loop_when_vmap_fails_and_stays_exact():
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    x = torch.randn(5, 4)
    engine = JacobianEngine()
    losses = _NoVmapSquare.apply(lin(x)).sum(dim=1)
    got = engine.jacobians(losses, list(lin.parameters()))
    assert engine._batched_ok is False
    expected = _jacrev(lin, x, lambda out: (out**2).sum(dim=1))
    torch.testing.assert_close(got[0], expected["weight"])
    torch.testing.assert_close(got[1], expected["bias"])
    # The next call goes straight to the loop.
    losses = _NoVmapSquare.apply(lin(x)).sum(dim=1)
    torch.testing.assert_close(engine.jacobians(losses, [lin.weight])[0], expected["weight"])


def _loop_reference(losses, params):
    rows = [torch.autograd.grad(losses[i], params, retain_graph=True) for i in range(len(losses))]
    return [torch.stack([r[k] for r in rows]) for k in range(len(params))]


@pytest.mark.parametrize("cell", [nn.GRU, nn.LSTM, nn.RNN])
def test_recurrent_networks(cell):
    torch.manual_seed(0)
    rnn = cell(3, 4, batch_first=True)
    out = rnn(torch.randn(5, 6, 3))[0]
    losses = out.pow(2).mean(dim=(1, 2))
    params = list(rnn.parameters())
    expected = _loop_reference(losses, params)
    for got, exp in zip(JacobianEngine().jacobians(losses, params), expected, strict=True):
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("norm", [nn.LayerNorm(8), nn.GroupNorm(2, 8), nn.BatchNorm1d(8)])
def test_autocast_with_normalisation_layers(norm):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), norm, nn.Linear(8, 2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(torch.randn(6, 4)).float().pow(2).sum(dim=1)
    params = list(model.parameters())
    expected = _loop_reference(losses, params)
    for got, exp in zip(JacobianEngine(3).jacobians(losses, params), expected, strict=True):
        torch.testing.assert_close(got, exp, rtol=2e-2, atol=1e-3)


def test_graph_is_freed_after_the_last_chunk():
    w = torch.randn(3, requires_grad=True)
    engine = JacobianEngine()
    engine.jacobians(torch.stack([w.exp().sum(), w.sum()]), [w])  # first call probes vmap
    losses = torch.stack([w.exp().sum(), w.sum()])
    engine.jacobians(losses, [w])
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        torch.autograd.grad(losses[0], [w])


def test_retain_graph_keeps_it():
    w = torch.randn(3, requires_grad=True)
    losses = torch.stack([w.exp().sum(), w.sum()])
    JacobianEngine(1).jacobians(losses, [w], retain_graph=True)
    torch.testing.assert_close(torch.autograd.grad(losses[0], [w])[0], w.detach().exp())


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_chunk_size(bad):
    with pytest.raises(ValueError, match="parallel_chunk_size"):
        JacobianEngine(bad)


def test_reachable_leaves_stops_at_features():
    trunk, head = nn.Linear(3, 4), nn.Linear(4, 1)
    h = trunk(torch.randn(2, 3))
    loss = head(h).sum()
    ids = lambda ts: {id(t) for t in ts}  # noqa: E731
    assert ids(reachable_leaves([loss])) == ids([*trunk.parameters(), *head.parameters()])
    assert ids(reachable_leaves([loss], stop_at=[h])) == ids(head.parameters())
    leaf = torch.ones(2, requires_grad=True)
    assert ids(reachable_leaves([leaf])) == {id(leaf)}


def test_total_accumulates_without_touching_its_terms_and_promotes_dtypes():
    from jdoptim.engine._reduce import total

    terms = [torch.randn(3, 3), torch.randn(3, 3, dtype=torch.float64), torch.randn(3, 3)]
    terms.append(torch.randn(3, 3, dtype=torch.float64))
    before = [t.clone() for t in terms]
    result = total(terms)
    assert result.dtype == torch.float64
    torch.testing.assert_close(result, sum(t.double() for t in before))
    assert all(torch.equal(t, b) for t, b in zip(terms, before, strict=True))
    assert all(result.data_ptr() != t.data_ptr() for t in terms)
    assert total(terms[:1]) is terms[0]
