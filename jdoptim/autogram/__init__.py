"""The Gramian of a Jacobian w.r.t. some modules' parameters, without forming the Jacobian.

:class:`Engine` has the name, signature and semantics of TorchJD's ``torchjd.autogram.Engine``
(0.18), so code written for it switches by changing the import. With ``batch_dim`` set and one
loss per sample, it runs on jdoptim's per-sample engine: one backward pass and per-layer closed
forms. :class:`jdoptim.JacobianOptimizer` with ``batch_dim=0`` uses the same engine inside the
optimizer step (and forms the update without the second backward).
"""

from jdoptim.autogram._engine import Engine

__all__ = ["Engine"]
