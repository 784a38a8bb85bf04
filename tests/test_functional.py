"""The top-level and ``jdoptim.functional`` names are the ``jdoptim.autojac`` functions.

Their behaviour is tested in ``tests/test_autojac_*.py``; here, that the old import paths still
reach them and still run a Jacobian-descent step end to end.
"""

from __future__ import annotations

import torch

import jdoptim
import jdoptim.autojac
import jdoptim.functional
from jdoptim.aggregation import UPGrad
from tests._references import upgrad_reference


def test_every_import_path_reaches_the_autojac_functions():
    for name in jdoptim.autojac.__all__:
        assert getattr(jdoptim, name) is getattr(jdoptim.autojac, name)
        assert getattr(jdoptim.functional, name) is getattr(jdoptim.autojac, name)
    assert jdoptim.jac_pair_to_grad is jdoptim.aggregation.jac_pair_to_grad


def test_a_step_through_the_top_level_names_matches_an_independent_upgrad():
    torch.manual_seed(0)
    w = torch.randn(3, requires_grad=True, dtype=torch.float64)
    x = torch.randn(4, 3, dtype=torch.float64)
    jdoptim.backward((x @ w).sin())
    matrix = w.jac.clone()
    weights = jdoptim.jac_to_grad([w], UPGrad())
    torch.testing.assert_close(w.grad, upgrad_reference(matrix))
    torch.testing.assert_close(weights @ matrix, w.grad)
