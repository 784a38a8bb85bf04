"""The Gramian engines' forward hooks are owned: per module, bounded, released, compile-safe."""

from __future__ import annotations

import gc
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from jdoptim import JacobianOptimizer
from jdoptim.aggregation import Mean, UPGrad
from jdoptim.engine import JacobianEngine, _recording
from jdoptim.engine._recording import Record
from tests._references import upgrad_reference


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def _per_sample(model, x, y):
    return (model(x) - y).pow(2).mean(dim=1)


def _expected_upgrad(model, x, y):
    params = {k: v.detach() for k, v in model.named_parameters()}
    jac = jacrev(lambda p: _per_sample(lambda z: functional_call(model, p, (z,)), x, y))(params)
    rows = torch.cat([j.flatten(1) for j in jac.values()], dim=1)
    update = upgrad_reference(rows).split([p.numel() for p in params.values()])
    return {k: u.view_as(p) for (k, p), u in zip(params.items(), update, strict=True)}


def _hook_counts(model):
    return [len(m._forward_hooks) for m in model.modules()]


@pytest.mark.parametrize(
    "kwargs", [{"batch_dim": 0}, {"path": "gramian"}], ids=["per-sample", "layer-gramian"]
)
def test_hooks_are_per_module_and_go_away_with_the_optimizer_without_the_cyclic_gc(kwargs):
    model, other = _mlp(), nn.Linear(3, 3)
    gc.disable()  # no reference cycle: dropping the optimizer is enough
    try:
        opt = JacobianOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), UPGrad(), **kwargs)
        assert not nn.modules.module._global_forward_hooks
        assert _hook_counts(model) == [0, 1, 0, 1]  # the Linear layers owning parameters
        assert len(other._forward_hooks) == 0  # a module the optimizer does not own
        opt.step(lambda: _per_sample(model, torch.randn(4, 5), torch.randn(4, 3)))
        del opt
        assert _hook_counts(model) == [0, 0, 0, 0]
    finally:
        gc.enable()


def test_copies_and_pickles_hook_their_own_model_only():
    import copy
    import pickle

    torch.manual_seed(5)
    model = _mlp().double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    opt = JacobianOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), UPGrad(), batch_dim=0)
    for clone_model, clone_opt in (
        copy.deepcopy((model, opt)),
        pickle.loads(pickle.dumps((model, opt))),
    ):
        assert {id(m) for m in clone_opt.gramian_engine._recorder.modules} == {
            id(clone_model[0]),
            id(clone_model[2]),
        }
        clone_opt.step(lambda m=clone_model: _per_sample(m, x, y))
        for name, p in clone_model.named_parameters():
            torch.testing.assert_close(p.grad, _expected_upgrad(model, x, y)[name])
    assert _hook_counts(model) == [0, 1, 0, 1]


def test_remove_hooks_then_steps_stay_exact():
    torch.manual_seed(0)
    model = _mlp().double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    opt = JacobianOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), UPGrad(), batch_dim=0)
    opt.remove_hooks()
    assert _hook_counts(model) == [0, 0, 0, 0]
    opt.step(lambda: _per_sample(model, x, y))
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, _expected_upgrad(model, x, y)[name])


def test_forwards_never_backpropagated_leave_nothing_behind():
    """An optimizer built but never stepped: the records live in the graph and go with it."""
    model = _mlp()
    opt = JacobianOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), Mean(), batch_dim=0)

    def live_records():
        gc.collect()
        return sum(isinstance(o, Record) for o in gc.get_objects())

    before = live_records()
    for _ in range(50):
        model(torch.randn(8, 5)).sum()
    assert live_records() == before
    out = model(torch.randn(8, 5))
    assert live_records() == before + 2  # one per Linear call, while its graph is alive
    del out
    assert live_records() == before
    assert opt.gramian_engine is not None


def test_unrelated_batch_norm_between_forward_and_backward_is_ignored():
    torch.manual_seed(1)
    model = _mlp().double()
    unrelated = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))  # training mode
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    opt = JacobianOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), UPGrad(), batch_dim=0)
    losses = _per_sample(model, x, y)
    unrelated(torch.randn(5, 4)).sum().backward()
    opt.backward(losses)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, _expected_upgrad(model, x, y)[name])


def test_two_phase_order_keeps_the_closed_forms(monkeypatch):
    """forward, ``zero_grad()``, ``backward(losses)``: no fallback to batched VJPs."""
    torch.manual_seed(2)
    model = _mlp().double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    opt = JacobianOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), UPGrad(), batch_dim=0)

    def no_vjps(*args, **kwargs):
        raise AssertionError("the per-sample step fell back to batched VJPs")

    monkeypatch.setattr(JacobianEngine, "vjps", no_vjps)
    losses = _per_sample(model, x, y)
    opt.zero_grad()
    opt.backward(losses)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, _expected_upgrad(model, x, y)[name])


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_model_no_graph_break_and_exact_step(backend):
    from torch._dynamo.utils import counters

    torch.manual_seed(3)
    torch._dynamo.reset()
    counters.clear()
    model = _mlp().double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    opt = JacobianOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), UPGrad(), batch_dim=0)
    compiled = torch.compile(model, backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "global hooks fire twice"
        opt.step(lambda: (compiled(x) - y).pow(2).mean(dim=1))
    assert not counters["graph_break"], dict(counters["graph_break"])
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, _expected_upgrad(model, x, y)[name])


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_after_dropping_an_optimizer(backend):
    """Nothing of a dropped optimizer stays in the way of compiling (no cyclic GC run needed)."""
    from torch._dynamo.utils import counters

    torch.manual_seed(4)
    torch._dynamo.reset()
    counters.clear()
    model = _mlp()
    x = torch.randn(4, 5)
    gc.disable()
    try:
        opt = JacobianOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), UPGrad(), batch_dim=0)
        opt.step(lambda: model(x).pow(2).mean(dim=1))
        del opt
        compiled = torch.compile(model, backend=backend)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = compiled(x)
            out.sum().backward()
    finally:
        gc.enable()
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch.testing.assert_close(out, model(x))


def _no_heap_scan(monkeypatch):
    def refuse(*objects):
        raise AssertionError("gc.get_referrers was called: the owners were found by a heap scan")

    monkeypatch.setattr(_recording.gc, "get_referrers", refuse)


class _Tied(nn.Module):
    """A trunk with a submodule shared by two parents, and a parameter outside every module."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 7)
        self.b = nn.Sequential(self.a, nn.Tanh(), nn.Linear(7, 3))
        self.c = nn.LayerNorm(3)


@pytest.mark.parametrize(
    "kwargs", [{"batch_dim": 0}, {"path": "gramian"}], ids=["per-sample", "layer-gramian"]
)
def test_module_argument_finds_the_owners_by_walking_it_not_by_a_heap_scan(monkeypatch, kwargs):
    torch.manual_seed(3)
    model = _Tied().double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    scanned = JacobianOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), UPGrad(), **kwargs)
    expected = {id(m) for m in scanned.gramian_engine._recorder.modules}
    scanned.remove_hooks()
    _no_heap_scan(monkeypatch)
    opt = JacobianOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0), UPGrad(), module=model, **kwargs
    )
    assert {id(m) for m in opt.gramian_engine._recorder.modules} == expected
    assert len(model.a._forward_hooks) == 1  # the shared submodule is hooked once
    opt.step(lambda: _per_sample(lambda z: model.c(model.b(z)), x, y))
    want = _expected_upgrad(nn.Sequential(model.b, model.c), x, y)
    for name, p in nn.Sequential(model.b, model.c).named_parameters():
        torch.testing.assert_close(p.grad, want[name])
    del opt
    assert all(not m._forward_hooks for m in model.modules())  # no cycle keeps them alive


def test_module_argument_hooks_the_modules_of_an_added_group(monkeypatch):
    _no_heap_scan(monkeypatch)
    model = _mlp()
    opt = JacobianOptimizer(
        torch.optim.SGD(model[0].parameters(), lr=0.1), batch_dim=0, module=model
    )
    assert _hook_counts(model) == [0, 1, 0, 0]  # only the owners of the optimizer's parameters
    opt.add_param_group({"params": model[2].parameters()})
    assert _hook_counts(model) == [0, 1, 0, 1]


@pytest.mark.parametrize(
    ("module", "error", "match"),
    [
        ("model", TypeError, "module must be a torch.nn.Module or None, got str"),
        (nn.Linear(2, 2), ValueError, r"module \(Linear\) holds none of the wrapped optimizer"),
    ],
)
def test_module_argument_errors(module, error, match):
    model = _mlp()
    with pytest.raises(error, match=match):
        JacobianOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), batch_dim=0, module=module)
    assert _hook_counts(model) == [0, 0, 0, 0]


def test_autogram_engine_walks_its_modules_without_a_heap_scan(monkeypatch):
    from jdoptim.autogram import Engine

    _no_heap_scan(monkeypatch)
    model = _mlp()
    engine = Engine(model, batch_dim=0)
    assert _hook_counts(model) == [0, 1, 0, 1]
    del engine
    assert _hook_counts(model) == [0, 0, 0, 0]


class _Unpicklable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = _mlp()
        self.callback = lambda: None  # a model that cannot be pickled

    def forward(self, x):
        return self.net(x)


def test_module_argument_is_held_weakly_and_not_copied_with_the_optimizer():
    import copy
    import pickle
    import weakref

    torch.manual_seed(5)
    model = _Unpicklable().double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    opt = JacobianOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0), UPGrad(), batch_dim=0, module=model
    )
    clone = pickle.loads(pickle.dumps(opt))  # the model is not part of the pickle
    assert clone.gramian_engine._recorder.modules == []  # its parameters belong to no module
    clone_model, clone_opt = copy.deepcopy((model, opt))
    assert {id(m) for m in clone_opt.gramian_engine._recorder.modules} == {
        id(clone_model.net[0]),
        id(clone_model.net[2]),
    }
    clone_opt.step(lambda: _per_sample(clone_model, x, y))
    for name, p in clone_model.net.named_parameters():
        torch.testing.assert_close(p.grad, _expected_upgrad(model.net, x, y)[name])
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None  # the optimizer does not keep the model alive
