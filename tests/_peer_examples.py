"""TorchJD's (0.18) README and documentation examples, written once with ``torchjd`` imports.

:func:`run` executes one with its imports pointing at ``jdoptim`` or ``torchjd``, from a fixed
seed, and returns the trained parameters.
"""

from __future__ import annotations

import torch

_PRELUDE = """
import torch
from torch.nn import Linear, MSELoss, ReLU, Sequential
from torch.optim import SGD
torch.set_default_dtype(torch.float64)
inputs = torch.randn(8, 16, 10)
targets = torch.randn(8, 16, 2)
"""

EXAMPLES = {
    # README, "Jacobian descent": multi-task learning with mtl_backward and jac_to_grad.
    "readme-mtl": """
from torchjd.autojac import jac_to_grad, mtl_backward
from torchjd.aggregation import UPGrad

shared_module = Sequential(Linear(10, 5), ReLU(), Linear(5, 3), ReLU())
task1_module = Linear(3, 1)
task2_module = Linear(3, 1)
params = [*shared_module.parameters(), *task1_module.parameters(), *task2_module.parameters()]
loss_fn = MSELoss()
optimizer = SGD(params, lr=0.1)
aggregator = UPGrad()
for input, target in zip(inputs, targets):
    features = shared_module(input)
    loss1 = loss_fn(task1_module(features), target[:, :1])
    loss2 = loss_fn(task2_module(features), target[:, 1:])
    mtl_backward([loss1, loss2], features=features)
    jac_to_grad(shared_module.parameters(), aggregator)
    optimizer.step()
    optimizer.zero_grad()
""",
    # Docs, basic usage: two losses of one model, backward then jac_to_grad.
    "basic-usage": """
from torchjd.autojac import backward, jac_to_grad
from torchjd.aggregation import UPGrad

model = Sequential(Linear(10, 5), ReLU(), Linear(5, 2))
params = list(model.parameters())
optimizer = SGD(params, lr=0.1)
aggregator = UPGrad()
loss_fn = MSELoss()
for input, target in zip(inputs, targets):
    output = model(input)
    loss1 = loss_fn(output[:, 0], target[:, 0])
    loss2 = loss_fn(output[:, 1], target[:, 1])
    backward([loss1, loss2])
    jac_to_grad(model.parameters(), aggregator)
    optimizer.step()
    optimizer.zero_grad()
""",
    # Docs, instance-wise risk minimization with the autogram engine.
    "iwrm-autogram": """
from torchjd.aggregation import UPGradWeighting
from torchjd.autogram import Engine

model = Sequential(Linear(10, 5), ReLU(), Linear(5, 1))
params = list(model.parameters())
optimizer = SGD(params, lr=0.1)
loss_fn = MSELoss(reduction="none")
weighting = UPGradWeighting()
engine = Engine(model, batch_dim=0)
for input, target in zip(inputs, targets):
    output = model(input).squeeze(dim=1)
    losses = loss_fn(output, target[:, 0])
    optimizer.zero_grad()
    gramian = engine.compute_gramian(losses)
    weights = weighting(gramian)
    losses.backward(weights)
    optimizer.step()
""",
    # Docs, partial Jacobian descent: the Gramian w.r.t. the last layers only.
    "partial-jd": """
from torchjd.aggregation import UPGradWeighting
from torchjd.autogram import Engine

model = Sequential(Linear(10, 8), ReLU(), Linear(8, 5), ReLU(), Linear(5, 1))
params = list(model.parameters())
optimizer = SGD(params, lr=0.1)
loss_fn = MSELoss(reduction="none")
weighting = UPGradWeighting()
engine = Engine(model[2:].modules(), batch_dim=0)
for input, target in zip(inputs, targets):
    output = model(input).squeeze(dim=1)
    losses = loss_fn(output, target[:, 0])
    optimizer.zero_grad()
    gramian = engine.compute_gramian(losses)
    weights = weighting(gramian)
    losses.backward(weights)
    optimizer.step()
""",
}


# Docs, monitoring: hooks on the aggregator (its input J, its output) and on its weighting.
MONITORING = """
from torchjd.autojac import jac_to_grad, mtl_backward
from torchjd.aggregation import UPGrad

seen = {"weights": [], "similarity": []}

def record_weights(_, __, weights):
    seen["weights"].append(weights)

def record_similarity(_, inputs, aggregation):
    mean = inputs[0].mean(dim=0)
    seen["similarity"].append(torch.nn.functional.cosine_similarity(aggregation, mean, dim=0))

shared_module = Sequential(Linear(10, 5), ReLU(), Linear(5, 3), ReLU())
task1_module = Linear(3, 1)
task2_module = Linear(3, 1)
params = [*shared_module.parameters(), *task1_module.parameters(), *task2_module.parameters()]
loss_fn = MSELoss()
optimizer = SGD(params, lr=0.1)
aggregator = UPGrad()
aggregator.weighting.register_forward_hook(record_weights)
aggregator.register_forward_hook(record_similarity)
for input, target in zip(inputs, targets):
    features = shared_module(input)
    loss1 = loss_fn(task1_module(features), target[:, :1])
    loss2 = loss_fn(task2_module(features), target[:, 1:])
    mtl_backward([loss1, loss2], features=features)
    returned = jac_to_grad(shared_module.parameters(), aggregator)
    assert torch.equal(returned, seen["weights"][-1])
    optimizer.step()
    optimizer.zero_grad()
"""


def run(source: str, library: str, namespace: dict | None = None) -> list[torch.Tensor]:
    """Run an example with its imports pointing at ``library``; return the trained parameters."""
    code = _PRELUDE + source.replace("torchjd", library)
    if library == "torchjd":  # 0.18 takes modules, not an iterable of them
        code = code.replace("Engine(model[2:].modules(),", "Engine(model[2:],")
    namespace = {} if namespace is None else namespace
    default = torch.get_default_dtype()
    torch.manual_seed(0)
    try:
        exec(compile(code, f"<{library} example>", "exec"), namespace)
    finally:
        torch.set_default_dtype(default)
    return [p.detach().clone() for p in namespace["params"]]
