"""JacobianOptimizer inside Lightning (contract items 22-24 of the optimizer contract).

Skipped when ``lightning`` is not installed (it is in the ``test`` extra). Each training run is a
few steps on CPU on scikit-learn's breast-cancer data, with two losses (the cross-entropy of the
benign and of the malignant samples), compared with the same steps taken without Lightning.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from jdoptim import JacobianOptimizer
from jdoptim.aggregation import UPGrad

pl = pytest.importorskip("lightning.pytorch")
datasets = pytest.importorskip("sklearn.datasets")

STEPS = 3
pytestmark = pytest.mark.filterwarnings(r"ignore:.*LeafSpec")


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    data = datasets.load_breast_cancer()
    x = torch.tensor(data.data[:64], dtype=torch.float32)
    x = (x - x.mean(dim=0)) / x.std(dim=0)
    return x, torch.tensor(data.target[:64])


def _losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-class mean cross-entropy: a vector of 2 losses."""
    per_sample = nn.functional.cross_entropy(model(x), y, reduction="none")
    return torch.stack([per_sample[y == k].mean() for k in (0, 1)])


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(30, 8), nn.Tanh(), nn.Linear(8, 2))


class _Module(pl.LightningModule):
    """Manual optimisation; ``form`` is ``"closure"`` or ``"two-phase"``."""

    def __init__(self, form: str, clip: float | None = None) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.model, self.form, self.clip = _model(), form, clip
        self.returned: list[torch.Tensor | None] = []
        self.events: list[str] = []

    def configure_optimizers(self):
        return JacobianOptimizer(torch.optim.SGD(self.model.parameters(), lr=0.1), UPGrad())

    def on_before_optimizer_step(self, optimizer) -> None:
        self.events.append("before_step")

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt = self.optimizers()
        if self.form == "closure":

            def closure():
                opt.zero_grad()
                self.events.append("closure")
                return _losses(self.model, x, y)

            self.returned.append(opt.step(closure=closure))
        else:
            opt.zero_grad()
            opt.optimizer.backward(_losses(self.model, x, y))
            if self.clip is not None:
                self.clip_gradients(
                    opt, gradient_clip_val=self.clip, gradient_clip_algorithm="norm"
                )
            self.returned.append(opt.step())


def _fit(module: pl.LightningModule, **trainer_kwargs) -> pl.Trainer:
    x, y = _data()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=len(x), shuffle=False
    )
    trainer = pl.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_kwargs,
    )
    trainer.fit(module, loader)
    return trainer


def _plain_steps(clip: float | None = None, autocast: torch.dtype | None = None) -> nn.Module:
    """The same steps without Lightning: the reference trajectory."""
    model = _model()
    x, y = _data()
    opt = JacobianOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), UPGrad())
    for _ in range(STEPS):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            losses = _losses(model, x, y)
        opt.backward(losses)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    return model


def _assert_same_parameters(a: nn.Module, b: nn.Module, **tol) -> None:
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, **tol)


def test_item22_lightning_optimizer_class_and_optimizable():
    from lightning.fabric.utilities.types import Optimizable
    from lightning.pytorch.core.optimizer import LightningOptimizer

    opt = JacobianOptimizer(torch.optim.SGD(_model().parameters(), lr=0.1), UPGrad())
    assert isinstance(opt, Optimizable)
    lightning_opt = LightningOptimizer(copy.copy(opt))
    assert type(lightning_opt).__name__ == "LightningJacobianOptimizer"
    assert isinstance(lightning_opt, JacobianOptimizer) and isinstance(lightning_opt, Optimizable)


def test_item23_closure_form_returns_the_losses_and_advances_global_step():
    module = _Module("closure")
    trainer = _fit(module)
    assert trainer.global_step == STEPS
    assert all(r is not None and r.shape == (2,) for r in module.returned)
    # Lightning calls on_before_optimizer_step right after the closure, before the aggregation.
    assert module.events == ["closure", "before_step"] * STEPS
    _assert_same_parameters(module.model, _plain_steps())


@pytest.mark.parametrize("clip", [None, 0.05])
def test_two_phase_form_with_clipping_advances_global_step(clip):
    """``opt.optimizer.backward(losses); self.clip_gradients(...); opt.step()`` in Lightning.

    Lightning's ``step()`` passes its own closure, which returns None: the step uses the
    ``.grad`` that ``backward`` wrote (before the fix: "expected the losses ... got NoneType").
    """
    module = _Module("two-phase", clip)
    trainer = _fit(module)
    assert trainer.global_step == STEPS
    _assert_same_parameters(module.model, _plain_steps(clip))
    assert module.events == ["before_step"] * STEPS


@pytest.mark.parametrize("form", ["closure", "two-phase"])
def test_bf16_mixed_matches_the_same_steps_under_autocast(form):
    module = _Module(form)
    trainer = _fit(module, precision="bf16-mixed")
    assert trainer.global_step == STEPS
    _assert_same_parameters(module.model, _plain_steps(autocast=torch.bfloat16))


class _ScaledModule(_Module):
    """Under ``16-mixed`` Lightning calls the closure, then ``scaler.step(opt)`` without it."""

    def configure_optimizers(self):
        scaler = self.trainer.precision_plugin.scaler
        sgd = torch.optim.SGD(self.model.parameters(), lr=0.1)
        return JacobianOptimizer(sgd, UPGrad(), grad_scaler=scaler)

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt = self.optimizers()
        scaler = self.trainer.precision_plugin.scaler

        def closure():
            opt.zero_grad()
            opt.optimizer.backward(scaler.scale(_losses(self.model, x, y)))  # two-phase

        opt.step(closure=closure)


def test_item23_16_mixed_with_a_grad_scaler_matches_the_same_steps():
    from lightning.pytorch.plugins.precision import MixedPrecision

    scaler = torch.amp.GradScaler("cpu")
    module = _ScaledModule("closure")
    trainer = _fit(module, plugins=[MixedPrecision("16-mixed", "cpu", scaler)])
    assert trainer.global_step == STEPS
    model = _model()
    x, y = _data()
    ref_scaler = torch.amp.GradScaler("cpu")
    opt = JacobianOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), UPGrad(), grad_scaler=ref_scaler
    )
    for _ in range(STEPS):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            losses = _losses(model, x, y)
        opt.backward(ref_scaler.scale(losses))
        ref_scaler.step(opt)
        ref_scaler.update()
    assert scaler.get_scale() == ref_scaler.get_scale()
    _assert_same_parameters(module.model, model)


class _Automatic(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = _model()

    def configure_optimizers(self):
        return JacobianOptimizer(torch.optim.SGD(self.model.parameters(), lr=0.1), UPGrad())

    def training_step(self, batch, batch_idx):
        return _losses(self.model, *batch).sum()


def test_automatic_optimisation_says_to_use_manual_optimisation():
    """Lightning's automatic closure backpropagates the scalar loss itself."""
    module = _Automatic()
    before = [p.detach().clone() for p in module.model.parameters()]
    with pytest.raises(RuntimeError, match=r"did it call loss\.backward\(\)\?.*return them"):
        _fit(module)
    for p, q in zip(module.model.parameters(), before, strict=True):
        assert torch.equal(p.detach(), q)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_item24_optimizer_to_device_then_step(device):
    """Moving the state (Lightning's ``_optimizer_to_device``) between steps changes nothing."""
    from lightning.fabric.utilities.optimizer import _optimizer_to_device

    def run(move: bool) -> nn.Module:
        model = _model()
        x, y = _data()
        opt = JacobianOptimizer(torch.optim.Adam(model.parameters(), lr=0.01), UPGrad())
        for step in range(2):
            if step == 1 and move:
                model.to(device)
                _optimizer_to_device(opt, device)
                assert {v.device.type for s in opt.state.values() for k, v in s.items()} >= {device}
                x, y = x.to(device), y.to(device)
            opt.zero_grad()
            opt.step(lambda x=x, y=y: _losses(model, x, y))
        return model.cpu()

    _assert_same_parameters(run(True), run(False), rtol=1e-5, atol=1e-6)
