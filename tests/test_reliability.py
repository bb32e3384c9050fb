"""Bad input gets clear errors, numerics stay finite, checkpoints round-trip (issue: reliability)."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from learned_inference import DecoderModel, IterativeInferenceOptimizer
from learned_inference.checkpoint import load_checkpoint, save_checkpoint
from tests.conftest import mlp_decoder

D, X = 3, 8


def _inference(dtype=torch.float64, **options):
    torch.manual_seed(0)
    model = DecoderModel(mlp_decoder(D, X, dtype=dtype), likelihood="bernoulli", latent_dim=D)
    inference = IterativeInferenceOptimizer(model, latent_dim=D, num_steps=3, hidden_size=16, **options).to(dtype)
    return model, inference


def _x(batch=6, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full((batch, X), 0.4, dtype=dtype), generator=gen)


# ---- bad input -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda inf: inf.infer(_x().clone().fill_(float("nan"))), ValueError, "x contains NaN"),
        (lambda inf: inf.infer(torch.ones(6, X) * torch.tensor([float("inf")] + [0.0] * (X - 1))), ValueError,
         "x contains NaN or infinite"),
        (lambda inf: inf.infer(_x(dtype=torch.float32)), ValueError, r"dtype torch\.float32"),
        (lambda inf: inf.infer(_x()[0]), ValueError, r"shape \[B, \*event\]"),
        (lambda inf: inf.infer(_x()[:0]), ValueError, "B >= 1"),
        (lambda inf: inf.infer(_x(), num_steps=-1), ValueError, "num_steps"),
        (lambda inf: inf.infer(_x(), noise=torch.zeros(2, 2, 6, D)), ValueError,
         r"noise must have shape \[4, 2, 6, 3\]"),
        (lambda inf: inf.infer(_x(), init_params={"loc": torch.zeros(6, D)}), ValueError, "init_params"),
        (lambda inf: inf.infer([[0.0] * X]), TypeError, "x must be a torch.Tensor"),
        (lambda inf: inf.infer(_x().long()), TypeError, "floating-point"),
    ],
    ids=["nan-x", "inf-x", "dtype-mismatch", "no-batch-dim", "empty-batch", "negative-steps", "noise-shape",
         "init-params-keys", "not-a-tensor", "integer-x"],
)
def test_bad_calls_name_the_argument(call, error, match):
    _, inference = _inference()
    with pytest.raises(error, match=match):
        call(inference)


def test_model_dtype_mismatch_is_named():
    model = DecoderModel(mlp_decoder(D, X, dtype=torch.float32), likelihood="bernoulli", latent_dim=D)
    inference = IterativeInferenceOptimizer(model, latent_dim=D, hidden_size=8).double()
    with pytest.raises(ValueError, match=r"the model's parameters are torch\.float32"):
        inference.infer(_x())


def test_latent_dim_not_matching_the_model_is_explained():
    model = DecoderModel(mlp_decoder(D, X), likelihood="bernoulli", latent_dim=D)
    inference = IterativeInferenceOptimizer(model, latent_dim=D + 2, hidden_size=8).double()
    with pytest.raises(ValueError, match="declares latent_dim=3 but the inference method was given latent_dim=5"):
        inference.infer(_x())


def test_dict_latent_dim_for_a_single_latent_model_is_explained():
    model = DecoderModel(mlp_decoder(D, X), likelihood="bernoulli", latent_dim=D)
    inference = IterativeInferenceOptimizer(model, latent_dim={"a": 1, "b": 2}, hidden_size=8).double()
    with pytest.raises(ValueError, match="latent_dim"):
        inference.infer(_x())


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"latent_dim": {}}, ValueError, "at least one latent"),
        ({"latent_dim": {"a": 0}}, ValueError, r"latent_dim\['a'\]"),
        ({"latent_dim": 2.5}, ValueError, "latent_dim"),
        ({"latent_dim": D, "num_samples": 0}, ValueError, "num_samples"),
        ({"latent_dim": D, "hidden_size": 0}, ValueError, "hidden_size"),
        ({"latent_dim": D, "encoding": 5}, TypeError, "encoding"),
        ({"latent_dim": D, "encoding": ()}, ValueError, "encoding"),
        ({"latent_dim": D, "encoding": ("errors",)}, ValueError, "likelihood_mean"),
        ({"latent_dim": D, "on_nonfinite": "ignore"}, ValueError, "on_nonfinite"),
        ({"latent_dim": D, "init": "zeros"}, ValueError, "init"),
    ],
)
def test_bad_construction_options(options, error, match):
    class OnlyLogJoint(nn.Module):
        def log_joint(self, x, z):
            return -z.square().sum(-1)

    with pytest.raises(error, match=match):
        IterativeInferenceOptimizer(OnlyLogJoint(), **options)


# ---- numerical safety ------------------------------------------------------------------------------------------


class _Overflowing(DecoderModel):
    """Returns NaN log-likelihoods for examples whose first pixel is 1 (a decoder that overflows there)."""

    def log_likelihood(self, x, z):
        value = super().log_likelihood(x, z)
        return value * torch.where(x[..., 0] > 0.5, float("nan"), 1.0)  # row-local, as a real overflow is


def _overflowing(**options):
    torch.manual_seed(0)
    model = _Overflowing(mlp_decoder(D, X), likelihood="bernoulli", latent_dim=D)
    inference = IterativeInferenceOptimizer(model, latent_dim=D, num_steps=3, hidden_size=16, **options).double()
    x = _x(seed=3)
    x[:, 0] = torch.tensor([1.0, 0, 0, 1, 0, 0], dtype=torch.float64)
    return model, inference, x


def test_non_finite_examples_do_not_poison_the_batch_and_are_reported():
    model, inference, x = _overflowing()
    noise = torch.randn(4, 2, 6, D, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match=r"2 of 6 examples .* \(examples 0, 3\)"):
        result = inference(x, noise=noise)
    healthy = [1, 2, 4, 5]
    assert torch.isfinite(result.elbo[:, healthy]).all() and not torch.isfinite(result.elbo[:, [0, 3]]).any()
    assert all(torch.isfinite(v).all() for v in result.params.values())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        alone = inference.infer(x[healthy], noise=noise[:, :, healthy])
    torch.testing.assert_close(result.elbo[:, healthy], alone.elbo)
    assert torch.isfinite(result.loss)
    result.loss.backward()
    for p in [*inference.parameters(), *model.parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all()


def test_non_finite_examples_are_refit_with_the_final_steps_own_noise():
    """Leaving unhealthy rows out of the model's loss reuses the final step's sample: T + 1 draws, no more."""
    _, inference, x = _overflowing()
    with pytest.warns(RuntimeWarning):
        inference.infer(x, num_steps=0)  # sizes the lazy layer, whose initialisation also draws random numbers
    torch.manual_seed(7)
    with pytest.warns(RuntimeWarning):
        inference(x).loss.backward()
    after_forward = torch.randn(1)
    torch.manual_seed(7)
    for _ in range(inference.num_steps + 1):
        torch.randn(1, len(x), D, dtype=torch.float64)
    assert torch.equal(after_forward, torch.randn(1))


def test_non_finite_examples_raise_by_policy():
    _, inference, x = _overflowing(on_nonfinite="raise")
    with pytest.raises(FloatingPointError, match="examples 0, 3"):
        inference.infer(x)


def test_log_variance_stays_in_its_safe_range_for_extreme_networks():
    _, inference = _inference()
    inference.infer(_x(), num_steps=0)
    with torch.no_grad():
        for p in inference.update.parameters():
            p.mul_(1e4)
    params = inference.infer(_x(), num_steps=5).params
    low, high = inference.family.log_var_bounds
    assert params["log_var"].min() >= low and params["log_var"].max() <= high


def test_float32_and_float64_agree():
    _, inference64 = _inference(torch.float64)
    x64 = _x()
    noise = torch.randn(6, 2, 6, D, dtype=torch.float64)
    result64 = inference64.infer(x64, num_steps=5, noise=noise)
    model32 = DecoderModel(mlp_decoder(D, X, dtype=torch.float32), likelihood="bernoulli", latent_dim=D)
    model32.load_state_dict(inference64.model.state_dict())
    inference32 = IterativeInferenceOptimizer(model32, latent_dim=D, num_steps=3, hidden_size=16)
    inference32.infer(x64.float(), num_steps=0)
    inference32.load_state_dict(inference64.state_dict())
    result32 = inference32.infer(x64.float(), num_steps=5, noise=noise.float())
    torch.testing.assert_close(result32.elbo.double(), result64.elbo, rtol=1e-4, atol=1e-4)


def test_autocast_keeps_the_gradient_path_in_full_precision():
    _, inference = _inference(torch.float32)
    x = _x(dtype=torch.float32)
    noise = torch.randn(4, 2, 6, D)
    reference = inference.infer(x, noise=noise)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = inference(x, noise=noise)
    assert result.elbo.dtype == torch.float32 and result.params["loc"].dtype == torch.float32
    torch.testing.assert_close(result.elbo[0], reference.elbo[0])  # step 0 involves no network: exact
    torch.testing.assert_close(result.elbo, reference.elbo, rtol=0.05, atol=0.5)
    result.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in inference.parameters())


# ---- fuzzing the public API ------------------------------------------------------------------------------------

ENCODINGS = ["gradient", "standardized_gradient", "data", "params", "errors"]


@given(
    batch=st.integers(1, 5), data_dim=st.integers(1, 6), latent_dim=st.integers(1, 4), steps=st.integers(0, 4),
    encoding=st.lists(st.sampled_from(ENCODINGS), min_size=1, max_size=3, unique=True),
    update=st.sampled_from(["gated", "residual"]), network=st.sampled_from(["highway", "gru", "lstm"]),
    family=st.sampled_from(["diagonal_gaussian", "delta"]), samples=st.integers(1, 3),
    likelihood=st.sampled_from(["bernoulli", "gaussian", "multinomial"]), train=st.booleans(),
)
def test_public_api_ends_in_a_finite_result(batch, data_dim, latent_dim, steps, encoding, update, network, family,
                                            samples, likelihood, train):
    decoder = nn.Sequential(nn.Linear(latent_dim, 8), nn.ELU(), nn.Linear(8, data_dim))
    model = DecoderModel(decoder, likelihood=likelihood, latent_dim=latent_dim)
    inference = IterativeInferenceOptimizer(
        model, latent_dim=latent_dim, num_steps=steps, encoding=encoding, update=update, network=network,
        family=family, num_samples=samples, hidden_size=8,
    )
    if likelihood == "multinomial":
        x = torch.poisson(torch.full((batch, data_dim), 2.0))
    else:
        x = torch.rand(batch, data_dim)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no non-finite example may appear for healthy inputs
        result = inference(x) if train else inference.infer(x, num_steps=steps)
    assert result.elbo.shape == (steps + 1, batch)
    assert torch.isfinite(result.elbo).all() and torch.isfinite(result.loss)
    assert all(v.shape == (batch, latent_dim) and torch.isfinite(v).all() for v in result.params.values())
    if train:
        result.loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in inference.parameters() if p.grad is not None)


# ---- checkpoints ---------------------------------------------------------------------------------------------


def test_whole_module_round_trips_through_torch_save(tmp_path):
    _, inference = _inference()
    x, noise = _x(), torch.randn(4, 2, 6, D, dtype=torch.float64)
    before = inference.infer(x, noise=noise)
    torch.save(inference, tmp_path / "inference.pt")
    restored = torch.load(tmp_path / "inference.pt", weights_only=False)
    torch.testing.assert_close(restored.infer(x, noise=noise).elbo, before.elbo)


def _train(model, inference, optim, steps, *, start=0):
    losses = []
    for step in range(start, steps):
        optim.zero_grad()
        result = inference(_x(seed=step))
        result.loss.backward()
        optim.step()
        losses.append(result.loss.item())
    return losses


def test_resumed_training_reproduces_the_uninterrupted_run(tmp_path):
    def fresh():
        model, inference = _inference()
        inference.infer(_x(), num_steps=0)
        optim = torch.optim.Adam([*model.parameters(), *inference.parameters()], lr=1e-2)
        return model, inference, optim

    torch.manual_seed(42)
    model, inference, optim = fresh()
    torch.manual_seed(42)
    uninterrupted = _train(model, inference, optim, 8)

    model, inference, optim = fresh()
    torch.manual_seed(42)
    first = _train(model, inference, optim, 4)
    save_checkpoint(tmp_path / "run.pt", step=4, model=model, inference=inference, optim=optim)
    _train(model, inference, optim, 6, start=4)  # progress after the checkpoint that is thrown away
    model, inference, optim = fresh()
    step = load_checkpoint(tmp_path / "run.pt", restore_rng=True, model=model, inference=inference, optim=optim)["step"]
    resumed = first + _train(model, inference, optim, 8, start=step)
    assert resumed == uninterrupted


def test_checkpoint_refuses_non_finite_parameters_and_keeps_the_previous_file(tmp_path):
    model, _ = _inference()
    path = tmp_path / "run.pt"
    save_checkpoint(path, step=1, model=model)
    good = path.read_bytes()
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        save_checkpoint(path, step=2, model=model)
    assert path.read_bytes() == good
    assert list(tmp_path.iterdir()) == [path]


def test_loading_names_what_is_missing(tmp_path):
    model, inference = _inference()
    save_checkpoint(tmp_path / "run.pt", step=0, model=model)
    with pytest.raises(KeyError, match="inference"):
        load_checkpoint(tmp_path / "run.pt", inference=inference)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt", model=model)
