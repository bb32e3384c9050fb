"""Hierarchical latent models: eqs. 60-61, bottom-up/top-down errors, per-variable families and networks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from learned_inference import GradientEStep, IterativeInferenceOptimizer, StandardEncoder
from learned_inference.block_family import BlockFamily
from learned_inference.context import StepContext
from learned_inference.encodings import FeatureShapes, HierarchicalErrors
from learned_inference.errors import precision_weighted_errors
from learned_inference.families import DiagonalGaussian
from learned_inference.latent_space import LatentSpace
from learned_inference.networks import HighwayMLP
from learned_inference.objectives import Objective, elbo_and_grad
from learned_inference.updates import GatedUpdate
from learned_inference.zoo import BottomUpEncoder, LinearGaussianHierarchy, ProbabilisticPCA, TwoLevelVAE
from tests.conftest import train_update_network

B, X, DIMS = 5, 8, (3, 2)


def _model(seed: int = 0) -> LinearGaussianHierarchy:
    gen = torch.Generator().manual_seed(seed)
    return LinearGaussianHierarchy.random(data_dim=X, latent_dims=DIMS, dtype=torch.float64, generator=gen)


def _random_params(batch: int) -> dict[str, torch.Tensor]:
    return {"loc": torch.randn(batch, sum(DIMS), dtype=torch.float64),
            "log_var": 0.5 * torch.randn(batch, sum(DIMS), dtype=torch.float64)}


def test_lambda_gradients_match_eqs_60_61():
    """∇μℓ L = (∂μℓ−1,p/∂zℓ)ᵀ εℓ−1 − εℓ (eq. 60); ∇log σ²ℓ L = σ²ℓ ∇σ²ℓ L with ∇σ²ℓ L = ε/(2σ) ⊙ (the same
    bottom-up minus top-down terms) + 1/(2σ²) (eq. 61, entropy term with its ELBO sign)."""
    model = _model()
    space = LatentSpace(model.latent_dim)
    x, params = model.sample(B), _random_params(B)
    noise = torch.randn(1, B, sum(DIMS), dtype=torch.float64)
    _, grads = elbo_and_grad(model, DiagonalGaussian(), params, x, noise, space=space)

    loc, std, eps = space.split(params["loc"]), space.split(torch.exp(0.5 * params["log_var"])), space.split(noise[0])
    z = {v: loc[v] + std[v] * eps[v] for v in loc}
    v0, v1 = torch.exp(model.log_var), torch.exp(model.top_log_var)
    error_x = (x - z["z1"] @ model.weight.T - model.bias) / v0          # bottom-up for z1
    error_1 = (z["z1"] - z["z2"] @ model.top_weight.T - model.top_bias) / v1  # top-down for z1, bottom-up for z2
    error_2 = z["z2"]                                                     # top-down for z2 (prior N(0, I))
    d_mean = {"z1": error_x @ model.weight - error_1, "z2": error_1 @ model.top_weight - error_2}
    d_log_var = {v: 0.5 * std[v] * eps[v] * d_mean[v] + 0.5 for v in d_mean}

    torch.testing.assert_close(grads["loc"], space.merge(d_mean))
    torch.testing.assert_close(grads["log_var"], space.merge(d_log_var))
    # The errors the encoding sees are exactly these terms.
    errors = precision_weighted_errors(model, x, {v: z[v][None] for v in z})
    for level, expected in (("x", error_x), ("z1", error_1), ("z2", error_2)):
        torch.testing.assert_close(errors[level], expected)


def test_errors_name_the_missing_levels():
    class Partial:
        def conditionals(self, z):
            return {"x": (torch.zeros(1), torch.ones(1))}

    with pytest.raises(ValueError, match=r"missing \['z1'\]"):
        precision_weighted_errors(Partial(), torch.zeros(2, 3), {"z1": torch.zeros(1, 2, 2)})


def test_hierarchical_errors_give_each_variable_its_bottom_up_and_top_down_error():
    model = _model()
    space = LatentSpace(model.latent_dim)
    objective = Objective(model, DiagonalGaussian(), space)
    x, params = model.sample(B), _random_params(B)
    noise = torch.randn(2, B, sum(DIMS), dtype=torch.float64)
    values, grads = objective.elbo_and_grad(params, x, noise)
    context = StepContext(x=x, params=params, grads=grads, elbo=values, healthy=torch.ones(B, dtype=torch.bool),
                          t=0, noise=noise, objective=objective)
    z = space.split(DiagonalGaussian().sample(params, noise))
    errors = precision_weighted_errors(model, x, z)
    assert all(torch.equal(context.level_errors[k], errors[k]) for k in errors)
    raw = HierarchicalErrors(log_sign=False)
    torch.testing.assert_close(raw(context), torch.cat([errors["x"], errors["z1"], errors["z2"]], -1))
    torch.testing.assert_close(raw(context.restrict("z1")), torch.cat([errors["x"], errors["z1"]], -1))
    torch.testing.assert_close(raw(context.restrict("z2")), torch.cat([errors["z1"], errors["z2"]], -1))
    encoded = HierarchicalErrors()(context.restrict("z2"))
    torch.testing.assert_close(encoded[:, :3], 0.1 * torch.log(errors["z1"].abs() + 1e-8))
    levels = {"x": X, "z1": 3, "z2": 2}
    for variable, size in ((None, X + 5), ("z1", X + 3), ("z2", 5)):
        shapes = FeatureShapes(data=X, params={"loc": 1}, levels=levels, variable=variable)
        assert raw.num_features(shapes) == size and HierarchicalErrors().num_features(shapes) == 2 * size
    with pytest.raises(ValueError, match="variable must be one of"):
        raw.num_features(FeatureShapes(data=X, params={"loc": 1}, levels=levels, variable="x"))


def _optimizer(model, **options):
    options = {"latent_dim": model.latent_dim, "num_steps": 2, "hidden_size": 16,
               "network": {"z1": "highway", "z2": "highway"},
               "encoding": ("gradient", "hierarchical_errors", "data", "params"), **options}
    return IterativeInferenceOptimizer(model, **options).double()


@given(batch=st.integers(1, 6), row=st.integers(0, 5), seed=st.integers(0, 2**16))
def test_per_variable_inference_keeps_examples_independent(batch, row, seed):
    row = row % batch
    torch.manual_seed(seed)
    model = _model()
    inference = _optimizer(model, num_samples=2)
    x = model.sample(batch)
    noise = torch.randn(3, 2, batch, sum(DIMS), dtype=torch.float64)
    result = inference.infer(x, noise=noise)
    assert result.elbo.shape == (3, batch)
    assert {v: result.params[v]["loc"].shape for v in result.params} == {"z1": (batch, 3), "z2": (batch, 2)}
    other = x.clone()
    other[torch.arange(batch) != row] += 5.0
    again = inference.infer(other, noise=noise)
    for v in result.params:
        torch.testing.assert_close(again.params[v]["loc"][row], result.params[v]["loc"][row])


def test_each_variable_is_updated_by_its_own_network():
    model = _model()
    inference = _optimizer(model, num_steps=1)
    x, noise = model.sample(B), torch.randn(2, 2, B, sum(DIMS), dtype=torch.float64)
    before = inference.infer(x, noise=noise).params
    assert any(key.startswith("network.z2.") for key in inference.state_dict())
    with torch.no_grad():
        for p in inference.network.parts()["z2"].parameters():
            p.add_(1.0)
    after = inference.infer(x, noise=noise).params
    torch.testing.assert_close(after["z1"]["loc"], before["z1"]["loc"])
    assert not torch.allclose(after["z2"]["loc"], before["z2"]["loc"])


def test_per_variable_families_apply_their_own_constraints():
    model = _model()
    families = {"z1": DiagonalGaussian(), "z2": DiagonalGaussian(log_var_bounds=(-1.0, 0.5))}
    inference = _optimizer(model, family=families, num_steps=1, update="gated")
    assert isinstance(inference.family, BlockFamily)
    with torch.no_grad():  # every update sets log σ² to 3 (gate g ≈ 0, target bias 3)
        for heads in inference.update.parts().values():
            heads.gates["log_var"].bias.fill_(-50.0)
            heads.targets["log_var"].weight.zero_()
            heads.targets["log_var"].bias.fill_(3.0)
    result = inference.infer(model.sample(B))
    assert (result.params["z1"]["log_var"] == 3.0).all() and (result.params["z2"]["log_var"] == 0.5).all()
    assert result.posterior["z2"].event_shape == (2,) and result.posterior["z2"].stddev.max() < 1.3


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"latent_dim": 5}, r"needs one network per latent variable \(latent_dim as a dict\)"),
        ({"network": {"z1": "highway"}}, r"needs one network per latent variable \['z1', 'z2'\], got \['z1'\]"),
        ({"network": "an instance"}, "this network is already built: leave them out"),
        ({"update": "an instance"}, "pass a name"),
        ({"family": {"z1": "diagonal_gaussian", "z2": "delta"}}, "must share their parameter names"),
        ({"family": {"z1": "delta"}}, "one family per latent variable"),
    ],
)
def test_bad_per_variable_options_name_the_argument(options, message):
    model = _model()
    if options.get("network") == "an instance":
        options = {"network": HighwayMLP(hidden_size=4)}
    if options.get("update") == "an instance":
        options = {"update": GatedUpdate(("loc", "log_var"), hidden_size=16, dim=5)}
    if options.get("latent_dim") == 5:
        options = {**options, "encoding": "gradient"}
    with pytest.raises(ValueError, match=message):
        _optimizer(model, **options)


def test_hierarchical_errors_need_a_model_with_conditionals():
    model = ProbabilisticPCA.random(data_dim=4, latent_dim=2)
    with pytest.raises(ValueError, match=r"needs model.conditionals\(z\)"):
        IterativeInferenceOptimizer(model, latent_dim={"z1": 1, "z2": 1}, encoding="hierarchical_errors")


def test_linear_hierarchy_reference_quantities_agree():
    """Mean-field optimum ≤ log p(x); the closed-form ELBO equals a many-sample Monte-Carlo ELBO."""
    model = _model()
    x = model.sample(4)
    best = model.mean_field_optimum(x)
    assert (model.exact_elbo(x, best) <= model.log_marginal(x) + 1e-9).all()
    space = LatentSpace(model.latent_dim)
    flat = {p: space.merge({v: best[v][p] for v in best}) for p in ("loc", "log_var")}
    noise = torch.randn(20000, 4, sum(DIMS), dtype=torch.float64)
    values, _ = elbo_and_grad(model, DiagonalGaussian(), flat, x, noise, space=space)
    torch.testing.assert_close(values, model.exact_elbo(x, best), atol=0.05, rtol=0)
    # Any perturbation of the optimum lowers the ELBO.
    worse = {v: {"loc": best[v]["loc"] + 0.1, "log_var": best[v]["log_var"]} for v in best}
    assert (model.exact_elbo(x, worse) < model.exact_elbo(x, best)).all()


def test_two_level_vae_trains_with_both_inference_models():
    model = TwoLevelVAE(data_dim=20, latent_dims=(4, 2), hidden_sizes=(16, 8))
    x = torch.bernoulli(torch.full((6, 20), 0.3))
    networks = {"z1": HighwayMLP(hidden_size=16), "z2": HighwayMLP(hidden_size=8)}
    iterative = IterativeInferenceOptimizer(model, latent_dim=model.latent_dim, num_steps=2, network=networks,
                                            encoding=("gradient", "hierarchical_errors", "data"))
    standard = StandardEncoder(model, latent_dim=model.latent_dim, init=BottomUpEncoder(latent_dims=(4, 2),
                                                                                        hidden_sizes=(16, 8)))
    for method in (iterative, standard):
        model.zero_grad()
        result = method(x)
        result.loss.backward()
        assert model.decoder_z1[0].weight.grad.abs().sum() > 0
        assert set(result.posterior) == {"z1", "z2"} and torch.isfinite(result.elbo).all()


@pytest.mark.slow
def test_learned_optimizer_reaches_the_best_mean_field_elbo():
    """Must-be-true 1: within 0.3 nats/example of the best mean-field ELBO found by a long E-step."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = LinearGaussianHierarchy.random(data_dim=12, latent_dims=(4, 2), generator=gen).requires_grad_(False)
    x_train, x_test = model.sample(4096, generator=gen), model.sample(512, generator=gen)
    inference = IterativeInferenceOptimizer(model, latent_dim=model.latent_dim, num_steps=5, hidden_size=64,
                                            encoding=("gradient", "hierarchical_errors", "data", "params"))
    train_update_network(inference, x_train, iterations=1500)
    e_step = GradientEStep(model, latent_dim=model.latent_dim, lr=0.05, num_steps=1000, num_samples=16)
    long_e_step = model.exact_elbo(x_test, e_step.infer(x_test).params).mean().item()
    closed_form = model.exact_elbo(x_test, model.mean_field_optimum(x_test)).mean().item()
    learned = model.exact_elbo(x_test, inference.infer(x_test).params).mean().item()
    prior = model.exact_elbo(x_test, inference.infer(x_test, num_steps=0).params).mean().item()
    print(f"ELBO per example: prior {prior:.3f}, learned (5 steps) {learned:.3f}, long E-step {long_e_step:.3f}, "
          f"closed-form mean-field optimum {closed_form:.3f}")
    assert closed_form - long_e_step < 0.1, "the E-step must find the optimum for the comparison to mean anything"
    assert long_e_step - prior > 100, "the prior is far from the optimum, so the test is not trivial"
    assert long_e_step - learned < 0.3
