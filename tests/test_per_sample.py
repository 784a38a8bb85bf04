"""The per-sample Gramian engine (``batch_dim=0``) against jacrev and an independent UPGrad."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from jdoptim import JacobianOptimizer
from jdoptim.aggregation import UPGrad
from jdoptim.aggregation import _bases as aggregation_bases
from jdoptim.engine import JacobianEngine
from jdoptim.engine import _assembly as assembly
from jdoptim.linalg._finite import all_finite
from tests._references import upgrad_reference


def _mse(out, y):
    return (out - y).pow(2).flatten(1).mean(dim=1)


class _Scale(nn.Module):
    """A custom parametrised layer: no closed form, so the exact VJP fallback is used."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, n))

    def forward(self, x):
        return x * self.scale


class _Sequence(nn.Module):
    """Embedding (with padding) + LayerNorm + GroupNorm + Linear over a sequence [B, T, d]."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(9, 4, padding_idx=0)
        self.layer_norm = nn.LayerNorm(4)
        self.group_norm = nn.GroupNorm(2, 4)
        self.linear = nn.Linear(4, 2)

    def forward(self, tokens):
        h = self.layer_norm(self.embedding(tokens))
        h = self.group_norm(h.transpose(1, 2)).transpose(1, 2)
        return self.linear(h).mean(dim=1)


class _Tied(nn.Module):
    """A module called twice, and its weight used outside it: only part of it has a closed form."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = torch.tanh(self.a(torch.tanh(self.a(x))))
        return self.b(h) + (h @ self.a.weight).sum(dim=1, keepdim=True)


class _Transformer(nn.Module):
    """Embedding + one encoder layer (self-attention, LayerNorm, feed-forward) + a head."""

    def __init__(self, masked: bool = False) -> None:
        super().__init__()
        self.embedding = nn.Embedding(9, 8)
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 2)
        self.masked = masked

    def forward(self, tokens):
        mask = (tokens == 0) if self.masked else None  # padding, replayed by the closed form
        return self.head(self.layer(self.embedding(tokens), src_key_padding_mask=mask).mean(1))


class _Attention(nn.Module):
    """Self-attention with masks of every kind ``nn.MultiheadAttention`` accepts, over [B, 5, 4].

    ``causal``: a float causal mask through an encoder layer (``is_causal=True``); ``boolean``: a
    boolean 2-D mask and a boolean padding mask, passed positionally; ``per_head``: a float
    ``[B·h, T, T]`` mask, different for every sample and head, with an additive padding mask;
    ``cross``: keys and values are not the query (no closed form: batched VJPs).
    """

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        if kind == "causal":
            self.layer = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True)
        else:
            self.attention = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 2)
        generator = torch.Generator().manual_seed(3)
        self.register_buffer("noise", torch.randn(6 * 2, 5, 5, generator=generator))

    def forward(self, x):
        b, t = x.shape[:2]
        if self.kind == "causal":
            mask = nn.Transformer.generate_square_subsequent_mask(t, dtype=x.dtype)
            h = self.layer(x, src_mask=mask, is_causal=True)
        elif self.kind == "boolean":
            mask = torch.ones(t, t, dtype=torch.bool).triu(2)  # each position sees 1 ahead
            padding = torch.zeros(b, t, dtype=torch.bool)
            padding[0, -2:] = True  # the first sample's last two positions
            h = self.attention(x, x, x, padding, True, mask)[0]
        elif self.kind == "per_head":
            padding = torch.zeros(b, t, dtype=x.dtype)
            padding[0, -2:], padding[1, 0] = -torch.inf, -0.5
            h = self.attention(x, x, x, key_padding_mask=padding, attn_mask=self.noise.to(x.dtype))[
                0
            ]
        else:
            h = self.attention(x, x.flip(1), x.flip(1), need_weights=False)[0]
        return self.head(h.mean(1))


class _GRUModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru, self.head = nn.GRU(3, 4, batch_first=True), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.gru(x)[0][:, -1])


CASES = {
    "mlp": (lambda: nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 2)), (6, 5)),
    "cnn": (
        lambda: nn.Sequential(
            nn.Conv2d(1, 3, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(27, 2)
        ),
        (6, 1, 6, 6),
    ),
    "conv1d": (
        lambda: nn.Sequential(
            nn.Conv1d(2, 3, 3, dilation=2), nn.Tanh(), nn.Flatten(), nn.Linear(18, 2)
        ),
        (6, 2, 10),
    ),
    "sequence": (_Sequence, None),
    # Wide layers over a short sequence: the Gramian comes from the kernel form with T = 3.
    "wide_sequence": (
        lambda: nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Flatten(), nn.Linear(96, 2)),
        (6, 3, 32),
    ),
    "custom_layer": (lambda: nn.Sequential(nn.Linear(5, 3), _Scale(3), nn.Linear(3, 2)), (6, 5)),
    "tied": (_Tied, (6, 4)),
    "gru": (_GRUModel, (6, 5, 3)),
    "transformer": (_Transformer, None),
    "attention_masked": (lambda: _Transformer(masked=True), None),
    "attention_causal": (lambda: _Attention("causal"), (6, 5, 4)),
    "attention_boolean": (lambda: _Attention("boolean"), (6, 5, 4)),
    "attention_per_head": (lambda: _Attention("per_head"), (6, 5, 4)),
    "attention_cross": (lambda: _Attention("cross"), (6, 5, 4)),
}


def _data(shape):
    if shape is None:
        tokens = torch.randint(0, 9, (6, 5))
        tokens[0, :2] = 0  # padding positions
        return tokens
    return torch.randn(shape, dtype=torch.float64)


def _reference_update(model, x, y):
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    jac = jacrev(lambda p: _mse(functional_call(model, p, (x,)), y))(params)
    return upgrad_reference(torch.cat([jac[k].flatten(1) for k in params], dim=1))


@pytest.mark.parametrize("name", sorted(CASES))
def test_per_sample_step_matches_jacrev_and_independent_upgrad(name):
    torch.manual_seed(0)
    make, shape = CASES[name]
    model = make().double()
    x, y = _data(shape), torch.randn(6, 2, dtype=torch.float64)
    expected = _reference_update(model, x, y)
    opt = JacobianOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), UPGrad(), batch_dim=0)
    opt.zero_grad()
    opt.backward(_mse(model(x), y))
    got = torch.cat([p.grad.flatten() for p in model.parameters()])
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-10)


def _count_fallbacks(monkeypatch):
    calls = []
    original = JacobianEngine.jacobians

    def spy(self, outputs, inputs, **kwargs):
        calls.append(len(inputs))
        return original(self, outputs, inputs, **kwargs)

    monkeypatch.setattr(JacobianEngine, "jacobians", spy)
    return calls


@pytest.mark.parametrize(
    ("name", "n_fallback"),
    [
        ("mlp", 0),
        ("cnn", 0),
        ("sequence", 0),
        ("custom_layer", 1),
        ("tied", 1),
        ("transformer", 0),
        ("attention_masked", 0),
        ("attention_causal", 0),
        ("attention_boolean", 0),
        ("attention_per_head", 0),
        ("attention_cross", 4),  # cross-attention has no closed form: its 4 parameters
    ],
)
def test_closed_forms_are_used_and_only_the_rest_falls_back(monkeypatch, name, n_fallback):
    calls = _count_fallbacks(monkeypatch)
    make, shape = CASES[name]
    model = make().double()
    opt = JacobianOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), UPGrad(), batch_dim=0)
    opt.backward(_mse(model(_data(shape)), torch.zeros(6, 2, dtype=torch.float64)))
    assert calls == ([n_fallback] if n_fallback else [])


def test_step_with_closure_equals_two_phase_and_a_float32_model_is_close():
    torch.manual_seed(0)
    make, shape = CASES["mlp"]
    model_a = make()
    model_b = copy.deepcopy(model_a)
    x, y = torch.randn(shape), torch.randn(6, 2)
    opt_a = JacobianOptimizer(torch.optim.SGD(model_a.parameters(), lr=0.1), UPGrad(), batch_dim=0)
    opt_b = JacobianOptimizer(torch.optim.SGD(model_b.parameters(), lr=0.1), UPGrad(), batch_dim=0)
    expected = _reference_update(copy.deepcopy(model_a).double(), x.double(), y.double())

    def closure():
        opt_a.zero_grad()
        return _mse(model_a(x), y)

    opt_a.step(closure)
    opt_b.zero_grad()
    out = model_b(x)  # the forward runs before backward() is called
    opt_b.backward(_mse(out, y))
    torch.testing.assert_close(
        torch.cat([p.grad.flatten() for p in model_b.parameters()]).double(),
        expected,
        rtol=1e-4,
        atol=1e-6,
    )
    opt_b.step()
    for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb)


def test_shared_params_with_batch_dim():
    torch.manual_seed(0)
    trunk, head = nn.Linear(4, 5).double(), nn.Linear(5, 2).double()
    model = nn.Sequential(trunk, nn.Tanh(), head)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    opt = JacobianOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        UPGrad(),
        shared_params=trunk.parameters(),
        batch_dim=0,
    )
    opt.backward(_mse(model(x), y))
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    jac = jacrev(lambda p: _mse(functional_call(model, p, (x,)), y))(params)
    expected_trunk = upgrad_reference(torch.cat([jac["0.weight"].flatten(1), jac["0.bias"]], dim=1))
    torch.testing.assert_close(
        torch.cat([trunk.weight.grad.flatten(), trunk.bias.grad]), expected_trunk
    )
    torch.testing.assert_close(head.weight.grad, jac["2.weight"].sum(0))
    torch.testing.assert_close(head.bias.grad, jac["2.bias"].sum(0))


def test_a_jacobian_aggregator_uses_the_jacobian_path():
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    opt = JacobianOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), lambda j: j[0], batch_dim=0
    )
    opt.backward(_mse(model(x), torch.zeros(5, 2, dtype=torch.float64)))
    params = {k: v.detach() for k, v in model.named_parameters()}
    jac = jacrev(lambda p: _mse(functional_call(model, p, (x,)), 0.0))(params)
    torch.testing.assert_close(model.weight.grad, jac["weight"][0])


@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_in_training_mode_is_rejected_and_nothing_changes(affine):
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, affine=affine), nn.Linear(4, 1))
    opt = JacobianOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), UPGrad(), batch_dim=0)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(
        RuntimeError,
        match=r"BatchNorm(1d)? in training mode normalises with statistics of the whole",
    ):
        opt.step(lambda: model(torch.randn(5, 3)).flatten())
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    model.eval()  # running statistics: per-sample again, exact through the fallback
    opt.step(lambda: model(torch.randn(5, 3)).flatten())


def test_new_param_group_joins_the_per_sample_step():
    a, b = nn.Linear(3, 3), nn.Linear(3, 1)
    opt = JacobianOptimizer(torch.optim.SGD(a.parameters(), lr=0.1), UPGrad(), batch_dim=0)
    opt.add_param_group({"params": b.parameters()})
    opt.step(lambda: b(a(torch.randn(4, 3))).flatten())
    assert b.weight.grad is not None


def test_grad_scaler_with_batch_dim_is_exact_and_overflow_skips():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    reference = copy.deepcopy(model)
    x, y = torch.randn(6, 4), torch.randn(6, 2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt = JacobianOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), UPGrad(), grad_scaler=scaler, batch_dim=0
    )
    opt.zero_grad()
    opt.backward(scaler.scale(_mse(model(x), y)))
    scaler.step(opt)
    scaler.update()
    ref_opt = JacobianOptimizer(torch.optim.SGD(reference.parameters(), lr=0.1), UPGrad())
    ref_opt.step(lambda: _mse(reference(x), y))
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    before = [p.detach().clone() for p in model.parameters()]
    scale = scaler.get_scale()
    opt.zero_grad()
    opt.backward(scaler.scale(_mse(model(x), y)) * float("inf"))
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < scale
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("bad", [1, -1, True, "0"])
def test_bad_batch_dim(bad):
    with pytest.raises(ValueError, match="batch_dim must be 0"):
        JacobianOptimizer(torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1), batch_dim=bad)


@pytest.mark.parametrize("scale", [1.0, 1e-30], ids=["unit", "tiny (scaled rows)"])
@pytest.mark.parametrize(
    ("t", "d", "o"), [(1, 32, 32), (3, 32, 32), (3, 5, 4)], ids=["kernel", "kernel-seq", "rows"]
)
def test_linear_rule_weight_and_bias_against_float64_per_sample_gradients(t, d, o, scale):
    """The bias's Gramian reuses the weight kernel's ``Gₒ Gₒᵀ``: both blocks and both weighted
    updates equal those of the per-sample gradients formed in float64."""
    from jdoptim.engine._layer_rules import rule_for

    torch.manual_seed(0)
    layer = nn.Linear(d, o)
    x, g = torch.randn(6, t, d), torch.randn(6, t, o) * scale
    rules = rule_for(layer)(layer, [(x, g)])
    per_weight = torch.einsum("bto,btd->bod", g.double(), x.double()).reshape(6, -1)
    per_bias = g.double().sum(dim=1)
    w = torch.rand(6, dtype=torch.float64)
    for name, rows in (("weight", per_weight), ("bias", per_bias)):
        for got, want in (
            (rules[name].gramian(), rows @ rows.T),
            (rules[name].update(w).double().reshape(-1), w @ rows),
        ):  # float32 products: relative to the norm, not entrywise (cancellation)
            error = torch.linalg.vector_norm(got.double() - want)
            assert error <= 1e-6 * torch.linalg.vector_norm(want), (name, float(error))


@pytest.mark.parametrize("dominant", [False, True], ids=["grouped", "one index fills most"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_embedding_gramian_equals_explicit_per_sample_gradients(dominant, dtype):
    """The embedding rule's Gramian (indices grouped, or the kernel form when one index fills
    most positions) against the Gramian of explicitly scattered per-sample gradients."""
    from jdoptim.engine._tokens import token_gramian

    g = torch.Generator().manual_seed(3)
    b, t, vocab, d = 6, 5, 7, 3
    idx = torch.randint(0, vocab, (b, t), generator=g)
    if dominant:
        idx[:, 1:] = 2
    grads = torch.randn(b, t, d, generator=g, dtype=torch.float64)
    per_sample = torch.zeros(b, vocab, d, dtype=torch.float64)
    for i in range(b):
        per_sample[i].index_add_(0, idx[i], grads[i])
    flat = per_sample.reshape(b, -1)
    expected = flat @ flat.T
    got = token_gramian(idx.reshape(-1), grads.reshape(-1, d).to(dtype), b, t)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got.double(), expected, rtol=tol, atol=tol * expected.abs().max())


def test_the_gramian_is_read_for_nan_and_inf_once_per_step(monkeypatch):
    """The engine checks the Gramian; UPGrad and its weighting, which check any other matrix,
    do not read this one again (at B = 1024 each read cost about 4 % of the step)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    opt = JacobianOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), UPGrad(), batch_dim=0)
    x, y = torch.randn(7, 4), torch.randn(7, 2)
    reads = []

    def counted(tensors):
        reads.extend(tuple(t.shape) for t in tensors)
        return all_finite(tensors)

    for module in (aggregation_bases, assembly):  # every check a Gramian goes through
        monkeypatch.setattr(module, "all_finite", counted)
    opt.backward(_mse(model(x), y))
    assert reads.count((7, 7)) == 1
    with pytest.raises(ValueError, match="NaN or inf"):  # a matrix of its own is still checked
        UPGrad().weights_from_gramian(torch.full((7, 7), float("nan")))
