"""Jacobian descent by hand: Jacobians into ``.jac`` fields, then an aggregation into ``.grad``.

The functions have the names, signatures and semantics of TorchJD's ``torchjd.autojac`` (0.18),
so code written for it switches by changing the import (see the "Coming from TorchJD" page)::

    backward(losses)  # each leaf the losses reach gets a .jac of shape [m, *p.shape]
    jac_to_grad(model.parameters(), UPGrad())  # .jac -> aggregated .grad, .jac deleted
"""

from jdoptim.autojac._backward import backward
from jdoptim.autojac._jac import jac
from jdoptim.autojac._jac_to_grad import jac_to_grad
from jdoptim.autojac._mtl_backward import mtl_backward

__all__ = ["backward", "jac", "jac_to_grad", "mtl_backward"]
