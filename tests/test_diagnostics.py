"""Step records (jdoptim.diagnostics) against Jacobians built independently with torch.func.

The data are scikit-learn's digits (offline), a shared trunk with three task heads (digit, parity,
"at least 5") or per-sample losses, taken early (initialisation) and later in training.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from jdoptim import JacobianOptimizer
from jdoptim.aggregation import PCGrad, Sum, TrimmedMean, UPGrad
from jdoptim.diagnostics import StepRecord, StepRecorder

datasets = pytest.importorskip("sklearn.datasets")


def _digits(n: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    data = datasets.load_digits()
    x = torch.tensor(data.data[:n] / 16.0, dtype=torch.float32)
    return x, torch.tensor(data.target[:n])


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(64, 12), nn.Tanh(), nn.Linear(12, 8), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(8, 10), nn.Linear(8, 2), nn.Linear(8, 2)])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = self.trunk(x)
        return [head(h) for head in self.heads]


def _task_losses(net: nn.Module, x: torch.Tensor, y: torch.Tensor, per_sample: bool):
    outs = net(x)
    targets = [y, y % 2, (y >= 5).long()]
    if per_sample:  # one loss per sample: the digit's cross-entropy
        return nn.functional.cross_entropy(outs[0], y, reduction="none")
    return torch.stack(
        [nn.functional.cross_entropy(o, t) for o, t in zip(outs, targets, strict=True)]
    )


def _trained(steps: int, dtype: torch.dtype) -> tuple[_Net, torch.Tensor, torch.Tensor]:
    """The network after ``steps`` plain SGD steps on the summed task losses."""
    torch.manual_seed(0)
    net = _Net()
    x, y = _digits()
    sgd = torch.optim.SGD(net.parameters(), lr=0.5)
    for _ in range(steps):
        sgd.zero_grad()
        _task_losses(net, x, y, False).sum().backward()
        sgd.step()
    return net.to(dtype), x.to(dtype), y


def _reference_jacobian(net: nn.Module, names: list[str], x, y, per_sample: bool):
    """``[m, n]`` float64 Jacobian w.r.t. the parameters ``names``, by ``torch.func.jacrev``."""
    net64 = copy.deepcopy(net).double()
    params = {k: v.detach() for k, v in net64.named_parameters()}

    def losses(chosen: dict[str, torch.Tensor]) -> torch.Tensor:
        return _task_losses_functional(net64, {**params, **chosen}, x.double(), y, per_sample)

    jac = jacrev(losses)({k: params[k] for k in names})
    return torch.cat([jac[k].reshape(jac[k].shape[0], -1) for k in names], dim=1)


def _task_losses_functional(net, params, x, y, per_sample):
    class _Bound(nn.Module):
        def forward(self, x):
            return functional_call(net, params, (x,))

    return _task_losses(_Bound(), x, y, per_sample)


CASES = {
    # name: (aggregator factory, JacobianOptimizer kwargs builder, per_sample, engine)
    "jacobian-upgrad": (UPGrad, lambda net: {"path": "jacobian"}, False, "jacobian"),
    "layer-gramian-shared": (
        UPGrad,
        lambda net: {"shared_params": net.trunk.parameters()},
        False,
        "layer-gramian",
    ),
    "jacobian-shared-pcgrad": (
        PCGrad,
        lambda net: {"shared_params": net.trunk.parameters(), "path": "jacobian"},
        False,
        "jacobian",
    ),
    "jacobian-trimmed-mean": (lambda: TrimmedMean(1), lambda net: {}, False, "jacobian"),
    "per-sample-upgrad": (UPGrad, lambda net: {"batch_dim": 0}, True, "per-sample"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("steps", [0, 40], ids=["early", "late"])
@pytest.mark.parametrize("case", CASES)
def test_record_matches_an_independent_jacobian(case, steps, dtype):
    make_aggregator, kwargs, per_sample, engine = CASES[case]
    net, x, y = _trained(steps, dtype)
    opt = JacobianOptimizer(
        torch.optim.SGD(net.parameters(), lr=0.0), make_aggregator(), **kwargs(net)
    )
    records: list[StepRecord] = []
    opt.register_step_record_hook(lambda o, r: records.append((o, r)))

    def closure():
        opt.zero_grad()
        return _task_losses(net, x, y, per_sample)

    losses = opt.step(closure)
    assert len(records) == 1 and records[0][0] is opt
    record = records[0][1]
    shared_only = "shared_params" in kwargs(net)
    aggregated = [  # per-sample losses reach the trunk and the digit head only
        n
        for n, p in net.named_parameters()
        if p.grad is not None and (n.startswith("trunk") or not shared_only)
    ]
    J = _reference_jacobian(net, aggregated, x, y, per_sample)
    update = torch.cat(
        [dict(net.named_parameters())[n].grad.double().reshape(-1) for n in aggregated]
    )
    rtol, atol = (1e-4, 1e-6) if dtype == torch.float32 else (1e-9, 1e-12)
    scale = J.norm() ** 2

    assert record.engine == engine
    torch.testing.assert_close(record.losses, losses.double())
    torch.testing.assert_close(record.gramian, J @ J.T, rtol=rtol, atol=atol * scale)
    torch.testing.assert_close(
        record.gradient_norms, J.norm(dim=1), rtol=rtol, atol=atol * J.norm()
    )
    torch.testing.assert_close(record.update_products, J @ update, rtol=rtol, atol=atol * scale)
    torch.testing.assert_close(record.update_norm, update.norm(), rtol=rtol, atol=atol * J.norm())
    cos = (J / J.norm(dim=1, keepdim=True)) @ (J / J.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(
        record.cosine, cos, rtol=0, atol=1e-4 if dtype == torch.float32 else 1e-10
    )
    off = ~torch.eye(len(cos), dtype=torch.bool)
    clear = (cos.abs() > 1e-3) & off  # pairs whose sign rounding cannot flip
    assert ((record.cosine < 0) == (cos < 0))[clear].all()
    if bool(clear[off].all()):
        assert record.conflicting_pairs == int((cos.triu(1) < 0).sum())
    if record.weights is not None:  # the update is Jᵀ w
        torch.testing.assert_close(J.T @ record.weights, update, rtol=rtol, atol=atol * J.norm())
    else:
        assert case == "jacobian-trimmed-mean"


def test_the_summed_gradient_conflicts_where_upgrad_does_not():
    """A pair of gradients at 135°: the sum increases the smaller loss, UPGrad increases none."""
    w = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    a, b = (
        torch.tensor([1.0, 0.0], dtype=torch.float64),
        torch.tensor([-3.0, 3.0], dtype=torch.float64),
    )
    for aggregator, conflicts in [(Sum(), True), (UPGrad(), False)]:
        opt = JacobianOptimizer(torch.optim.SGD([w], lr=0.0), aggregator)
        recorder = StepRecorder(opt)
        opt.step(lambda: torch.stack([a @ w, b @ w]))
        assert recorder.last.conflicting_pairs == 1
        assert recorder.last.update_conflicts is conflicts
        expected = (
            torch.tensor([a @ (a + b) < 0, b @ (a + b) < 0])
            if conflicts
            else torch.zeros(2, dtype=torch.bool)
        )
        assert torch.equal(recorder.last.conflicted_losses(), expected)


def test_no_hook_no_capture_and_the_hook_leaves_nothing_behind():
    net, x, y = _trained(0, torch.float32)
    aggregator = UPGrad()
    opt = JacobianOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), aggregator)
    before = set(vars(aggregator)), set(vars(opt.engine))
    opt.step(lambda: _task_losses(net, x, y, False))
    handle = opt.register_step_record_hook(lambda *_: None)
    opt.step(lambda: _task_losses(net, x, y, False))
    assert (set(vars(aggregator)), set(vars(opt.engine))) == before  # the wrappers are gone
    handle.remove()
    assert not opt._step_record_hooks


def test_removed_hooks_stop_and_copies_start_without_hooks():
    net, x, y = _trained(0, torch.float32)
    opt = JacobianOptimizer(torch.optim.SGD(net.parameters(), lr=0.1))
    calls = []
    handle = opt.register_step_record_hook(lambda *_: calls.append(1))
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert not getattr(clone, "_step_record_hooks", None)
    opt.step(lambda: _task_losses(net, x, y, False))
    handle.remove()
    opt.step(lambda: _task_losses(net, x, y, False))
    assert calls == [1]


def test_accumulated_micro_batches_give_one_record_of_the_whole_batch():
    net, x, y = _trained(0, torch.float64)
    opt = JacobianOptimizer(torch.optim.SGD(net.parameters(), lr=0.0), UPGrad(), batch_dim=0)
    recorder = StepRecorder(opt, keep=5)
    opt.backward(_task_losses(net, x[:20], y[:20], True), accumulate=True)
    assert recorder.last is None
    opt.step(lambda: _task_losses(net, x[20:], y[20:], True))
    assert len(recorder.records) == 1 and recorder.last.engine == "per-sample"
    names = [n for n, _ in net.named_parameters()]
    J = _reference_jacobian(net, names, x, y, True)
    torch.testing.assert_close(recorder.last.gramian, J @ J.T)


def test_recorder_keeps_at_most_keep_records_and_rejects_bad_keep():
    net, x, y = _trained(0, torch.float32)
    opt = JacobianOptimizer(torch.optim.SGD(net.parameters(), lr=0.1))
    recorder = StepRecorder(opt, keep=2)
    for _ in range(4):
        opt.step(lambda: _task_losses(net, x, y, False))
    assert len(recorder.records) == 2
    with pytest.raises(ValueError, match="keep must be a positive int"):
        StepRecorder(opt, keep=0)


def test_hooks_need_an_aggregator_instance():
    w = nn.Parameter(torch.zeros(2))
    opt = JacobianOptimizer(torch.optim.SGD([w], lr=0.1), lambda j: j.sum(dim=0))
    with pytest.raises(TypeError, match=r"step records need a jdoptim\.aggregation\.Aggregator"):
        opt.register_step_record_hook(lambda *_: None)


@pytest.mark.parametrize("aggregator", [UPGrad, lambda: TrimmedMean(1)], ids=["upgrad", "trimmed"])
def test_under_a_grad_scaler_the_record_is_unscaled(aggregator):
    """``opt.backward(scaler.scale(losses))``: the record equals the unscaled step's."""
    records = []
    for scale in (None, 1024.0):
        net, x, y = _trained(0, torch.float64)
        scaler = None if scale is None else torch.amp.GradScaler("cpu", init_scale=scale)
        opt = JacobianOptimizer(
            torch.optim.SGD(net.parameters(), lr=0.1), aggregator(), grad_scaler=scaler
        )
        recorder = StepRecorder(opt)
        losses = _task_losses(net, x, y, False)
        opt.backward(losses if scaler is None else scaler.scale(losses))
        records.append(recorder.last)
    plain, scaled = records
    for field in ("losses", "gramian", "update_products", "update_norm"):
        torch.testing.assert_close(getattr(scaled, field), getattr(plain, field))


def test_orthogonal_gradients_with_rounding_noise_do_not_count_as_conflicts():
    """Gramian entries of ±1e-9 relative to the norms are rounding (cosines of ±1e-9)."""
    gramian = torch.tensor([[1.0, -1e-9, -0.5], [-1e-9, 4.0, 1e-9], [-0.5, 1e-9, 1.0]])
    gramian = gramian.double()
    weights = torch.ones(3, dtype=torch.float64)
    products = gramian @ weights
    record = StepRecord(torch.ones(3), gramian, weights, products, products.sum().sqrt(), "x")
    assert record.conflicting_pairs == 1  # only (0, 2), at cosine -0.5
