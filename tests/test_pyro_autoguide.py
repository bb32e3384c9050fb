"""Tests for ``learned_inference.integrations.pyro``: AutoIterativeNormal and the per-step ELBOs.

They mirror Pyro's own autoguide suite (tests/infer/test_autoguide.py): finite losses across model shapes and
ELBOs, median/quantile shapes, serialization, subsampling with and without ``create_plates``, guide lists,
outer plates; plus exact checks (the refinement gradient, a conjugate model's posterior) and the error messages.
"""

from __future__ import annotations

import io
import math
import pickle

import pytest

pyro = pytest.importorskip("pyro")

import pyro.distributions as dist  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from pyro import poutine  # noqa: E402
from pyro.infer import SVI, Predictive, Trace_ELBO, TraceEnum_ELBO, TraceGraph_ELBO, TraceMeanField_ELBO  # noqa: E402
from pyro.infer.autoguide import AutoGuideList, AutoNormal  # noqa: E402
from pyro.infer.autoguide.initialization import InitMessenger, init_to_value  # noqa: E402

from learned_inference.integrations.pyro import (  # noqa: E402
    AutoIterativeNormal,
    IterativeTrace_ELBO,
    IterativeTraceEnum_ELBO,
    IterativeTraceMeanField_ELBO,
    LocalLogJoint,
    find_amortized_plates,
    local_layout,
)
from tests.pyro_fixtures import SMALL, fresh_param_store  # noqa: E402, F401  (the fixture applies here)

# -- models --------------------------------------------------------------------------------------------------


def scalar_model(x):
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("obs", dist.Normal(z, 0.5), obs=x)


def event_model(x):
    loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 0.5))
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(loc.unsqueeze(-1), torch.ones(3)).to_event(1))
        pyro.sample("obs", dist.Normal(z, scale.unsqueeze(-1)).to_event(1), obs=x)


def constrained_model(x):
    weights = pyro.sample("weights", dist.Dirichlet(torch.ones(3)))
    with pyro.plate("data", len(x)):
        rate = pyro.sample("rate", dist.Gamma(2.0, 2.0))
        probs = pyro.sample("probs", dist.Dirichlet(torch.ones(3)))
        mix = 0.5 * (probs + weights)
        pyro.sample("obs", dist.Normal(rate.unsqueeze(-1) * mix, 1.0).to_event(1), obs=x)


def inner_plate_model(x):
    with pyro.plate("data", x.shape[0], dim=-2):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("features", x.shape[1], dim=-1):
            w = pyro.sample("w", dist.Normal(z, 1.0))
            pyro.sample("obs", dist.Normal(w, 0.5), obs=x)


MODELS = {
    "scalar": (scalar_model, lambda n: torch.randn(n)),
    "event+globals": (event_model, lambda n: torch.randn(n, 3)),
    "positive+simplex": (constrained_model, lambda n: torch.randn(n, 3)),
    "inner_plate": (inner_plate_model, lambda n: torch.randn(n, 4)),
}


def guide_for(name, **options):
    model, data = MODELS[name]
    amortized = ("data",) if name == "inner_plate" else None
    return model, data, AutoIterativeNormal(model, amortized_plates=amortized, **{**SMALL, **options})


# -- finite losses across shapes and ELBOs -------------------------------------------------------------------


@pytest.mark.parametrize("elbo", [Trace_ELBO, TraceMeanField_ELBO, TraceGraph_ELBO, IterativeTrace_ELBO,
                                  IterativeTraceMeanField_ELBO])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_svi_losses_are_finite(name, elbo):
    model, data, guide = guide_for(name)
    x = data(6)
    svi = SVI(model, guide, pyro.optim.ClippedAdam({"lr": 1e-2}), elbo())
    losses = [svi.step(x) for _ in range(2)]
    assert all(math.isfinite(loss) for loss in losses)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_vectorized_particles(name):
    model, data, guide = guide_for(name)
    x = data(5)
    elbo = IterativeTrace_ELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=2)
    loss = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), elbo).step(x)
    assert math.isfinite(loss)
    with pyro.plate("particles", 3, dim=-3):
        samples = guide(x)
    assert all(value.shape[0] == 3 and value.dim() >= 3 for value in samples.values())


def test_guide_under_outer_plate_has_sample_shape():
    x = torch.randn(5, 3)
    guide = AutoIterativeNormal(event_model, **SMALL)
    plain = guide(x)
    with pyro.plate("samples", 7, dim=-2):
        samples = guide(x)
    assert plain["z"].shape == (5, 3)
    assert samples["z"].shape == (7, 5, 3)
    assert samples["loc"].shape == (7, 1)


# -- summaries -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODELS))
def test_median_and_quantiles_shapes_no_grad(name):
    _, data, guide = guide_for(name)
    x = data(5)
    samples = guide(x)
    median = guide.median(x)
    quantiles = guide.quantiles([0.1, 0.5, 0.9], x)
    assert set(median) == set(quantiles) == set(samples)
    for site, value in samples.items():
        assert median[site].shape == value.shape
        assert quantiles[site].shape == (3, *value.shape)
        assert not median[site].requires_grad and not quantiles[site].requires_grad
        torch.testing.assert_close(median[site], quantiles[site][1])


def test_median_is_deterministic_and_amortized_over_new_sizes():
    guide = AutoIterativeNormal(scalar_model, **SMALL)
    guide(torch.randn(4))
    x_new = torch.randn(9)
    torch.testing.assert_close(guide.median(x_new)["z"], guide.median(x_new)["z"])
    assert guide.median(x_new)["z"].shape == (9,)
    assert guide(x_new)["z"].shape == (9,)


def test_predictive_on_new_data():
    guide = AutoIterativeNormal(event_model, **SMALL)
    guide(torch.randn(5, 3))
    samples = Predictive(event_model, guide=guide, num_samples=4)(torch.randn(8, 3))
    assert samples["z"].shape == (4, 8, 3)
    assert samples["obs"].shape == (4, 8, 3)
    parallel = Predictive(event_model, guide=guide, num_samples=4, parallel=True)(torch.randn(8, 3))
    assert parallel["z"].shape == (4, 8, 3)


# -- serialization -------------------------------------------------------------------------------------------


def _outputs(guide, x):
    pyro.set_rng_seed(1)
    return {**guide(x), **{f"median.{k}": v for k, v in guide.median(x).items()}}


def test_state_dict_round_trip_gives_identical_outputs():
    x = torch.randn(6, 3)
    guide = AutoIterativeNormal(event_model, **SMALL)
    SVI(event_model, guide, pyro.optim.Adam({"lr": 1e-2}), IterativeTrace_ELBO()).step(x)
    buffer = io.BytesIO()
    torch.save(guide.state_dict(), buffer)
    pyro.clear_param_store()
    fresh = AutoIterativeNormal(event_model, **SMALL)
    fresh(x)  # set up, as for every autoguide
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer))
    expected, actual = _outputs(guide, x), _outputs(fresh, x)
    for site in expected:
        torch.testing.assert_close(actual[site], expected[site])


def test_pickle_round_trip_gives_identical_outputs():
    x = torch.randn(6, 3)
    guide = AutoIterativeNormal(event_model, **SMALL)
    SVI(event_model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO()).step(x)
    copy = pickle.loads(pickle.dumps(guide))
    assert guide.model is event_model  # pickling does not strip the live guide
    expected, actual = _outputs(guide, x), _outputs(copy, x)
    for site in expected:
        torch.testing.assert_close(actual[site], expected[site])


# -- subsampling and composition -----------------------------------------------------------------------------


def subsample_model(x, batch_size=None):
    loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(x), subsample_size=batch_size):
        batch = pyro.subsample(x, event_dim=0)
        z = pyro.sample("z", dist.Normal(loc, 1.0))
        pyro.sample("obs", dist.Normal(z, 0.5), obs=batch)


def test_subsampling_without_create_plates():
    x = torch.randn(50)
    guide = AutoIterativeNormal(subsample_model, **SMALL)
    svi = SVI(subsample_model, guide, pyro.optim.Adam({"lr": 1e-2}), IterativeTrace_ELBO())
    assert all(math.isfinite(svi.step(x, batch_size=10)) for _ in range(3))
    trace = poutine.trace(guide).get_trace(x, batch_size=10)
    assert trace.nodes["z"]["value"].shape == (10,)
    assert trace.nodes["z"]["scale"] == 5.0


def test_subsampling_with_create_plates():
    def model(batch, subsample, full_size):
        drift = pyro.sample("drift", dist.LogNormal(-1.0, 0.5))
        with pyro.plate("data", full_size, subsample=subsample):
            z = pyro.sample("z", dist.Normal(0.0, drift))
            pyro.sample("obs", dist.Bernoulli(logits=z), obs=batch)

    def create_plates(batch, subsample, full_size):
        return pyro.plate("data", full_size, subsample=subsample)

    data = torch.bernoulli(torch.full((50,), 0.4))
    guide = AutoIterativeNormal(model, create_plates=create_plates, **SMALL)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), IterativeTrace_ELBO())
    for begin in range(0, 50, 20):
        subsample = torch.arange(begin, min(50, begin + 20))
        assert math.isfinite(svi.step(data[subsample], subsample, full_size=50))
    assert guide(data[:20], torch.arange(20), full_size=50)["z"].shape == (20,)


def test_guide_list_composition():
    guide = AutoGuideList(event_model)
    guide.append(AutoNormal(poutine.block(event_model, expose=["loc", "scale"])))
    guide.append(AutoIterativeNormal(poutine.block(event_model, hide=["loc", "scale"]), **SMALL))
    x = torch.randn(6, 3)
    svi = SVI(event_model, guide, pyro.optim.Adam({"lr": 1e-2}), IterativeTrace_ELBO())
    assert all(math.isfinite(svi.step(x)) for _ in range(2))
    assert set(guide(x)) == {"loc", "scale", "z"}
    assert guide.median(x)["z"].shape == (6, 3)
    assert guide.quantiles([0.5], x)["z"].shape == (1, 6, 3)


# -- the objective -------------------------------------------------------------------------------------------


def _loss_and_network_grads(elbo):
    guide = AutoIterativeNormal(scalar_model, num_steps=3, hidden_size=16)
    x = torch.randn(6)
    guide(x)
    pyro.set_rng_seed(3)
    loss = elbo.loss_and_grads(scalar_model, guide, x)
    return loss, torch.cat([p.grad.flatten() for p in guide.network.parameters()])


def test_iterative_elbo_keeps_the_loss_and_adds_every_step_to_the_network_gradient():
    torch.manual_seed(0)
    plain_loss, plain_grads = _loss_and_network_grads(Trace_ELBO())
    pyro.clear_param_store()
    torch.manual_seed(0)
    loss, grads = _loss_and_network_grads(IterativeTrace_ELBO())
    assert loss == pytest.approx(plain_loss)
    assert plain_grads.abs().sum() > 0  # plain Trace_ELBO trains the network through the final step
    assert not torch.allclose(grads, plain_grads)


@settings(max_examples=20, deadline=None)
@given(
    x=st.lists(st.floats(-5, 5, allow_nan=False), min_size=1, max_size=6),
    u0=st.floats(-3, 3, allow_nan=False),
)
def test_local_log_joint_gradient_matches_the_conjugate_model(x, u0):
    """∇_u log p(x, z=u) = −u + (x − u)/σ² for the scalar Normal-Normal model (σ = 0.5)."""
    x = torch.tensor(x)
    trace = poutine.block(poutine.trace(scalar_model).get_trace, hide_fn=lambda m: m["is_observed"])(x)
    layout = local_layout(trace, find_amortized_plates(trace, None))
    log_joint = LocalLogJoint(
        scalar_model, (x,), {}, layout=layout, left_shape=(len(x),), conditioned={"data": torch.arange(len(x))}
    )
    u = torch.full((len(x), 1), u0, requires_grad=True)
    (grad,) = torch.autograd.grad(log_joint.log_joint(None, u).sum(), u)
    torch.testing.assert_close(grad[:, 0], -u0 + (x - u0) / 0.25)


def test_local_log_joint_runs_the_model_without_argument_validation():
    """Inside the refinement the model runs without Pyro's argument validation: a step that reaches parameters a
    distribution refuses (here a probability of exactly 1, which the validated model rejects) scores that datapoint
    at the distribution's own limit (or non-finite, for the engine's non-finite policy), instead of raising a
    ValueError that would stop the whole batch; the other datapoints' values are unchanged."""
    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.NegativeBinomial(total_count=5.0, probs=torch.sigmoid(40 * z)), obs=x)

    x = torch.tensor([1.0, 2.0, 3.0])
    at_zero = InitMessenger(init_to_value(values={"z": torch.zeros(3)}))(model)  # latent, at 0
    trace = poutine.block(poutine.trace(at_zero).get_trace, hide_fn=lambda m: m["is_observed"])(x)
    layout = local_layout(trace, find_amortized_plates(trace, None))
    log_joint = LocalLogJoint(model, (x,), {}, layout=layout, left_shape=(3,), conditioned={"data": torch.arange(3)})
    u = torch.tensor([[0.0], [10.0], [-1.0]])  # sigmoid(400) is 1.0 in float32: outside NegativeBinomial's [0, 1)
    with pyro.validation_enabled(True):
        values = log_joint.log_joint(None, u)
        with pytest.raises(ValueError, match="probs"):  # the model itself, validated, refuses it
            poutine.condition(model, data={"z": u[:, 0]})(x)
    valid = log_joint.log_joint(None, torch.tensor([[0.0], [0.0], [-1.0]]))
    torch.testing.assert_close(values[[0, 2]], valid[[0, 2]])


def test_conjugate_posterior_matches_exact_on_training_and_new_data():
    """z_i ~ N(0, I₂), x_i ~ N(z_i, 0.5² I): q must reach N(x/(σ²+1)·1, (1 + 1/σ²)⁻¹) on old and new data."""
    sigma = 0.5

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
            pyro.sample("x", dist.Normal(z, sigma).to_event(1), obs=x)

    marginal_sd = (1 + sigma**2) ** 0.5
    x_train, x_new = torch.randn(256, 2) * marginal_sd, torch.randn(256, 2) * marginal_sd
    guide = AutoIterativeNormal(model, num_steps=5, hidden_size=64)
    svi = SVI(model, guide, pyro.optim.ClippedAdam({"lr": 1e-2, "lrd": 0.995}), IterativeTrace_ELBO())
    for _ in range(400):
        svi.step(x_train[torch.randint(0, 256, (64,))])
    precision = 1 + 1 / sigma**2
    exact_sd = precision**-0.5
    for x in (x_train, x_new):
        exact_mean = x / sigma**2 / precision
        mean = guide.median(x)["z"]
        low, high = guide.quantiles([0.158655, 0.841345], x)["z"]
        mean_error = (mean - exact_mean).abs() / exact_sd
        assert mean_error.max() < 0.25, mean_error.max()
        scale_error = ((high - low) / 2 - exact_sd).abs() / exact_sd
        assert scale_error.max() < 0.3, scale_error.max()


# -- errors --------------------------------------------------------------------------------------------------


def test_discrete_latent_error_suggests_guide_list():
    def model(x):
        with pyro.plate("data", len(x)):
            c = pyro.sample("c", dist.Bernoulli(0.5))
            pyro.sample("obs", dist.Normal(c, 1.0), obs=x)

    with pytest.raises(ValueError, match=r"discrete.*AutoGuideList.*hide=\['c'\]"):
        AutoIterativeNormal(model)(torch.randn(3))


def test_ambiguous_plates_error_asks_for_amortized_plates():
    with pytest.raises(ValueError, match=r"amortized_plates=\('data',\)"):
        AutoIterativeNormal(inner_plate_model)(torch.randn(3, 4))
    with pytest.raises(ValueError, match="amortized_plates must name"):
        AutoIterativeNormal(scalar_model, amortized_plates="batch")(torch.randn(3))


@pytest.mark.parametrize(("option", "value"), [("num_steps", -1), ("num_samples", 0), ("hidden_size", 0),
                                               ("init_scale", 0.0)])
def test_bad_options_are_refused(option, value):
    with pytest.raises(ValueError, match=option):
        AutoIterativeNormal(scalar_model, **{option: value})


def _enumerated_model(x):
    """Per document z; per word a discrete c summed out by enumeration; the words' plate at dim -2, left of the
    documents' at -1 (the layout of Pyro's LDA example)."""
    with pyro.plate("documents", x.shape[1]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("words", x.shape[0]):
            c = pyro.sample("c", dist.Bernoulli(logits=z.expand(x.shape)), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Normal(2.0 * c - 1.0, 1.0), obs=x)


def test_local_log_joint_sums_out_enumerated_sites_and_inner_plates():
    """log p(x_d, z_d) = log N(z_d; 0, 1) + Σ_w log Σ_c p(c | z_d) N(x_wd; 2c − 1, 1), per document."""
    x = torch.randn(5, 4)
    trace = poutine.block(poutine.trace(poutine.block(_enumerated_model, hide=["c"])).get_trace,
                          hide_fn=lambda m: m["is_observed"])(x)
    layout = local_layout(trace, find_amortized_plates(trace, None))
    log_joint = LocalLogJoint(_enumerated_model, (x,), {}, layout=layout, left_shape=(4,),
                              conditioned={"documents": torch.arange(4)}, enumerate_dim=-3)
    u = torch.randn(4, 1)
    z = u[:, 0]
    p1 = torch.sigmoid(z)
    likelihood = [dist.Normal(mean, 1.0).log_prob(x).exp() for mean in (1.0, -1.0)]
    mixture = torch.log(p1 * likelihood[0] + (1 - p1) * likelihood[1])
    expected = dist.Normal(0.0, 1.0).log_prob(z) + mixture.sum(0)
    torch.testing.assert_close(log_joint.log_joint(None, u), expected)
    features = log_joint.observations(u)
    torch.testing.assert_close(features, x.T)  # each document's words, moved right of the documents' plate


def test_the_guide_trains_with_enumeration_on_every_step():
    """An enumerated model is refined with its discrete site summed out; IterativeTraceEnum_ELBO also trains the
    update network on the inner steps (its gradient differs from TraceEnum_ELBO's, which trains only step T)."""
    x = torch.randn(6, 8)
    grads = {}
    for elbo in (TraceEnum_ELBO, IterativeTraceEnum_ELBO):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = AutoIterativeNormal(_enumerated_model, amortized_plates="documents", num_steps=3, hidden_size=8)
        loss = elbo(max_plate_nesting=2).loss_and_grads(_enumerated_model, guide, x)
        assert math.isfinite(loss)
        grads[elbo] = torch.cat([p.grad.flatten() for p in guide.network.parameters()])
    assert not torch.allclose(grads[TraceEnum_ELBO], grads[IterativeTraceEnum_ELBO])
    assert math.isfinite(IterativeTraceEnum_ELBO(max_plate_nesting=2).loss(_enumerated_model, guide, x))  # evaluate


def test_the_low_rank_guide_captures_a_correlated_posterior():
    """A conjugate model whose exact posterior is strongly correlated: the best diagonal Gaussian stays 1.47 nats
    below log p(x) (closed form); the low-rank guide (family="low_rank", one joint auxiliary site) gets within a
    third of that after 150 steps."""
    torch.manual_seed(0)
    weight = torch.tensor([[2.0, 2.0, 0.0], [2.0, 2.0, 0.1], [0.0, 0.1, 1.0], [1.0, 1.0, 0.0]])
    sigma = 0.5

    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ weight.T, sigma).to_event(1), obs=x)

    marginal = dist.MultivariateNormal(torch.zeros(4), weight @ weight.T + sigma**2 * torch.eye(4))
    x = marginal.sample((128,))
    log_px = marginal.log_prob(x).mean().item()
    precision = torch.eye(3) + weight.T @ weight / sigma**2
    diagonal_gap = 0.5 * (torch.log(torch.diag(precision)).sum() - torch.logdet(precision)).item()
    guide = AutoIterativeNormal(model, num_steps=3, hidden_size=32, family="low_rank", num_samples=2)
    svi = SVI(model, guide, pyro.optim.ClippedAdam({"lr": 1e-2}), IterativeTrace_ELBO())
    for _ in range(150):
        svi.step(x[torch.randint(0, 128, (64,))])
    trace = poutine.trace(guide).get_trace(x)
    assert any(name.endswith("_latent") and site["infer"].get("is_auxiliary") for name, site in trace.nodes.items())
    elbo = -Trace_ELBO(num_particles=50, vectorize_particles=True).loss(model, guide, x) / 128
    assert diagonal_gap > 1.4 and log_px - elbo < diagonal_gap / 3, (log_px - elbo, diagonal_gap)
    assert guide.quantiles([0.25, 0.75], x)["z"].shape == (2, 128, 3)
