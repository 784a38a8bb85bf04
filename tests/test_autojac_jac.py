"""``jdoptim.autojac.jac`` against ``torch.func.jacrev`` and the behaviour documented by TorchJD."""

from __future__ import annotations

import pytest
import torch

from jdoptim.autojac import jac
from tests._autojac_cases import LOSS_FAMILIES, digits_model, reference_jacobians


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("stage", ["early", "late"])
@pytest.mark.parametrize("family", sorted(LOSS_FAMILIES))
def test_jac_matches_jacrev_on_digits(family, stage, dtype):
    _check_against_jacrev(family, stage, dtype, chunk=None)


@pytest.mark.parametrize("chunk", [1, 4])
def test_jac_in_chunks_matches_jacrev(chunk):
    _check_against_jacrev("per-sample", "late", torch.float64, chunk=chunk)


def _check_against_jacrev(family, stage, dtype, chunk):
    model, x, y = digits_model(stage, dtype)
    losses = LOSS_FAMILIES[family](model(x), y)
    names, params = zip(*model.named_parameters(), strict=True)
    got = jac(losses, params, parallel_chunk_size=chunk)
    expected = reference_jacobians(model, x, y, LOSS_FAMILIES[family])
    m = sum(t.numel() for t in losses)
    for name, p, j in zip(names, params, got, strict=True):
        assert j.shape == (m, *p.shape)
        tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {}
        torch.testing.assert_close(j, expected[name], **tol)


def test_jac_of_mixed_shapes_concatenates_the_flattened_outputs():
    a = torch.tensor([1.0, 2.0], requires_grad=True)
    b = torch.tensor([3.0], requires_grad=True)
    ja, jb = jac([a.sum(), (a * b).prod(), torch.stack([a[0], b[0]])], [a, b])
    # d(sum a)/da = [1, 1]; d(a0 a1 b^2)/da = [a1 b^2, a0 b^2] = [18, 9], d/db = 2 a0 a1 b = 12
    torch.testing.assert_close(ja, torch.tensor([[1.0, 1.0], [18.0, 9.0], [1.0, 0.0], [0.0, 0.0]]))
    torch.testing.assert_close(jb, torch.tensor([[0.0], [12.0], [0.0], [1.0]]))


def test_jac_chain_rule_with_jac_outputs():
    # The peer's documented example: y1 = sum h, y2 = h1 - h2 with h = x², at x = (1, 2).
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    h = x**2
    y1, y2 = h.sum(), torch.tensor([1.0, -1.0]) @ h
    (jac_h,) = jac([y1, y2], [h], retain_graph=True)
    (jac_x,) = jac(h, x, jac_outputs=jac_h)
    torch.testing.assert_close(jac_x, torch.tensor([[2.0, 4.0], [2.0, -4.0]]))


def test_jac_inputs_edge_cases():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    unused = torch.ones(3, requires_grad=True)
    assert jac([x.sum()], []) == ()
    jx, jx_again, ju = jac([x.prod(), x.sum()], [x, x, unused])
    torch.testing.assert_close(jx, torch.tensor([[2.0, 1.0], [1.0, 1.0]]))
    assert jx_again is jx  # differentiated once
    torch.testing.assert_close(ju, torch.zeros(2, 3))
    (jd,) = jac([x.prod()])  # inputs default to the leaves the outputs reach
    torch.testing.assert_close(jd, torch.tensor([[2.0, 1.0]]))
    h = x * 3  # a non-leaf input
    (jh,) = jac([h.sum(), h[0]], h)
    torch.testing.assert_close(jh, torch.tensor([[1.0, 1.0], [1.0, 0.0]]))
    (jg,) = jac([x.sum()], (t for t in [x]))  # a generator of inputs
    torch.testing.assert_close(jg, torch.ones(1, 2))


def test_jac_frees_the_graph_unless_retained():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    y = x.exp().sum()
    jac([y], [x], retain_graph=True)
    jac([y], [x])
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        jac([y], [x])


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda x: jac([], [x]), ValueError, "`outputs` cannot be empty"),
        (lambda x: (lambda y: jac([y, y], [x]))(x.sum()), ValueError, "same tensor"),
        (lambda x: jac([torch.ones(2)], [x]), ValueError, r"`outputs\[0\]`.*require grad"),
        (lambda x: jac([x.sum()], [torch.ones(2)]), ValueError, r"`inputs\[0\]`.*require grad"),
        (lambda x: jac([x.sum()], [x, 3]), TypeError, r"`inputs\[1\]` is a int"),
        (lambda x: jac(None, [x]), TypeError, "got NoneType"),
        (lambda x: jac([x[:0].sum() * 0, x[:0]], [x]), None, None),
        (lambda x: jac([x[:0]], [x]), ValueError, "hold no element"),
        (
            lambda x: jac([x.sum(), x.prod()], [x], jac_outputs=[torch.ones(1)]),
            ValueError,
            "same length",
        ),
        (
            lambda x: jac([x.sum(), x.prod()], [x], jac_outputs=[torch.ones(1), torch.ones(2)]),
            ValueError,
            "different numbers of rows",
        ),
        (lambda x: jac(x * 1, [x], jac_outputs=torch.eye(3)), ValueError, r"shape \(3, 3\)"),
        (lambda x: jac(x * 1, [x], jac_outputs=torch.ones(0, 2)), ValueError, "zero rows"),
        (lambda x: jac([x.sum()], [x], parallel_chunk_size=0), ValueError, "parallel_chunk"),
        (lambda x: jac([x.sum()], [x], parallel_chunk_size=1.5), ValueError, "parallel_chunk"),
    ],
)
def test_jac_argument_validation(call, error, match):
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    if error is None:
        (j,) = call(x)
        torch.testing.assert_close(j, torch.zeros(1, 2))
        return
    with pytest.raises(error, match=match):
        call(x)
