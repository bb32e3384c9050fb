"""Hypothesis properties of the core: per-example independence, batch invariance, update and encoding laws."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from learned_inference import DecoderModel, IterativeInferenceOptimizer, gated_update
from learned_inference.encodings import log_sign_encode
from tests.conftest import mlp_decoder

D, X = 3, 8


def _optimizer(*, network="highway", update="gated", family="diagonal_gaussian", num_samples=1):
    torch.manual_seed(0)
    model = DecoderModel(mlp_decoder(D, X), likelihood="bernoulli", latent_dim=D)
    inference = IterativeInferenceOptimizer(
        model, latent_dim=D, num_steps=3, hidden_size=16, network=network, update=update, family=family,
        num_samples=num_samples,
    ).double()
    return inference


INFERENCE = {
    "highway-gated": _optimizer(),
    "highway-residual": _optimizer(update="residual"),
    "gru": _optimizer(network="gru"),
    "lstm-2samples": _optimizer(network="lstm", num_samples=2),
    "delta": _optimizer(family="delta"),
}

configs = st.sampled_from(sorted(INFERENCE))


def _data(seed: int, batch: int, steps: int, samples: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.bernoulli(torch.full((batch, X), 0.4, dtype=torch.float64), generator=gen)
    noise = torch.randn(steps + 1, samples, batch, D, generator=gen, dtype=torch.float64)
    return x, noise


def _assert_rows_equal(a, b, rows_a, rows_b):
    torch.testing.assert_close(a[..., rows_a, :] if a.dim() > 2 else a[:, rows_a], b[..., rows_b, :]
                               if b.dim() > 2 else b[:, rows_b], rtol=1e-9, atol=1e-9)


@given(config=configs, seed=st.integers(0, 10_000), batch=st.integers(2, 6), j=st.integers(0, 5),
       steps=st.integers(0, 4))
def test_changing_example_j_never_changes_example_i(config, seed, batch, j, steps):
    inference = INFERENCE[config]
    j = j % batch
    x, noise = _data(seed, batch, steps, inference.num_samples)
    x2 = x.clone()
    x2[j] = 1 - x2[j]
    init = {k: torch.randn(batch, D, dtype=torch.float64) for k in inference.family.param_names}
    init2 = {k: v.clone() for k, v in init.items()}
    for v in init2.values():
        v[j] += 1.0
    a = inference.infer(x, num_steps=steps, noise=noise, init_params=init)
    b = inference.infer(x2, num_steps=steps, noise=noise, init_params=init2)
    others = [i for i in range(batch) if i != j]
    _assert_rows_equal(a.elbo, b.elbo, others, others)
    _assert_rows_equal(a.grad_norm, b.grad_norm, others, others)
    for name in a.params:
        torch.testing.assert_close(a.params[name][others], b.params[name][others], rtol=1e-9, atol=1e-9)


@given(config=configs, seed=st.integers(0, 10_000), batch=st.integers(1, 6), steps=st.integers(0, 4),
       data=st.data())
def test_results_do_not_depend_on_batch_size_or_composition(config, seed, batch, steps, data):
    inference = INFERENCE[config]
    x, noise = _data(seed, batch, steps, inference.num_samples)
    full = inference.infer(x, num_steps=steps, noise=noise)
    rows = data.draw(st.lists(st.integers(0, batch - 1), min_size=1, max_size=batch, unique=True))
    part = inference.infer(x[rows], num_steps=steps, noise=noise[:, :, rows])
    _assert_rows_equal(full.elbo, part.elbo, rows, list(range(len(rows))))
    for name in full.params:
        torch.testing.assert_close(full.params[name][rows], part.params[name], rtol=1e-9, atol=1e-9)


@given(seed=st.integers(0, 10_000), shape=st.tuples(st.integers(1, 5), st.integers(1, 5)))
def test_gated_update_with_gate_one_is_identity_and_gate_zero_takes_target(seed, shape):
    gen = torch.Generator().manual_seed(seed)
    param, target = torch.randn(*shape, generator=gen), torch.randn(*shape, generator=gen)
    assert torch.equal(gated_update(param, target, torch.ones(shape)), param)
    assert torch.equal(gated_update(param, target, torch.zeros(shape)), target)


@given(magnitude=st.one_of(st.just(0.0), st.floats(1e-45, 1e30)), negative=st.booleans(),
       alpha=st.floats(0.01, 10.0), eps=st.floats(1e-12, 1e-2),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_log_sign_encoding_is_finite_for_any_magnitude(magnitude, negative, alpha, eps, dtype):
    g = torch.tensor([[-magnitude if negative else magnitude]], dtype=dtype)
    encoded = log_sign_encode(g, alpha=alpha, eps=eps)
    assert encoded.shape == (1, 2)
    assert torch.isfinite(encoded).all()
    assert encoded[0, 1] == torch.sign(g)[0, 0]
