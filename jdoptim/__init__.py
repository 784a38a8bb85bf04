"""jdoptim: Jacobian descent for PyTorch, as a drop-in ``torch.optim`` optimizer.

The public surface: :class:`JacobianOptimizer`, the functional API of :mod:`jdoptim.autojac`
(:func:`jac`, :func:`backward`, :func:`jac_to_grad`, :func:`mtl_backward`, also importable from
here), the Gramian engine :class:`jdoptim.autogram.Engine` and the aggregators in
:mod:`jdoptim.aggregation`.
"""

from jdoptim import aggregation, autogram, autojac
from jdoptim.aggregation import UPGrad
from jdoptim.functional import backward, jac, jac_pair_to_grad, jac_to_grad, mtl_backward
from jdoptim.optimizer import JacobianOptimizer

__all__ = [
    "JacobianOptimizer",
    "UPGrad",
    "aggregation",
    "autogram",
    "autojac",
    "backward",
    "jac",
    "jac_pair_to_grad",
    "jac_to_grad",
    "mtl_backward",
]
__version__ = "0.1.0"
