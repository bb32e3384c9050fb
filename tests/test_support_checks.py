"""Nothing silent (issue 16): data outside the likelihood's support, models that couple examples or cut the
gradient, malformed ``init_params``/``noise``/encoder outputs and misplaced options all end in an error that names
the argument and the cause (or a documented warning), never in a plausible-looking number."""

from __future__ import annotations

import math
import types
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from learned_inference import (
    DecoderModel,
    GradientEStep,
    IterativeInferenceOptimizer,
    SemiAmortized,
    StandardEncoder,
    VAEModel,
    fit,
    make_likelihood,
)
from learned_inference.evaluation import elbo_estimate, importance_weighted_log_marginal
from learned_inference.likelihoods import MultinomialLikelihood, log_var_from_squared_error
from learned_inference.zoo import LinearGaussianHierarchy, TwoLevelVAE
from tests.conftest import mlp_decoder

D, X, B = 3, 8, 6


def _x(batch=B, seed=0):
    return torch.bernoulli(torch.full((batch, X), 0.4, dtype=torch.float64),
                           generator=torch.Generator().manual_seed(seed))


def _model(likelihood="bernoulli", **options):
    return DecoderModel(mlp_decoder(D, X), likelihood=likelihood, latent_dim=D, **options)


def _e_step(model, **options):
    return GradientEStep(model, latent_dim=D, num_steps=2, **options)


def _quiet(call):
    """Runs ``call`` with every warning an error: the healthy path must not warn."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return call()


# ---- the data's support ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("likelihood", ["bernoulli", "bernoulli-probs"])
@given(rows=st.lists(st.integers(0, B - 1), min_size=1, max_size=B, unique=True),
       value=st.one_of(st.floats(1.0001, 1e6), st.floats(-1e6, -1e-4)), column=st.integers(0, X - 1))
def test_bernoulli_data_outside_the_unit_interval_is_named(likelihood, rows, value, column):
    x = _x()
    x[rows, column] = value
    with pytest.raises(ValueError, match=r"outside the support of Bernoulli(Probs)?Likelihood") as error:
        _e_step(_model(likelihood)).infer(x)
    message = str(error.value)
    assert f"{len(rows)} example(s) (first: {sorted(rows)[:5]})" in message
    assert "[0, 1]" in message and "likelihood='gaussian'" in message


@given(values=st.lists(st.floats(0.0, 1.0), min_size=X, max_size=X))
def test_values_inside_the_unit_interval_are_accepted(values):
    """Grey levels are in the support (as with binary cross-entropy): no error, no warning, a finite ELBO."""
    x = torch.tensor([values], dtype=torch.float64)
    assert torch.isfinite(_quiet(lambda: _e_step(_model()).infer(x)).elbo).all()


def test_negative_counts_are_named_and_fractional_counts_warn_once_when_normalized():
    model = _model(MultinomialLikelihood(normalized=True))
    counts = torch.poisson(torch.full((B, X), 2.0, dtype=torch.float64), generator=torch.Generator().manual_seed(0))
    _quiet(lambda: _e_step(model).infer(counts))
    negative = counts.clone()
    negative[[1, 4], 2] = -1.0
    with pytest.raises(ValueError, match=r"MultinomialLikelihood: counts must be >= 0, but 2 example\(s\) "
                                         r"\(first: \[1, 4\]\).*x\[1, 2\] = -1"):
        _e_step(model).infer(negative)
    fractional = counts.clone()
    fractional[3, 0] = 0.5
    method = _e_step(model)
    with pytest.warns(RuntimeWarning, match=r"non-integer counts in 1 example\(s\) \(first: \[3\]\).*once"):
        method.infer(fractional)
    _quiet(lambda: method.infer(fractional))  # once per likelihood
    _quiet(lambda: _e_step(_model("multinomial")).infer(fractional))  # a weighted cross-entropy by default


def test_the_support_is_checked_on_every_call_and_by_evaluation():
    model, x = _model(), _x()
    method = _e_step(model)
    method.infer(x)
    with pytest.raises(ValueError, match="outside the support"):
        method(2 * x)  # not just the first call
    posterior = method.infer(x).posterior
    for evaluate in (importance_weighted_log_marginal, elbo_estimate):
        with pytest.raises(ValueError, match="outside the support"):
            evaluate(model, posterior, 2 * x, num_samples=4)


def test_reference_models_check_their_support():
    model = TwoLevelVAE(data_dim=X, latent_dims=(2, 1), hidden_sizes=(8, 4)).double()
    with pytest.raises(ValueError, match="BernoulliLikelihood"):
        GradientEStep(model, latent_dim=model.latent_dim, num_steps=1).infer(3 * _x())


# ---- the model contract: output, gradient, coupling --------------------------------------------------------------

class _LogJoint(nn.Module):
    """A quadratic log-joint with a hook to break the contract in one way or another."""

    def __init__(self, change=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(X, dtype=torch.float64))
        self.change = change or (lambda value, x, z: value)

    def log_joint(self, x, z):
        value = -0.5 * z.square().sum(-1) - 0.5 * (x * self.weight - z.sum(-1, keepdim=True)).square().sum(-1)
        return self.change(value, x, z)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda v, x, z: v.round().long(), TypeError, r"returned dtype torch.int64.*floating-point"),
        (lambda v, x, z: v.detach(), ValueError, r"log_joint\(x, z\) does not depend differentiably on z"),
        (lambda v, x, z: torch.tensor(v.tolist(), dtype=v.dtype), ValueError, "does not depend differentiably"),
        (lambda v, x, z: types.SimpleNamespace(value=v), TypeError, "must return a Tensor"),
        (lambda v, x, z: v - v.mean(-1, keepdim=True), ValueError, "couples the examples"),
        (lambda v, x, z: v + x.mean(), ValueError, "couples the examples"),
        (lambda v, x, z: v + 0.1 * torch.randn_like(v), ValueError, "random numbers drawn inside log_joint"),
        (lambda v, x, z: v + torch.arange(v.shape[-1], dtype=v.dtype), ValueError, "its position in the batch"),
        (lambda v, x, z: v.sum(-1), ValueError, "reduced over the batch"),
    ],
    ids=["integer", "detached", "via-python", "object", "batch-mean", "data-mean", "random", "position", "reduced"],
)
def test_broken_log_joints_are_named_on_the_first_call(change, error, match):
    with pytest.raises(error, match=match):
        _e_step(_LogJoint(change)).infer(_x())


def test_a_cut_log_likelihood_is_named_even_when_log_joint_is_fine():
    class CutLikelihood(_LogJoint):
        def log_likelihood(self, x, z):
            return super().log_joint(x, z).detach()

    with pytest.raises(ValueError, match=r"model.log_likelihood\(x, z\) does not depend differentiably"):
        _e_step(CutLikelihood()).infer(_x())


def test_in_place_updates_inside_log_joint_are_translated():
    class Counting(_LogJoint):
        def __init__(self):
            super().__init__()
            self.register_buffer("seen", torch.zeros((), dtype=torch.float64))

        def log_joint(self, x, z):
            self.seen.add_(z.detach().sum())  # a running statistic, updated in forward
            return super().log_joint(x, z) + 0 * self.seen

    with pytest.raises(ValueError, match=r"modifies a tensor in place.*model.eval\(\)"):
        _e_step(Counting()).infer(_x())


@pytest.mark.parametrize("running_stats", [True, False])
def test_batch_norm_in_training_mode_is_named_and_left_untouched(running_stats):
    decoder = nn.Sequential(nn.Linear(D, 16), nn.BatchNorm1d(16, track_running_stats=running_stats), nn.Tanh(),
                            nn.Linear(16, X)).double()
    model = DecoderModel(decoder, likelihood="bernoulli", latent_dim=D)
    before = {k: v.clone() for k, v in decoder.state_dict().items()}
    with pytest.raises(ValueError, match=r"model.decoder.1 \(BatchNorm1d\) (is in training mode at test time|has "
                                         r"track_running_stats=False).*depend on the others"):
        _e_step(model).infer(_x())
    assert all(torch.equal(before[k], v) for k, v in decoder.state_dict().items())  # no running statistic moved
    method = _e_step(model)
    model.eval()
    if not running_stats:  # batch statistics in every mode: eval() does not help, and the error says so
        with pytest.raises(ValueError, match=r"track_running_stats=False.*model.eval\(\) does not change that"):
            method.infer(_x())
        return
    _quiet(lambda: method.infer(_x()))
    model.train()  # after the first call: caught on the next one
    with pytest.raises(ValueError, match=r"model.decoder.1 \(BatchNorm1d\) is in training mode at test time"):
        method.infer(_x())
    assert all(torch.equal(before[k], v) for k, v in decoder.state_dict().items())


def test_batch_norm_outside_log_joint_is_allowed():
    """A batch norm in the encoder couples λ_0 only, as in any VAE: not an error."""
    encoder_net = nn.Sequential(nn.Linear(X, 16), nn.BatchNorm1d(16), nn.Linear(16, 2 * D)).double()
    model = DecoderModel(mlp_decoder(D, X), likelihood="bernoulli", latent_dim=D,
                         encoder=lambda x: encoder_net(x).chunk(2, -1))
    model.encoder_net = encoder_net  # registered, so the check sees it
    result = _quiet(lambda: StandardEncoder(model, latent_dim=D)(_x()))
    assert torch.isfinite(result.loss)


def test_dropout_in_training_mode_warns_and_the_checks_draw_no_random_numbers():
    decoder = nn.Sequential(nn.Linear(D, 16), nn.Dropout(0.5), nn.Tanh(), nn.Linear(16, X)).double()
    model = DecoderModel(decoder, likelihood="bernoulli", latent_dim=D)
    method = GradientEStep(model, latent_dim=D, num_steps=0)
    noise = torch.zeros(1, 1, B, D, dtype=torch.float64)
    state = torch.get_rng_state()
    with pytest.warns(RuntimeWarning, match=r"model.decoder.1 \(Dropout\) is in training mode.*model.eval\(\)"):
        method.infer(_x(), noise=noise)
    assert decoder[1].training
    model.eval()
    torch.set_rng_state(state)
    method = GradientEStep(model, latent_dim=D, num_steps=0)
    _quiet(lambda: method.infer(_x(), noise=noise))
    assert torch.equal(torch.get_rng_state(), state)  # the first-call checks use a private generator


@given(batch=st.integers(1, 12), samples=st.integers(1, 3), likelihood=st.sampled_from(["bernoulli", "gaussian"]),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_the_contract_checks_accept_valid_models(batch, samples, likelihood, dtype):
    decoder = nn.Sequential(nn.Linear(D, 32), nn.ELU(), nn.Linear(32, X)).to(dtype)
    model = DecoderModel(decoder, likelihood=likelihood, latent_dim=D)
    x = torch.rand(batch, X, dtype=dtype)
    result = _quiet(lambda: GradientEStep(model, latent_dim=D, num_steps=1, num_samples=samples).infer(x))
    assert result.elbo.shape == (2, batch)


def test_several_latent_variables_are_checked_too():
    model = LinearGaussianHierarchy.random(data_dim=X, latent_dims=(3, 2), dtype=torch.float64)
    x = model.sample(4)
    _quiet(lambda: GradientEStep(model, latent_dim=model.latent_dim, num_steps=1).infer(x))
    with pytest.raises(ValueError, match=r"declares latent_dim=\{'z1': 3, 'z2': 2\}"):
        GradientEStep(model, latent_dim={"z1": 3, "z2": 3}, num_steps=1).infer(x)


# ---- hints that point at the real cause ------------------------------------------------------------------------

def test_latent_dim_is_blamed_only_when_it_differs_from_the_models():
    x = _x()
    with pytest.raises(ValueError, match=r"declares latent_dim=3 but the inference method was given latent_dim=5"):
        GradientEStep(_model(), latent_dim=5).infer(x)
    layout = r"decoder returned shape \[6, 8\].*x has shape \[6, 2, 4\].*x.flatten"
    with pytest.raises(ValueError, match=layout) as error:
        GradientEStep(_model(), latent_dim=D).infer(x.reshape(B, 2, 4))
    assert "declares latent_dim" not in str(error.value)


def test_a_decoder_returning_an_object_is_named():
    decoder = mlp_decoder(D, X)
    model = DecoderModel(lambda z: types.SimpleNamespace(out=decoder(z)), likelihood="bernoulli", latent_dim=D)
    with pytest.raises(ValueError, match=r"decoder returned a SimpleNamespace with fields \['out'\].*decode=") as error:
        GradientEStep(model, latent_dim=D).infer(_x())
    assert "declares latent_dim" not in str(error.value)


def test_a_model_without_declared_latent_dim_gets_a_neutral_hint():
    class Fails(nn.Module):
        def log_joint(self, x, z):
            return (z @ torch.ones(4, dtype=z.dtype)) + x.sum(-1)

    with pytest.raises(ValueError, match=r"Check that log_joint accepts x as \[B, \*event\].*latent_dim=3"):
        GradientEStep(Fails(), latent_dim=D).infer(_x())


# ---- init_params, noise and encoder outputs ------------------------------------------------------------------------

_GOOD = {"loc": torch.zeros(B, D, dtype=torch.float64), "log_var": torch.zeros(B, D, dtype=torch.float64)}


@pytest.mark.parametrize(
    ("init_params", "error", "match"),
    [
        ({**_GOOD, "loc": torch.zeros(B, D + 1, dtype=torch.float64)}, ValueError,
         r"init_params\['loc'\] must have shape \[6, 3\] \(\[B, D\]\), got \[6, 4\]"),
        ({**_GOOD, "loc": torch.zeros(B - 1, D, dtype=torch.float64)}, ValueError, r"init_params\['loc'\].*\[5, 3\]"),
        ({**_GOOD, "log_var": torch.zeros(B, D)}, ValueError, r"init_params\['log_var'\] has dtype torch.float32"),
        ({**_GOOD, "loc": torch.full((B, D), math.nan, dtype=torch.float64)}, ValueError,
         r"init_params\['loc'\] contains NaN"),
        ({**_GOOD, "log_var": [[0.0] * D] * B}, TypeError, r"init_params\['log_var'\] must be a torch.Tensor"),
        ({"loc": _GOOD["loc"]}, ValueError, r"init_params must have entries \['loc', 'log_var'\]"),
        ("loc", ValueError, "init_params must have entries"),
    ],
    ids=["dim", "batch", "dtype", "nan", "list", "keys", "not-a-dict"],
)
def test_bad_init_params_name_the_entry(init_params, error, match):
    with pytest.raises(error, match=match):
        _e_step(_model()).infer(_x(), init_params=init_params)


def test_per_variable_init_params_are_named_by_variable():
    model = LinearGaussianHierarchy.random(data_dim=X, latent_dims=(3, 2), dtype=torch.float64)
    method = GradientEStep(model, latent_dim=model.latent_dim, num_steps=1)
    x = model.sample(4)
    params = method.infer(x).params
    method.infer(x, init_params=params)
    bad = {**params, "z2": {**params["z2"], "loc": params["z2"]["loc"][:, :1]}}
    with pytest.raises(ValueError, match=r"init_params\['z2'\]\['loc'\] must have shape \[4, 2\]"):
        method.infer(x, init_params=bad)
    with pytest.raises(ValueError, match=r"init_params\['z1'\] must have entries \['loc', 'log_var'\]"):
        method.infer(x, init_params={**params, "z1": {"loc": params["z1"]["loc"]}})


@given(rows=st.integers(1, 8), cols=st.integers(1, 5))
def test_init_params_of_any_other_shape_are_rejected(rows, cols):
    params = {"loc": torch.zeros(rows, cols, dtype=torch.float64), "log_var": torch.zeros(rows, cols,
                                                                                          dtype=torch.float64)}
    method = _e_step(_model())
    if (rows, cols) == (B, D):
        method.infer(_x(), init_params=params)
    else:
        with pytest.raises(ValueError, match=r"init_params\['loc'\] must have shape \[6, 3\]"):
            method.infer(_x(), init_params=params)


@pytest.mark.parametrize(
    ("noise", "error", "match"),
    [
        (torch.zeros(3, 1, B, D), ValueError, r"noise has dtype torch.float32 but x has torch.float64"),
        (torch.zeros(3, 1, B, D + 1, dtype=torch.float64), ValueError, r"noise must have shape \[3, 1, 6, 3\]"),
        ([0.0], TypeError, "noise must be a torch.Tensor"),
    ],
    ids=["dtype", "shape", "list"],
)
def test_bad_noise_is_named(noise, error, match):
    with pytest.raises(error, match=match):
        _e_step(_model()).infer(_x(), noise=noise)


@pytest.mark.parametrize(
    ("encoder", "error", "match"),
    [
        (lambda x: torch.zeros(x.shape[0], 2 * D, dtype=x.dtype), TypeError,
         r"the init= encoder returned one tensor of shape \[6, 6\].*chunk\(2, dim=-1\)"),
        (lambda x: (torch.zeros(x.shape[0], D + 1, dtype=x.dtype),) * 2, ValueError,
         r"returned loc of shape \[6, 4\]; expected \[6, 3\]"),
        (lambda x: {"mu": torch.zeros(x.shape[0], D, dtype=x.dtype)}, TypeError, r"fields \['mu'\]"),
    ],
    ids=["one-tensor", "wrong-size", "missing-field"],
)
def test_bad_encoder_outputs_are_named(encoder, error, match):
    for method in (StandardEncoder(_model(), latent_dim=D, init=encoder),
                   SemiAmortized(_model(), latent_dim=D, init=encoder, num_steps=1)):
        with pytest.raises(error, match=match):
            method.infer(_x())


def test_named_encoder_outputs_are_read():
    def encoder(x):
        return {"mu": torch.zeros(x.shape[0], D, dtype=x.dtype), "logvar": torch.zeros(x.shape[0], D, dtype=x.dtype)}

    result = StandardEncoder(_model(), latent_dim=D, init=encoder).infer(_x())
    assert torch.equal(result.params["loc"], torch.zeros(B, D, dtype=torch.float64))


# ---- non-finite ELBOs: every method warns or raises ------------------------------------------------------------

def _overflowing_model():
    """A Gaussian model whose log-density overflows to −inf for examples with huge values (x²: inf in float32)."""
    return DecoderModel(mlp_decoder(D, X, dtype=torch.float32), likelihood="gaussian", latent_dim=D)


@pytest.mark.parametrize("method", ["iterative", "e-step", "semi-amortized", "standard"])
def test_every_method_reports_an_overflowing_example(method):
    model = _overflowing_model()
    build = {
        "iterative": lambda **o: IterativeInferenceOptimizer(model, latent_dim=D, num_steps=2, hidden_size=8, **o),
        "e-step": lambda **o: GradientEStep(model, latent_dim=D, num_steps=2, **o),
        "semi-amortized": lambda **o: SemiAmortized(model, latent_dim=D, num_steps=2, init="highway",
                                                    hidden_size=8, **o),
        "standard": lambda **o: StandardEncoder(model, latent_dim=D, init="highway", hidden_size=8, **o),
    }[method]
    x = torch.rand(4, X)
    x[2] = 1e30  # finite data whose squared error overflows float32
    inference = build()
    with pytest.warns(RuntimeWarning, match=r"1 of 4 examples had a non-finite ELBO.*\(examples 2\)"):
        result = inference(x)
    assert torch.isfinite(result.loss) and not torch.isfinite(result.elbo[:, 2]).any()
    assert torch.isfinite(result.elbo[:, [0, 1, 3]]).all()
    with pytest.raises(FloatingPointError, match=r"examples 2"):
        build(on_nonfinite="raise").infer(x)


# ---- first contact: misplaced options, nothing to train ----------------------------------------------------------

class _TinyVAE(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc, self.dec = nn.Linear(X, 2 * D), nn.Linear(D, X)

    def encode(self, x):
        return list(self.enc(x).chunk(2, dim=-1))

    def decode(self, z):
        return self.dec(z)


def test_options_of_the_inference_method_given_to_the_model_are_named():
    with pytest.raises(TypeError, match=r"VAEModel got init='encoder'.*IterativeInferenceOptimizer\(model, "
                                        r"latent_dim=\.\.\., init='encoder'\)"):
        VAEModel(_TinyVAE(), likelihood="bernoulli", latent_dim=D, init="encoder")
    with pytest.raises(TypeError, match=r"DecoderModel got hidden_size=8, num_steps=3"):
        DecoderModel(nn.Linear(D, X), latent_dim=D, num_steps=3, hidden_size=8)


def test_unknown_likelihood_options_list_the_accepted_ones():
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['log_variance'\] for likelihood='gaussian'.*"
                                        r"\['log_var', 'learn_variance'\]"):
        VAEModel(_TinyVAE(), likelihood="gaussian", latent_dim=D, log_variance=0.0)
    with pytest.raises(TypeError, match=r"BernoulliLikelihood takes no options"):
        make_likelihood("bernoulli", log_var=0.0)


def test_vae_model_needs_an_encoder_and_a_decoder():
    with pytest.raises(TypeError, match=r"callable encode\(\) method, or pass encode="):
        VAEModel(nn.Linear(2, 2), likelihood="bernoulli", latent_dim=D)
    with pytest.raises(TypeError, match="decode must be callable"):
        VAEModel(_TinyVAE(), likelihood="bernoulli", latent_dim=D, decode=3)


def test_fit_names_a_run_with_nothing_to_train():
    model = _model().requires_grad_(False)
    inference = IterativeInferenceOptimizer(model, latent_dim=D, num_steps=0, hidden_size=8).double()
    with pytest.raises(ValueError, match=r"with num_steps=0 no refinement step runs.*frozen"):
        fit(inference, _x(32), epochs=1, batch_size=8, progress=False)


# ---- the squared-error ↔ Gaussian mapping ----------------------------------------------------------------------

@given(kl_weight=st.floats(1e-6, 1e3), error_weight=st.floats(1e-3, 1e3), event_size=st.integers(1, 10_000),
       mean=st.booleans())
def test_log_var_from_squared_error_matches_the_loss(kl_weight, error_weight, event_size, mean):
    """1/(2σ²) must equal the per-entry weight of the squared error once the loss is divided by β."""
    options = {"reduction": "mean", "event_size": event_size} if mean else {}
    log_var = log_var_from_squared_error(kl_weight=kl_weight, error_weight=error_weight, **options)
    per_entry = error_weight / (event_size if mean else 1)
    assert math.isclose(1 / (2 * math.exp(log_var)), per_entry / kl_weight, rel_tol=1e-9)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"kl_weight": 0.0}, "kl_weight must be a positive number"),
        ({"error_weight": -1.0}, "error_weight must be a positive number"),
        ({"reduction": "mean"}, "reduction='mean' needs event_size"),
        ({"event_size": 10}, "only used with reduction='mean'"),
        ({"reduction": "max"}, "reduction must be 'sum' or 'mean'"),
    ],
)
def test_log_var_from_squared_error_rejects_bad_arguments(options, match):
    with pytest.raises(ValueError, match=match):
        log_var_from_squared_error(**options)
