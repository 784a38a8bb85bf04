"""``Engine``: the Gramian of the Jacobian of some outputs w.r.t. the parameters of some modules."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import Tensor, nn

from jdoptim.autogram._adapter import PerSampleGramian
from jdoptim.engine import JacobianEngine, reachable_leaves
from jdoptim.engine._reduce import gramian as jacobian_gramian


def _as_modules(modules: tuple[object, ...]) -> tuple[nn.Module, ...]:
    """The modules, each given alone or in an iterable (``model[2:].modules()``)."""
    flat: list[object] = []
    for item in modules:
        flat.extend(
            [item] if isinstance(item, nn.Module) or not isinstance(item, Iterable) else item
        )
    if not flat:
        raise ValueError("Engine needs at least one module")
    for i, module in enumerate(flat):
        if not isinstance(module, nn.Module):
            raise TypeError(f"modules[{i}] is a {type(module).__name__}, expected an nn.Module")
    return tuple(flat)


def _params_of(modules: tuple[nn.Module, ...]) -> Callable[[], list[Tensor]]:
    """The parameters of ``modules`` that require grad, each once, read at each call."""

    def params() -> list[Tensor]:
        found = {id(p): p for module in modules for p in module.parameters() if p.requires_grad}
        return list(found.values())

    return params


class Engine:
    """Compute the Gramian ``J Jᵀ`` of the Jacobian of an output w.r.t. some modules' parameters.

    The columns of the Jacobian are the parameters of ``modules`` and of their submodules that
    require grad, each counted once (a module passed with its parent adds nothing). The Gramian
    holds every inner product of two rows' gradients, which is all that Gramian-based weightings
    (UPGrad, DualProj, MGDA, ...) need::

        engine = Engine(model, batch_dim=0)
        losses = criterion(model(x), y)  # reduction="none": one loss per sample
        weights = weighting(engine.compute_gramian(losses))
        losses.backward(weights)  # the update J^T w, by one more backward
        optimizer.step()

    Parameters
    ----------
    *modules:
        The modules (or iterables of modules) whose parameters make the columns of the Jacobian.
    batch_dim:
        The dimension of the output that indexes independent samples (each value along it
        depends on one sample of the modules' batched inputs, batched on dimension 0), or
        ``None``. With a batch dimension and a 1-D output, the Gramian comes from one backward
        pass of the summed output and closed forms per layer (the per-sample engine); otherwise
        it comes from the exact Jacobian (batched VJPs).

    Notes
    -----
    With ``batch_dim`` set, forward hooks on the layers that own the parameters record each
    call's input, while grad is enabled, in the graph of the call's output: the record goes away
    with that graph, so forward passes not followed by :meth:`compute_gramian` leave nothing
    behind. The losses must not mix samples (no BatchNorm in training mode, no batch-centred
    outputs): the per-sample engine checks this on the first call, then every 100 calls.

    Examples
    --------
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Tanh(), torch.nn.Linear(2, 1))
    >>> engine = Engine(model, batch_dim=0)
    >>> losses = model(torch.randn(5, 3)).squeeze(1) ** 2
    >>> gramian = engine.compute_gramian(losses)
    >>> gramian.shape
    torch.Size([5, 5])
    >>> losses.backward(torch.full((5,), 0.2))  # the graph is kept for the weighted backward
    """

    def __init__(self, *modules: nn.Module | Iterable[nn.Module], batch_dim: int | None) -> None:
        modules = _as_modules(modules)
        if batch_dim is not None and (
            isinstance(batch_dim, bool) or not isinstance(batch_dim, int)
        ):
            raise TypeError(f"batch_dim must be an int or None, got {batch_dim!r}")
        self.modules = modules
        self.batch_dim = batch_dim
        self._params = _params_of(modules)  # no reference to self: the hook dies with the engine
        self._per_sample = None if batch_dim is None else PerSampleGramian(self._params, modules)

    def compute_gramian(self, output: Tensor, /) -> Tensor:
        """Return the Gramian of the Jacobian of ``output`` w.r.t. the modules' parameters.

        Parameters
        ----------
        output:
            A tensor of any shape; its ``m`` values (flattened) are the rows of the Jacobian.
            The graph is kept, for a backward pass of ``output`` weighted by the Gramian.

        Returns
        -------
        Tensor
            The ``[m, m]`` Gramian (zeros when ``output`` does not depend on the parameters).
        """
        if not isinstance(output, Tensor):
            raise TypeError(f"output must be a torch.Tensor, got {type(output).__name__}")
        if output.numel() == 0:
            raise ValueError("output has no element: there is nothing to differentiate")
        if not output.requires_grad:
            raise ValueError("output does not require grad: was it computed under no_grad?")
        if self.batch_dim is not None and not -output.ndim <= self.batch_dim < max(output.ndim, 1):
            raise ValueError(
                f"batch_dim={self.batch_dim} is not a dimension of output (shape "
                f"{tuple(output.shape)})"
            )
        params = self._params()
        m = output.numel()
        reached = {id(leaf) for leaf in reachable_leaves([output])}
        params = [p for p in params if id(p) in reached]
        if not params:
            return output.new_zeros((m, m)).detach()
        if self._per_sample is not None and output.ndim == 1:
            return self._per_sample.gramian(output, params)
        vector = output.reshape(-1)
        jacobians = JacobianEngine().jacobians(vector, params, retain_graph=True)
        return jacobian_gramian([j for j in jacobians if j is not None]).detach()
