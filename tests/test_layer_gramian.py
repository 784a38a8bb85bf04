"""The layer-Gramian engine against ``torch.func.jacrev``, with and without closed forms."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from jdoptim.engine._layer_gramian import LayerGramianEngine


class _Trunk(nn.Module):
    """A shared trunk and four heads; options for cases where the closed form must not apply."""

    def __init__(self, d_in=16, hidden=24, tie=False, functional=False, inplace=False, bias=True):
        super().__init__()
        self.first = nn.Linear(d_in, hidden, bias=bias)
        self.second = nn.Linear(hidden, hidden)
        self.conv = nn.Conv1d(1, 1, 3, padding=1)
        self.heads = nn.ModuleList(nn.Linear(hidden, 1) for _ in range(4))
        self.act = nn.ReLU(inplace=inplace)
        self.functional = functional
        if tie:
            self.second.weight = nn.Parameter(torch.randn(hidden, hidden) * 0.3)
            self.extra = nn.Linear(hidden, hidden)
            self.extra.weight = self.second.weight
        self.tie = tie

    def forward(self, x):
        h = torch.tanh(self.first(x))
        h = self.act(self.second(h))
        if self.tie:
            h = torch.tanh(self.extra(h))
        if self.functional:  # the second layer's weight, used again outside its module
            h = h + 0.1 * nn.functional.linear(h, self.second.weight)
        h = h + self.conv(h.reshape(-1, 1, h.shape[-1])).reshape(h.shape)
        return torch.stack([head(h).pow(2).mean() for head in self.heads])


def _weights(gramian):
    """An input-dependent weighting, independent of jdoptim: softmax of the Gramian's diagonal."""
    return torch.softmax(gramian.diagonal() / gramian.diagonal().max(), dim=0)


def _reference(model, x, shared):
    params = dict(model.named_parameters())
    jac = jacrev(lambda p: functional_call(model, p, (x,)))(params)
    names = [n for n, p in params.items() if id(p) in shared]
    rows = torch.cat([jac[n].reshape(4, -1) for n in names], dim=1)
    gram = rows @ rows.T
    w = _weights(gram)
    return gram, {
        n: torch.tensordot(w, jac[n], dims=1) if n in names else jac[n].sum(0) for n in params
    }


CASES = {
    "plain": {},
    "no-bias": {"bias": False},
    "tied": {"tie": True},
    "functional-use": {"functional": True},
    "inplace-relu": {"inplace": True},
}


@pytest.mark.parametrize("case", sorted(CASES))
# N = 6 and 12 positions take the kernel form (N < ~m·d·o / (d + m·o) ≈ 14 to 19 here), N = 40
# the row form: both branches of the closed form are checked.
@pytest.mark.parametrize("shape", [(6, 16), (3, 4, 16), (40, 16)], ids=["B6", "B3xT4", "B40"])
def test_gramian_and_updates_match_jacrev(case, shape):
    torch.manual_seed(0)
    model = _Trunk(**CASES[case]).double()
    x = torch.randn(*shape, dtype=torch.float64)
    trunk = [p for n, p in model.named_parameters() if not n.startswith("heads")]
    shared = {id(p) for p in trunk}
    engine = LayerGramianEngine(lambda: trunk)
    params = list(model.parameters())
    losses = model(x)
    summed_only = frozenset(id(p) for p in params) - shared
    updates, gram = engine.gramian_step(losses, params, _weights, summed_only=summed_only)
    expected_gram, expected = _reference(model, x, shared)
    torch.testing.assert_close(gram, expected_gram)
    for (name, _), update in zip(model.named_parameters(), updates, strict=True):
        torch.testing.assert_close(update, expected[name], msg=name)


def test_closed_form_used_exactly_where_it_is_exact(monkeypatch):
    """Plain trunk: both Linear layers in closed form, also with an in-place ReLU on an output (the
    gradient is taken at the output's graph node, before the in-place op); tied or reused weights
    fall back."""
    seen = []
    original = LayerGramianEngine._exact_calls

    def spy(self, *args):
        calls = original(self, *args)
        seen.append(sorted(type(r.module).__name__ + str(r.module.in_features) for _, r in calls))
        return calls

    monkeypatch.setattr(LayerGramianEngine, "_exact_calls", spy)
    for kwargs, expected in [
        ({}, 2),
        ({"tie": True}, 1),
        ({"functional": True}, 1),
        ({"inplace": True}, 2),
    ]:
        model = _Trunk(**kwargs)
        trunk = [p for n, p in model.named_parameters() if not n.startswith("heads")]
        engine = LayerGramianEngine(lambda trunk=trunk: trunk)
        engine.gramian_step(model(torch.randn(6, 16)), trunk, _weights)
        assert len(seen[-1]) == expected, (kwargs, seen[-1])


def test_unscale_divides():
    torch.manual_seed(1)
    model = _Trunk().double()
    params = list(model.parameters())
    engine = LayerGramianEngine(lambda: params)
    x = torch.randn(6, 16, dtype=torch.float64)
    base, gram = engine.gramian_step(model(x), params, _weights)
    scaled, gram_scaled = engine.gramian_step(model(x) * 8.0, params, _weights, unscale=8.0)
    torch.testing.assert_close(gram_scaled, gram)
    for a, b in zip(base, scaled, strict=True):
        torch.testing.assert_close(a, b)


def test_unreached_parameter_gets_none_and_nothing_reached_raises():
    model = _Trunk().double()
    unused = nn.Parameter(torch.ones(3, dtype=torch.float64))
    params = [*model.parameters(), unused]
    engine = LayerGramianEngine(lambda: params)
    updates, _ = engine.gramian_step(
        model(torch.randn(6, 16, dtype=torch.float64)), params, _weights
    )
    assert updates[-1] is None and all(u is not None for u in updates[:-1])
    with pytest.raises(ValueError, match="do not depend on any parameter"):
        engine.gramian_step(
            unused.sum().reshape(1) * 0 + torch.ones(1, requires_grad=True),
            [model.first.weight],
            _weights,
        )


def test_remove_hooks_removes_every_hook_and_the_step_stays_exact():
    torch.manual_seed(4)
    model = _Trunk().double()
    params = list(model.parameters())
    engine = LayerGramianEngine(lambda: params)
    assert all(len(m._forward_hooks) == 1 for m in engine._recorder.modules)
    hooked = engine._recorder.modules
    engine.remove_hooks()
    assert all(len(m._forward_hooks) == 0 for m in hooked)
    x = torch.randn(6, 16, dtype=torch.float64)
    updates, gram = engine.gramian_step(model(x), params, _weights)
    expected_gram, expected = _reference(model, x, {id(p) for p in params})
    torch.testing.assert_close(gram, expected_gram)
    for (name, _), update in zip(model.named_parameters(), updates, strict=True):
        torch.testing.assert_close(update, expected[name], msg=name)


# --- Through JacobianOptimizer: every path gives the same step ---------------------------------


@pytest.mark.parametrize("path", ["auto", "jacobian", "gramian"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared_params", "all-params"])
def test_optimizer_paths_equal_jacrev_and_independent_upgrad(path, shared):
    from jdoptim import JacobianOptimizer
    from jdoptim.aggregation import UPGrad
    from tests._references import upgrad_reference

    torch.manual_seed(2)
    model = _Trunk().double()
    x = torch.randn(10, 16, dtype=torch.float64)
    trunk = [p for n, p in model.named_parameters() if not n.startswith("heads")]
    opt = JacobianOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0),
        UPGrad(),
        shared_params=trunk if shared else None,
        path=path,
    )
    expected_engine = path == "gramian" or (path == "auto" and shared)
    assert isinstance(opt.gramian_engine, LayerGramianEngine) == expected_engine
    opt.step(lambda: model(x))
    params = dict(model.named_parameters())
    jac = jacrev(lambda p: functional_call(model, p, (x,)))(params)
    aggregated = [n for n, p in params.items() if not shared or any(p is q for q in trunk)]
    rows = torch.cat([jac[n].reshape(4, -1) for n in aggregated], dim=1)
    update = upgrad_reference(rows).split([params[n].numel() for n in aggregated])
    expected = dict(zip(aggregated, update, strict=True))
    for name, p in params.items():
        want = expected[name].view_as(p) if name in expected else jac[name].sum(0)
        torch.testing.assert_close(p.grad, want, rtol=1e-6, atol=1e-9, msg=name)


def test_path_is_validated():
    from jdoptim import JacobianOptimizer
    from jdoptim.aggregation import GradDrop, UPGrad

    sgd = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(
        ValueError, match="path must be 'auto', 'jacobian' or 'gramian', got 'fast'"
    ):
        JacobianOptimizer(sgd, UPGrad(), path="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="path='gramian' needs an aggregator"):
        JacobianOptimizer(sgd, GradDrop(), path="gramian")


def test_copies_of_the_optimizer_record_their_own_model():
    import copy
    import pickle

    from jdoptim import JacobianOptimizer
    from jdoptim.aggregation import UPGrad

    torch.manual_seed(3)
    model = _Trunk().double()
    trunk = [p for n, p in model.named_parameters() if not n.startswith("heads")]
    opt = JacobianOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), UPGrad(), shared_params=trunk
    )
    x = torch.randn(6, 16, dtype=torch.float64)
    for clone in (copy.deepcopy((model, opt)), pickle.loads(pickle.dumps((model, opt)))):
        clone_model, clone_opt = clone
        expected = copy.deepcopy(clone_model)
        clone_opt.step(lambda m=clone_model: m(x))
        hooked = {id(m) for m in clone_opt.gramian_engine._recorder.modules}
        assert hooked == {id(m) for m in clone_model.modules() if isinstance(m, nn.Linear)} - {
            id(m) for m in clone_model.heads.modules()
        }
        reference = JacobianOptimizer(
            torch.optim.SGD(expected.parameters(), lr=0.1),
            UPGrad(),
            path="jacobian",
            shared_params=[p for n, p in expected.named_parameters() if not n.startswith("heads")],
        )
        reference.step(lambda e=expected: e(x))
        for a, b in zip(clone_model.parameters(), expected.parameters(), strict=True):
            torch.testing.assert_close(a, b)
