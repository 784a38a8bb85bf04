"""The aggregators' module surface against TorchJD 0.18 (skipped when it is not installed)."""

from __future__ import annotations

import pytest
import torch

from jdoptim import aggregation as ours
from jdoptim.linalg import QuadprogProjector
from tests.aggregation import _inputs

peer = pytest.importorskip("torchjd.aggregation")
peer_linalg = pytest.importorskip("torchjd.linalg")

# Same constructor arguments; the reprs must be equal. (UPGrad and DualProj name their projector;
# the random methods add their seed: both documented differences, tested below.)
SAME_REPR = [
    ("Mean", ()),
    ("Sum", ()),
    ("IMTLG", ()),
    ("MGDA", ()),
    ("ConFIG", ()),
    ("AlignedMTL", ()),
    ("ExcessMTL", ()),
    ("PCD", ()),
    ("Krum", (1, 2)),
    ("TrimmedMean", (1,)),
    ("FairGrad", (0.5,)),
    ("Constant", (torch.tensor([1.0, 2.0]),)),
]
# Hyper-parameters TorchJD exposes as properties, with a valid new value for each.
HYPER = [
    ("UPGrad", (), "pref_vector", torch.tensor([0.25, 0.75])),
    ("DualProj", (), "pref_vector", torch.tensor([0.25, 0.75])),
    ("MGDA", (), "epsilon", 0.01),
    ("MGDA", (), "max_iters", 7),
    ("Krum", (1,), "n_byzantine", 2),
    ("Krum", (1,), "n_selected", 2),
    ("TrimmedMean", (1,), "trim_number", 2),
    ("FairGrad", (0.5,), "alpha", 2.0),
    ("AlignedMTL", (), "scale_mode", "rmse"),
    ("PCD", (), "tau", 0.1),
    ("GradVac", (), "beta", 0.3),
    ("ExcessMTL", (), "robust_step_size", 0.5),
]


@pytest.mark.parametrize(("name", "args"), SAME_REPR, ids=[n for n, _ in SAME_REPR])
def test_repr_as_the_peer(name, args):
    assert repr(getattr(ours, name)(*args)) == repr(getattr(peer, name)(*args))


@pytest.mark.parametrize(("name", "cls"), [("UPGrad", "UPGrad"), ("DualProj", "DualProj")])
def test_projector_is_named_in_the_repr(name, cls):
    pref = torch.tensor([0.5, 0.5])
    prefix = repr(getattr(peer, cls)(pref)).split(", projector=")[0]
    assert repr(getattr(ours, name)(pref)) == f"{prefix}, projector=ExactProjector())"


@pytest.mark.parametrize(("name", "args", "attribute", "value"), HYPER, ids=lambda v: str(v))
def test_hyper_parameters_as_the_peer(name, args, attribute, value):
    mine, theirs = getattr(ours, name)(*args), getattr(peer, name)(*args)
    assert _same(getattr(mine, attribute), getattr(theirs, attribute))
    setattr(mine, attribute, value)
    setattr(theirs, attribute, value)
    assert _same(getattr(mine, attribute), getattr(theirs, attribute))
    owner = getattr(mine, "gramian_weighting", getattr(mine, "weighting", mine))
    assert _same(getattr(owner, attribute), value)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b


@pytest.mark.parametrize("name", ["UPGrad", "DualProj", "MGDA", "Krum", "IMTLG", "AlignedMTL"])
def test_submodules_and_the_weighting_of_the_matrix(name):
    args = (1,) if name == "Krum" else ()
    mine, theirs = getattr(ours, name)(*args), getattr(peer, name)(*args)
    names = {n for n, _ in theirs.named_children()}
    assert names <= {n for n, _ in mine.named_children()}
    J = torch.from_numpy(_inputs.conflicting(5, 7, 2))
    # ``weighting`` takes the matrix, ``gramian_weighting`` its Gramian, in both libraries.
    torch.testing.assert_close(mine.weighting(J), mine.gramian_weighting(J @ J.T))
    if name in ("UPGrad", "DualProj"):  # TorchJD's regularised projection, to compare values
        mine.projector = QuadprogProjector()
    torch.testing.assert_close(mine.weighting(J), theirs.weighting(J), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["UPGrad", "DualProj"])
def test_the_peers_projection_is_reproduced_by_either_projector(name):
    J = torch.from_numpy(_inputs.conflicting(8, 12, 3))
    expected = getattr(peer, name)()(J)
    with_ours = getattr(ours, name)(projector=QuadprogProjector())(J)
    with_theirs = getattr(ours, name)(projector=peer_linalg.QuadprogProjector())(J)
    torch.testing.assert_close(with_ours, expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(with_theirs, expected, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(getattr(ours, name)()(J), expected, rtol=1e-7, atol=0)  # exact


@pytest.mark.parametrize(("m", "f"), [(4, 1), (6, 3), (7, 2)])
def test_krum_accepts_what_the_peer_accepts(m, f):
    """Same bound ``m >= f + 3``. The values differ by design: TorchJD sums distances, the paper
    (and we) squared distances, and we share tied slots (see ``test_modules`` for the values)."""
    rng = torch.Generator().manual_seed(m)
    J = torch.randn(m, 5, generator=rng, dtype=torch.float64)
    for library in (ours, peer):
        assert library.Krum(f)(J).shape == (5,)
        with pytest.raises(ValueError):
            library.Krum(f)(J[: f + 2])


def test_monitoring_hooks_see_the_same_weights_as_the_peer():
    J = torch.from_numpy(_inputs.conflicting(4, 6, 1))
    seen: dict[str, list[torch.Tensor]] = {"ours": [], "peer": []}
    for label, library in (("ours", ours), ("peer", peer)):
        aggregator = library.MGDA()
        aggregator.gramian_weighting.register_forward_hook(
            lambda _m, _i, weights, label=label: seen[label].append(weights)
        )
        aggregator(J)
    torch.testing.assert_close(seen["ours"][0], seen["peer"][0], rtol=1e-9, atol=1e-12)
