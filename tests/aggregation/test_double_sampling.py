"""Double sampling: cross-Gramians of Jacobian blocks, jac_pair_to_grad, the optimizer path."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from jdoptim import JacobianOptimizer, jac
from jdoptim.aggregation._bases import GramianWeightedAggregator
from jdoptim.aggregation._crmogm import CRMOGMWeighting
from jdoptim.aggregation._double_sampling import cross_gramian, jac_pair_to_grad
from jdoptim.aggregation._mgda import MGDAWeighting
from jdoptim.aggregation._modo import MoDoWeighting
from jdoptim.aggregation._sdmgrad import SDMGradWeighting
from tests.aggregation._simplex_reference import project_simplex_bisection


def blocks(m: int, shapes: list[tuple[int, ...]], seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(m, *shape, dtype=torch.float64, generator=generator) for shape in shapes]


SHAPES = [(3, 2), (4,), ()]


def flat(jacobians: list[torch.Tensor]) -> np.ndarray:
    return np.concatenate([j.reshape(j.shape[0], -1).numpy() for j in jacobians], axis=1)


def test_cross_gramian_of_blocks():
    j1, j2 = blocks(4, SHAPES, 0), blocks(4, SHAPES, 1)
    expected = flat(j1) @ flat(j2).T
    np.testing.assert_allclose(cross_gramian(j1, j2).numpy(), expected, atol=1e-12)
    single = torch.randn(3, 5)
    assert torch.allclose(cross_gramian(single, single), single @ single.T)


@pytest.mark.parametrize("third_batch", [False, True])
def test_jac_pair_to_grad_matches_an_independent_modo_step(third_batch):
    tensors = [torch.zeros(shape, dtype=torch.float64, requires_grad=True) for shape in SHAPES]
    tensors[0].grad = torch.ones(3, 2, dtype=torch.float64)  # accumulated into
    j1, j2, j3 = blocks(4, SHAPES, 0), blocks(4, SHAPES, 1), blocks(4, SHAPES, 2)
    weights = jac_pair_to_grad(
        tensors,
        MoDoWeighting(gamma=0.05, rho=0.1),
        j1,
        j2,
        update_jacobians=j3 if third_batch else None,
    )
    lam = np.full(4, 0.25)
    c = flat(j1) @ flat(j2).T
    expected_weights = project_simplex_bisection(lam - 0.05 * (c @ lam + 0.1 * lam))
    np.testing.assert_allclose(weights.numpy(), expected_weights, atol=1e-12)
    update_matrix = flat(j3) if third_batch else (flat(j1) + flat(j2)) / 2
    expected_update = expected_weights @ update_matrix
    expected_update[:6] += 1.0
    actual = np.concatenate([t.grad.reshape(-1).numpy() for t in tensors])
    np.testing.assert_allclose(actual, expected_update, atol=1e-12)


def test_end_to_end_with_jac_on_two_batches():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2, dtype=torch.float64)
    params = list(model.parameters())

    def losses(x, y):
        return ((model(x) - y) ** 2).mean(dim=0)  # one loss per output

    batches = [(torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64))]
    batches.append((torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)))
    j1 = jac(losses(*batches[0]), params)
    j2 = jac(losses(*batches[1]), params)
    weighting = SDMGradWeighting()
    weights = jac_pair_to_grad(params, weighting, j1, j2)
    assert weights.shape == (2,) and abs(float(weights.sum()) - 1.0) < 1e-12
    for p, a, b in zip(params, j1, j2, strict=True):
        assert torch.allclose(p.grad, torch.tensordot(weights, (a + b) / 2, dims=1))
    assert weighting.get_extra_state()["lambda"] is not None


def test_bad_arguments():
    j = blocks(3, SHAPES, 0)
    tensors = [torch.zeros(shape, dtype=torch.float64) for shape in SHAPES]
    with pytest.raises(TypeError, match="DoubleSamplingWeighting"):
        jac_pair_to_grad(tensors, MGDAWeighting(), j, j)
    with pytest.raises(TypeError, match="DoubleSamplingWeighting"):
        jac_pair_to_grad(tensors, CRMOGMWeighting(MoDoWeighting()), j, j)
    with pytest.raises(ValueError, match="got 2 tensors"):
        jac_pair_to_grad(tensors[:2], MoDoWeighting(), j, j)
    with pytest.raises(ValueError, match="Jacobian blocks of shapes"):
        cross_gramian(j, blocks(4, SHAPES, 1))
    with pytest.raises(ValueError, match="got 3 and 2 Jacobian blocks"):
        cross_gramian(j, j[:2])
    with pytest.raises(ValueError, match="for a tensor"):
        jac_pair_to_grad(tensors[::-1], MoDoWeighting(), j[::-1], j[::-1], update_jacobians=j)
    with pytest.raises(ValueError, match="non-empty"):
        cross_gramian([], [])


@pytest.mark.parametrize("weighting", [MoDoWeighting(), SDMGradWeighting()], ids=repr)
def test_one_batch_use_in_the_optimizer_and_bit_exact_resume(weighting):
    def run(opt, model, steps, seed):
        generator = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            x, y = torch.randn(8, 3, generator=generator), torch.randn(8, 2, generator=generator)

            def closure(x=x, y=y):
                opt.zero_grad()
                return ((model(x) - y) ** 2).mean(dim=0)

            opt.step(closure)

    def build():
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        weighting_copy = type(weighting)()
        opt = JacobianOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
            GramianWeightedAggregator(weighting_copy),
        )
        return model, opt

    model, opt = build()
    run(opt, model, 3, seed=1)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    run(opt, model, 2, seed=2)
    resumed_model, resumed_opt = build()
    resumed_model.load_state_dict(saved_model)
    resumed_opt.load_state_dict(saved_opt)
    run(resumed_opt, resumed_model, 2, seed=2)
    for a, b in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b)
