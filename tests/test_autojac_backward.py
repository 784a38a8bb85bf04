"""``jdoptim.autojac.backward``: ``.jac`` vs ``torch.func.jacrev``, validation, atomicity."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from jdoptim.autojac import backward, jac
from tests._autojac_cases import LOSS_FAMILIES, digits_model, reference_jacobians


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("family", ["per-sample", "mixed-shapes", "spread-scales"])
def test_backward_fills_jac_with_the_jacobian_of_every_reached_leaf(family, dtype):
    model, x, y = digits_model("late", dtype)
    frozen = nn.Linear(2, 2)
    backward(LOSS_FAMILIES[family](model(x), y))
    expected = reference_jacobians(model, x, y, LOSS_FAMILIES[family])
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {}
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.jac, expected[name], **tol)
        assert p.grad is None
    assert not hasattr(frozen.weight, "jac")


def test_backward_documented_example():
    param = torch.tensor([1.0, 2.0], requires_grad=True)
    y1 = torch.tensor([-1.0, 1.0]) @ param
    y2 = (param**2).sum()
    backward([y1, y2])
    torch.testing.assert_close(param.jac, torch.tensor([[-1.0, 1.0], [2.0, 4.0]]))


def test_backward_with_jac_tensors_left_multiplies_the_jacobian():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    backward(
        [x.sum(), (x**2).sum()],
        jac_tensors=[torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0, 1, 3.0])],
    )
    full = torch.tensor([[1.0, 1.0], [2.0, 4.0]])  # rows: d sum, d sum x²
    init = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 3.0]])
    torch.testing.assert_close(x.jac, init @ full)


def test_a_repeated_input_is_counted_once():
    a = torch.tensor([1.0, -2.0], requires_grad=True)
    backward([a.sum(), (a**2).sum()], inputs=[a, a])
    torch.testing.assert_close(a.jac, torch.tensor([[1.0, 1.0], [2.0, -4.0]]))


def test_an_explicit_input_that_no_tensor_reaches_gets_zeros():
    a = torch.tensor([1.0, 2.0], requires_grad=True)
    unused = torch.ones(3, requires_grad=True)
    backward([a.sum(), a.prod()], inputs=[a, unused])
    torch.testing.assert_close(unused.jac, torch.zeros(2, 3))


def test_backward_accumulates_into_an_existing_jac():
    model, x, y = digits_model("early", torch.float64)
    first = model[0].weight
    for _ in range(2):
        backward(LOSS_FAMILIES["per-sample"](model(x), y), inputs=[first])
    expected = reference_jacobians(model, x, y, LOSS_FAMILIES["per-sample"])
    torch.testing.assert_close(first.jac, 2 * expected["0.weight"])
    assert not hasattr(model[2].weight, "jac")


def test_a_failing_call_writes_nothing():
    w1 = torch.tensor([1.0, 2.0], requires_grad=True)
    w2 = torch.tensor([3.0], requires_grad=True)
    w2.jac = torch.zeros(5, 1)  # from an earlier call with 5 losses
    with pytest.raises(ValueError, match=r"tensor 1 \(shape \(1,\)\) already holds a \.jac"):
        backward([(w1 * w2).sum(), w1.prod()], inputs=[w1, w2])
    assert not hasattr(w1, "jac")
    torch.testing.assert_close(w2.jac, torch.zeros(5, 1))
    x = torch.zeros(2, requires_grad=True)
    x.jac = torch.ones(2, 2)
    with pytest.raises(ValueError, match=r"Jacobian w\.r\.t\. input 0 .* holds NaN or inf"):
        backward([x.sqrt().sum(), x.sum()])
    torch.testing.assert_close(x.jac, torch.ones(2, 2))


def test_backward_on_a_tensor_of_any_shape_uses_its_values_as_rows():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    backward(torch.outer(x, x))
    (expected,) = jac(torch.outer(x, x).reshape(-1), x)
    torch.testing.assert_close(x.jac, expected)
    assert x.jac.shape == (4, 2)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda x: backward([]), ValueError, "`tensors` cannot be empty"),
        (lambda x: backward(None), TypeError, "got NoneType"),
        (lambda x: (lambda y: backward([y, y]))(x.sum()), ValueError, "same tensor"),
        (lambda x: backward([torch.ones(2)]), ValueError, "does not require grad"),
        (lambda x: backward([x]), ValueError, r"`tensors\[0\]`.* is a leaf tensor"),
        (lambda x: backward([x.sum()], inputs=[torch.ones(2)]), ValueError, "require grad"),
        (lambda x: backward([x.sum()], inputs=[x * 2]), ValueError, "not a leaf tensor"),
        (lambda x: backward(x.sum() * 0 + torch.nan), ValueError, "NaN or inf"),
        (lambda x: backward([x.sum()], parallel_chunk_size=-1), ValueError, "parallel_chunk"),
        (
            lambda x: backward([x.sum()], jac_tensors=[torch.ones(1), torch.ones(1)]),
            ValueError,
            "same length",
        ),
    ],
)
def test_backward_argument_validation_writes_nothing(call, error, match):
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    with pytest.raises(error, match=match):
        call(x)
    assert not hasattr(x, "jac")


def test_explicit_empty_inputs_is_a_no_op():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    backward([x.sum()], inputs=[])
    assert not hasattr(x, "jac")


def test_a_non_leaf_that_retains_grad_gets_a_jac():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    h = x * 2
    h.retain_grad()
    backward([h.sum(), h[1]], inputs=[h])
    torch.testing.assert_close(h.jac, torch.tensor([[1.0, 1.0], [0.0, 1.0]]))


def test_finite_values_whose_sum_overflows_are_accepted():
    # float32: each loss and each Jacobian entry is finite, their sums overflow to inf.
    w = torch.tensor([1.0, 1.0], requires_grad=True)
    scaled = w * 3e38
    backward([scaled[0], scaled[1], scaled])
    expected = torch.tensor([[3e38, 0.0], [0.0, 3e38], [3e38, 0.0], [0.0, 3e38]])
    torch.testing.assert_close(w.jac, expected)
