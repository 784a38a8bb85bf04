"""Bad input to ``JacobianOptimizer``: a precise error from jdoptim, and nothing touched.

Every case snapshots the parameters, their ``.grad`` (populated beforehand, the harder case), and
the inner optimizer's state, then checks all three are exactly as before once the error is raised.
The ``step`` entry point is exercised with a closure that calls ``zero_grad`` first, as closures
usually do; the ``backward`` entry point is the two-phase path.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from jdoptim import JacobianOptimizer
from jdoptim.aggregation import UPGrad


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin1 = nn.Linear(3, 4)
        self.lin2 = nn.Linear(4, 1)
        self.zero = nn.Parameter(torch.zeros(2))  # sqrt(0) has an infinite derivative
        self.register_buffer("x", torch.randn(5, 3))

    def forward(self) -> torch.Tensor:
        return self.lin2(torch.tanh(self.lin1(self.x))).pow(2).reshape(-1)  # 5 per-sample losses


def _setup(aggregator=UPGrad, batch_dim=None):
    torch.manual_seed(0)
    model = _Model()
    opt = JacobianOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        aggregator(),
        batch_dim=batch_dim,
    )
    opt.step(lambda: (opt.zero_grad(), model() + model.zero.sum())[1])  # momentum state exists
    for p in model.parameters():
        p.grad = torch.randn_like(p)  # populated .grad must survive a failed step
    return model, opt


def _snapshot(model: nn.Module, opt: JacobianOptimizer):
    return (
        [p.detach().clone() for p in model.parameters()],
        [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        copy.deepcopy(opt.optimizer.state_dict()),
    )


def _assert_unchanged(before, model: nn.Module, opt: JacobianOptimizer) -> None:
    params, grads, state = before
    now_params, now_grads, now_state = _snapshot(model, opt)
    for a, b in zip(params, now_params, strict=True):
        assert torch.equal(a, b), "a parameter changed"
    for a, b in zip(grads, now_grads, strict=True):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), ".grad changed"
    assert state["param_groups"] == now_state["param_groups"]
    assert state["state"].keys() == now_state["state"].keys()
    for k, s in state["state"].items():
        for name, v in s.items():
            assert torch.equal(v, now_state["state"][k][name]), "optimizer state changed"
    for p in model.parameters():
        assert not hasattr(p, "jac")


def _matrix_mean(matrix: torch.Tensor) -> torch.Tensor:
    """A plain callable: the engine must build the whole ``[m, n]`` Jacobian for it."""
    return matrix.mean(dim=0)


class _NaNBackward(torch.autograd.Function):
    """Identity forward, NaN gradient: a custom op with a broken backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


# Each case: (losses from the model, expected exception type, message pattern).
BAD_LOSSES = {
    "nan_loss": (
        lambda m: m() * torch.tensor([1.0, float("nan"), 1.0, 1.0, 1.0]),
        ValueError,
        r"NaN or inf at indices \[1\]",
    ),
    "inf_loss": (
        lambda m: m() + torch.tensor([0.0, 0.0, 0.0, float("inf"), 0.0]),
        ValueError,
        r"NaN or inf at indices \[3\]",
    ),
    "inf_jacobian_sqrt_at_zero": (
        lambda m: m() + m.zero.sqrt().sum(),
        ValueError,
        r"NaN or inf",
    ),
    "nan_jacobian_custom_op": (
        lambda m: _NaNBackward.apply(m()),
        ValueError,
        r"NaN or inf",
    ),
    "does_not_require_grad": (
        lambda m: m().detach(),
        ValueError,
        r"do not require grad",
    ),
    "no_optimizer_param_reached": (
        lambda m: torch.ones(5, requires_grad=True) * 2.0,
        ValueError,
        r"do not depend on any parameter",
    ),
    "empty_tensor": (lambda m: m()[:0], ValueError, r"empty loss tensor"),
    "empty_list": (lambda m: [], ValueError, r"empty sequence of losses"),
    "none": (lambda m: None, TypeError, r"got NoneType .*does the closure return the losses"),
    "float": (lambda m: 1.5, TypeError, r"got float"),
    "string": (lambda m: "loss", TypeError, r"got str"),
    "list_with_a_non_tensor": (lambda m: [m()[0], 2.0], TypeError, r"losses\[1\] is a float"),
    "list_with_a_non_scalar": (lambda m: [m()[0], m()[1:]], ValueError, r"losses\[1\] has shape"),
    "integer_losses": (
        lambda m: torch.tensor([1, 2]),
        TypeError,
        r"must be floating-point",
    ),
}


@pytest.mark.parametrize("batch_dim", [None, 0], ids=["jacobian", "per_sample"])
@pytest.mark.parametrize(
    "aggregator", [UPGrad, lambda: _matrix_mean], ids=["gramian_upgrad", "matrix_callable"]
)
@pytest.mark.parametrize("entry", ["step", "backward"])
@pytest.mark.parametrize("case", BAD_LOSSES)
def test_bad_losses_raise_a_precise_error_and_change_nothing(case, entry, aggregator, batch_dim):
    make_losses, error, match = BAD_LOSSES[case]
    model, opt = _setup(aggregator, batch_dim)
    before = _snapshot(model, opt)
    with pytest.raises(error, match=match):
        if entry == "step":

            def closure():
                opt.zero_grad()
                return make_losses(model)

            opt.step(closure)
        else:
            opt.backward(make_losses(model))
    _assert_unchanged(before, model, opt)
    # The optimizer is still usable afterwards.
    opt.step(lambda: (opt.zero_grad(), model())[1])
    assert all(p.grad is not None for p in (model.lin1.weight, model.lin2.bias))


@pytest.mark.parametrize("batch_dim", [None, 0], ids=["jacobian", "per_sample"])
def test_an_exception_from_the_closure_propagates_unchanged(batch_dim):
    model, opt = _setup(batch_dim=batch_dim)
    before = _snapshot(model, opt)
    error = KeyError("raised by the user's closure")

    def closure():
        opt.zero_grad()
        model()  # a forward, then a failure
        raise error

    with pytest.raises(KeyError) as info:
        opt.step(closure)
    assert info.value is error
    _assert_unchanged(before, model, opt)


def test_a_keyboard_interrupt_in_the_closure_changes_nothing():
    model, opt = _setup()
    before = _snapshot(model, opt)

    def closure():
        opt.zero_grad()
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        opt.step(closure)
    _assert_unchanged(before, model, opt)


# ---------------------------------------------------------------- construction


def _constructor_cases():
    model = _Model()
    outsider = nn.Parameter(torch.zeros(3))
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    return (
        model,
        sgd,
        {
            "params_instead_of_optimizer": (
                lambda: JacobianOptimizer(list(model.parameters()), UPGrad()),
                TypeError,
                r"optimizer must be a torch.optim.Optimizer instance, got list",
            ),
            "module_instead_of_optimizer": (
                lambda: JacobianOptimizer(model, UPGrad()),
                TypeError,
                r"got _Model",
            ),
            "wrapped_twice": (
                lambda: JacobianOptimizer(JacobianOptimizer(sgd, UPGrad()), UPGrad()),
                TypeError,
                r"already a JacobianOptimizer",
            ),
            "aggregator_not_callable": (
                lambda: JacobianOptimizer(sgd, "upgrad"),
                TypeError,
                r"aggregator must be callable, got str",
            ),
            "shared_params_not_in_optimizer": (
                lambda: JacobianOptimizer(
                    sgd, UPGrad(), shared_params=[model.lin1.weight, outsider]
                ),
                ValueError,
                r"shared_params\[1\] \(shape \(3,\)\) is not a parameter of the wrapped optimizer",
            ),
            "shared_params_not_tensors": (
                lambda: JacobianOptimizer(sgd, UPGrad(), shared_params=[model.lin1.weight, "w"]),
                TypeError,
                r"shared_params\[1\] is a str",
            ),
            "shared_params_empty": (
                lambda: JacobianOptimizer(sgd, UPGrad(), shared_params=[]),
                ValueError,
                r"shared_params is empty",
            ),
            "grad_scaler_wrong_type": (
                lambda: JacobianOptimizer(sgd, UPGrad(), grad_scaler=object()),
                TypeError,
                r"grad_scaler must be a torch.amp.GradScaler",
            ),
            "chunk_size_zero": (
                lambda: JacobianOptimizer(sgd, UPGrad(), parallel_chunk_size=0),
                ValueError,
                r"parallel_chunk_size must be a positive int",
            ),
            "batch_dim_one": (
                lambda: JacobianOptimizer(sgd, UPGrad(), batch_dim=1),
                ValueError,
                r"batch_dim must be 0",
            ),
        },
    )


@pytest.mark.parametrize("case", list(_constructor_cases()[2]))
def test_bad_constructor_arguments_raise_and_leave_the_inner_optimizer_alone(case):
    model, sgd, cases = _constructor_cases()
    build, error, match = cases[case]
    before_groups = [dict(g, params=list(g["params"])) for g in sgd.param_groups]
    before_params = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(error, match=match):
        build()
    assert len(sgd.param_groups) == len(before_groups)
    for g, h in zip(sgd.param_groups, before_groups, strict=True):
        assert g.keys() == h.keys()
        assert all(a is b for a, b in zip(g["params"], h["params"], strict=True))
    assert len(sgd.state) == 0
    assert all(p.grad is None for p in model.parameters())
    for a, p in zip(before_params, model.parameters(), strict=True):
        assert torch.equal(a, p)


def test_losses_not_reaching_the_shared_params_raise_and_change_nothing():
    model, _ = _setup()
    opt = JacobianOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), UPGrad(), shared_params=[model.lin1.weight]
    )
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    before = _snapshot(model, opt)
    with pytest.raises(ValueError, match="do not depend on any of the shared_params"):
        opt.step(lambda: (opt.zero_grad(), model.zero.pow(2))[1])
    _assert_unchanged(before, model, opt)


def test_an_aggregator_returning_the_wrong_shape_raises_and_changes_nothing():
    model, _ = _setup()
    opt = JacobianOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), lambda j: j.sum())
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    before = _snapshot(model, opt)
    with pytest.raises(ValueError, match=r"must return a vector of shape \[\d+\], got \(\)"):
        opt.step(lambda: (opt.zero_grad(), model())[1])
    _assert_unchanged(before, model, opt)


def test_a_disabled_grad_scaler_still_rejects_non_finite_losses():
    """Only an *enabled* scaler turns non-finite losses into a skipped step."""
    model, _ = _setup()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    opt = JacobianOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), UPGrad(), grad_scaler=scaler
    )
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    before = _snapshot(model, opt)
    with pytest.raises(ValueError, match=r"NaN or inf at indices \[0\]"):
        opt.backward(model() + torch.tensor([float("nan"), 0.0, 0.0, 0.0, 0.0]))
    _assert_unchanged(before, model, opt)


class _CountingAggregator(UPGrad):
    """UPGrad with a piece of state (a counter) that loads strictly."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state_dict):
        if set(state_dict) != {"calls"}:
            raise KeyError(f"_CountingAggregator: unexpected keys {sorted(state_dict)}")
        self.calls = state_dict["calls"]


def _adam_wrapper(model: nn.Module, aggregator, lr: float = 0.01) -> JacobianOptimizer:
    return JacobianOptimizer(torch.optim.Adam(model.parameters(), lr=lr), aggregator)


@pytest.mark.parametrize("mismatch", ["aggregator_state", "param_groups"])
def test_a_failed_load_state_dict_leaves_the_optimizer_and_aggregator_unchanged(mismatch):
    model, _ = _setup()
    source = _adam_wrapper(model, _CountingAggregator(), lr=0.5)
    for _ in range(2):
        source.step(lambda: (source.zero_grad(), model())[1])
    source.aggregator.calls = 7
    sd = source.state_dict()

    if mismatch == "aggregator_state":
        target = _adam_wrapper(model, UPGrad())  # stateless: refuses the counter
        error, match = RuntimeError, r"Unexpected key\(s\) in state_dict: \"calls\""
    else:
        target = _adam_wrapper(model, _CountingAggregator())
        target.aggregator.calls = 3
        sd["param_groups"][0]["params"] = sd["param_groups"][0]["params"][:-1]
        error, match = ValueError, "parameter group"
    target.step(lambda: (target.zero_grad(), model())[1])
    before = copy.deepcopy(target.optimizer.state_dict())
    aggregator_before = target.aggregator.state_dict()
    with pytest.raises(error, match=match):
        target.load_state_dict(sd)
    after = target.optimizer.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for k, s in before["state"].items():
        for name, v in s.items():
            assert torch.equal(v, after["state"][k][name])
    assert target.aggregator.state_dict() == aggregator_before


def test_the_finiteness_check_is_not_fooled_by_a_sum_that_overflows():
    """The one-read check sums each tensor; a finite tensor whose sum overflows is still finite."""
    from jdoptim.linalg._finite import all_finite

    big = torch.full((4,), 3e38)  # finite float32 entries; their sum is inf
    assert bool(torch.isinf(big.sum()))
    assert all_finite([big, torch.ones(2, dtype=torch.float64)])
    for bad in (float("nan"), float("inf"), -float("inf")):
        assert not all_finite([torch.ones(3), torch.tensor([1.0, bad])])
    assert not all_finite([torch.tensor([float("inf"), -float("inf")])])  # the sum is NaN
