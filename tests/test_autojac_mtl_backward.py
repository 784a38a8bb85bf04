"""``jdoptim.autojac.mtl_backward`` vs ``torch.func.jacrev``, the peer's semantics, atomicity."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from jdoptim.autojac import mtl_backward
from tests._autojac_cases import digits_model


class _MultiTask(nn.Module):
    def __init__(self, d_in: int = 64) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(d_in, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(5, 1) for _ in range(3))

    def forward(self, x):
        h = self.trunk(x)
        return h, [head(h).pow(2).mean() for head in self.heads]


def _setup(dtype=torch.float64):
    _, x, _ = digits_model("early", dtype)  # real inputs: 64 digits
    torch.manual_seed(0)
    return _MultiTask().to(dtype), x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("explicit", [False, True])
@pytest.mark.parametrize("chunk", [None, 1])
def test_mtl_backward_matches_jacrev(explicit, chunk, dtype):
    model, x = _setup(dtype)
    h, losses = model(x)
    kwargs = {}
    if explicit:
        kwargs = {
            "tasks_params": [list(head.parameters()) for head in model.heads],
            "shared_params": list(model.trunk.parameters()),
        }
    mtl_backward(losses, features=h, parallel_chunk_size=chunk, **kwargs)
    params = {k: v.detach() for k, v in model.named_parameters()}
    expected = jacrev(lambda p: torch.stack(functional_call(model, p, (x,))[1]))(params)
    tol = {"rtol": 1e-4, "atol": 1e-6} if dtype == torch.float32 else {}
    for name, p in model.trunk.named_parameters():
        torch.testing.assert_close(p.jac, expected[f"trunk.{name}"], **tol)
        assert p.grad is None
    for t, head in enumerate(model.heads):
        for name, p in head.named_parameters():
            torch.testing.assert_close(p.grad, expected[f"heads.{t}.{name}"][t], **tol)
            assert not hasattr(p, "jac")


def test_non_scalar_tensors_with_grad_tensors():
    model, x = _setup()
    h = model.trunk(x)
    outs = [head(h).squeeze(1) for head in model.heads]  # three [64] tensors
    grads = [torch.linspace(-1, 1, 64, dtype=torch.float64) * (t + 1) for t in range(3)]
    mtl_backward(outs, features=h, grad_tensors=grads)

    def task_scalars(p):
        hh = functional_call(model.trunk, {k[6:]: v for k, v in p.items() if "trunk" in k}, (x,))
        return torch.stack(
            [g @ head(hh).squeeze(1) for g, head in zip(grads, model.heads, strict=True)]
        )

    params = {k: v.detach() for k, v in model.named_parameters() if k.startswith("trunk")}
    expected = jacrev(task_scalars)(params)
    for name, p in model.trunk.named_parameters():
        torch.testing.assert_close(p.jac, expected[f"trunk.{name}"])


def test_peer_semantics_for_unused_and_shared_task_params():
    model, x = _setup()
    h, losses = model(x)
    unused = torch.ones(4, dtype=torch.float64, requires_grad=True)
    head0 = list(model.heads[0].parameters())
    idle = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    mtl_backward(
        losses,
        features=h,
        tasks_params=[[*head0, unused], [*model.heads[1].parameters(), *head0], []],
        shared_params=[*model.trunk.parameters(), idle],
    )
    torch.testing.assert_close(unused.grad, torch.zeros(4, dtype=torch.float64))  # zeros
    torch.testing.assert_close(idle.jac, torch.zeros(3, 2, dtype=torch.float64))  # zeros
    # head 0's parameters belong to tasks 0 and 1: the sum of both gradients (task 1 ignores
    # them: its gradient w.r.t. them is zero), so head 0 gets exactly its own task's gradient.
    (g0,) = torch.autograd.grad(model(x)[1][0], [model.heads[0].weight])
    torch.testing.assert_close(model.heads[0].weight.grad, g0)


def test_a_failing_call_writes_nothing():
    model, x = _setup()
    h, losses = model(x)
    model.trunk[0].weight.jac = torch.zeros(2, 6, 64, dtype=torch.float64)  # from 2 tasks
    with pytest.raises(ValueError, match=r"already holds a \.jac of shape \(2, 6, 64\)"):
        mtl_backward(losses, features=h)
    assert all(p.grad is None for p in model.parameters())
    assert not hasattr(model.trunk[2].weight, "jac")
    h, losses = model(x)
    with pytest.raises(ValueError, match="must not overlap"):
        mtl_backward(losses, features=h, tasks_params=[[model.trunk[2].weight], [], []])
    assert all(p.grad is None for p in model.parameters())
    del model.trunk[0].weight.jac
    h, _ = model(x)
    with pytest.raises(ValueError, match="NaN or inf"):
        mtl_backward([model.heads[0](h).sqrt().mean()], features=h)  # NaN from negative outputs
    assert all(p.grad is None for p in model.parameters())
    assert not hasattr(model.trunk[2].weight, "jac")


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda h, ls: mtl_backward([], features=h), "`tensors` cannot be empty"),
        (lambda h, ls: mtl_backward(ls, features=[]), "`features` cannot be empty"),
        (lambda h, ls: mtl_backward([ls[0], ls[0]], features=h), "same tensor"),
        (lambda h, ls: mtl_backward(ls, features=[h, h]), "same tensor"),
        (lambda h, ls: mtl_backward(ls, features=h, tasks_params=[[], []]), "2 for 3 tensors"),
        (lambda h, ls: mtl_backward([h.sum(1)], features=h), "need `grad_tensors`"),
        (
            lambda h, ls: mtl_backward(ls, features=h, grad_tensors=[torch.ones(())]),
            "same length",
        ),
        (lambda h, ls: mtl_backward(ls, features=torch.ones(3, requires_grad=True)), "leaf"),
        (lambda h, ls: mtl_backward(ls, features=h.detach()), "does not require grad"),
    ],
)
def test_argument_validation(call, match):
    model, x = _setup()
    h, losses = model(x)
    with pytest.raises(ValueError, match=match):
        call(h, losses)
    assert all(p.grad is None and not hasattr(p, "jac") for p in model.parameters())
