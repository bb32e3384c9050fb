"""GaussianMixture: exact log q, the stratified ELBO estimator, symmetry breaking, and every method with it."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

from learned_inference import (
    DecoderModel,
    GradientEStep,
    IterativeInferenceOptimizer,
    SemiAmortized,
    StandardEncoder,
)
from learned_inference.evaluation import elbo_estimate, importance_weighted_log_marginal
from learned_inference.latent_space import LatentSpace
from learned_inference.mixture import GaussianMixture
from learned_inference.objectives import Objective
from learned_inference.zoo import MixturePriorModel
from tests.conftest import mlp_decoder


def _bimodal() -> MixturePriorModel:
    """Prior ½N(−2, 0.5²) + ½N(2, 0.5²), noise 1: for x near 0 the posterior has two equal, separated modes."""
    return MixturePriorModel(torch.tensor([[-2.0], [2.0]], dtype=torch.float64), scale=0.5, noise_scale=1.0)


def _random_params(gen: torch.Generator, batch: int, k: int, d: int) -> dict[str, torch.Tensor]:
    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)
    return {"loc": draw(batch, k * d), "log_var": 0.5 * draw(batch, k * d), "logits": draw(batch, k)}


def test_mixture_e_step_reaches_the_exact_log_marginal_where_a_gaussian_cannot():
    model = _bimodal()
    x = torch.tensor([[0.0], [0.05], [-0.05]], dtype=torch.float64)
    exact = model.log_marginal(x)
    gaps = {}
    for name, family in [("mixture", GaussianMixture(2)), ("gaussian", "diagonal_gaussian")]:
        e_step = GradientEStep(model, latent_dim=1, family=family, lr=0.05, num_steps=300, num_samples=64)
        posterior = e_step.infer(x).posterior
        gaps[name] = exact - elbo_estimate(model, posterior, x, num_samples=20_000, chunk_size=5000)
    assert bool((gaps["mixture"].abs() < 0.05).all()), gaps
    assert bool((gaps["gaussian"] >= 0.5).all()), gaps


def test_the_exact_posterior_is_a_fixed_point_with_zero_gap_and_exact_iwae():
    model, family = _bimodal(), GaussianMixture(2)
    x = torch.tensor([[0.3], [-1.0]], dtype=torch.float64)
    params = model.exact_posterior(x)
    objective = Objective(model, family, LatentSpace(1))
    values, grads = objective.elbo_and_grad(params, x, torch.randn(4000, 2, 1, dtype=torch.float64))
    torch.testing.assert_close(values, model.log_marginal(x))  # log w is constant under the exact posterior
    for g in grads.values():  # zero in expectation (only the score term E_q[∇_λ log q] = 0 remains, as noise)
        assert float(g.abs().max()) < 0.05
    iwae = importance_weighted_log_marginal(model, family.distribution(params), x, num_samples=50)
    torch.testing.assert_close(iwae, model.log_marginal(x).double())


@given(seed=st.integers(0, 10_000), batch=st.integers(1, 4), k=st.integers(1, 4), d=st.integers(1, 3),
       samples=st.integers(1, 3))
def test_log_prob_equals_mixture_same_family(seed, batch, k, d, samples):
    gen = torch.Generator().manual_seed(seed)
    family, params = GaussianMixture(k), _random_params(gen, batch, k, d)
    z = torch.randn(samples, batch, d, generator=gen, dtype=torch.float64)
    reference = MixtureSameFamily(
        Categorical(logits=params["logits"]),
        Independent(Normal(params["loc"].reshape(batch, k, d), (0.5 * params["log_var"]).exp().reshape(batch, k, d)),
                    1),
    )
    torch.testing.assert_close(family.log_prob(params, z), reference.log_prob(z))
    torch.testing.assert_close(family.distribution(params).log_prob(z), reference.log_prob(z))


@given(seed=st.integers(0, 10_000), batch=st.integers(2, 5), j=st.integers(0, 4), k=st.integers(1, 3))
def test_changing_example_j_never_changes_example_i(seed, batch, j, k):
    gen = torch.Generator().manual_seed(seed)
    j = j % batch
    model = DecoderModel(mlp_decoder(2, 5), likelihood="bernoulli", latent_dim=2)
    objective = Objective(model, GaussianMixture(k), LatentSpace(2))
    x = torch.bernoulli(torch.full((batch, 5), 0.5, dtype=torch.float64), generator=gen)
    params = _random_params(gen, batch, k, 2)
    noise = torch.randn(3, batch, 2, generator=gen, dtype=torch.float64)
    changed_x, changed = x.clone(), {n: p.clone() for n, p in params.items()}
    changed_x[j] = 1 - changed_x[j]
    for p in changed.values():
        p[j] += 1.0
    values, grads = objective.elbo_and_grad(params, x, noise)
    values2, grads2 = objective.elbo_and_grad(changed, changed_x, noise)
    rows = [i for i in range(batch) if i != j]
    torch.testing.assert_close(values[rows], values2[rows], rtol=1e-12, atol=1e-12)
    for name in grads:
        torch.testing.assert_close(grads[name][rows], grads2[name][rows], rtol=1e-12, atol=1e-12)


def test_the_stratified_elbo_estimator_is_unbiased():
    """The mean of many one-sample stratified estimates matches a many-sample ELBO drawn from q itself."""
    gen = torch.Generator().manual_seed(0)
    model = DecoderModel(mlp_decoder(2, 6), likelihood="bernoulli", latent_dim=2)
    family = GaussianMixture(3)
    params = _random_params(gen, 1, 3, 2)
    x = torch.bernoulli(torch.full((1, 6), 0.5, dtype=torch.float64), generator=gen)
    repeats = 20_000
    tiled = {n: p.expand(repeats, -1) for n, p in params.items()}
    objective = Objective(model, family, LatentSpace(2))
    estimates = objective.elbo(tiled, x.expand(repeats, -1), torch.randn(1, repeats, 2, generator=gen,
                                                                         dtype=torch.float64))
    reference = elbo_estimate(model, family.distribution(params), x, num_samples=200_000, chunk_size=20_000)
    estimates = estimates.detach()
    standard_error = float(estimates.std()) / repeats ** 0.5
    assert abs(float(estimates.mean() - reference)) < 4 * standard_error + 5e-3, (estimates.mean(), reference)


def test_the_gradient_reaches_the_weights_through_the_mixture_probabilities():
    model = _bimodal()
    objective = Objective(model, GaussianMixture(2), LatentSpace(1))
    params = {"loc": torch.tensor([[-1.6, 1.6]], dtype=torch.float64),
              "log_var": torch.full((1, 2), -1.6, dtype=torch.float64),
              "logits": torch.tensor([[2.0, -2.0]], dtype=torch.float64)}
    _, grads = objective.elbo_and_grad(params, torch.zeros(1, 1, dtype=torch.float64),
                                       torch.randn(16, 1, 1, dtype=torch.float64))
    # the posterior's modes are equally likely: the ascent direction moves weight to the under-weighted one
    assert float(grads["logits"][0, 1]) > 0 > float(grads["logits"][0, 0])


def test_initialisation_breaks_the_symmetry_between_components():
    family = GaussianMixture(4)
    params = family.initial_params(3, 2, dtype=torch.float64, device=None)
    loc = params["loc"].reshape(3, 4, 2)
    distances = torch.cdist(loc[0], loc[0]) + torch.eye(4, dtype=torch.float64)
    assert float(distances.min()) > 0.1
    torch.testing.assert_close(loc[0], loc[1])  # the same start for every example
    torch.testing.assert_close(loc[0].mean(0), torch.zeros(2, dtype=torch.float64))  # around the prior mean
    torch.testing.assert_close(params["logits"].softmax(-1), torch.full((3, 4), 0.25, dtype=torch.float64))


def test_identical_components_never_split_which_is_why_the_start_differs():
    model = _bimodal()
    x = torch.zeros(1, 1, dtype=torch.float64)
    same = {"loc": torch.zeros(1, 2, dtype=torch.float64), "log_var": torch.zeros(1, 2, dtype=torch.float64),
            "logits": torch.zeros(1, 2, dtype=torch.float64)}
    e_step = GradientEStep(model, latent_dim=1, family=GaussianMixture(2), lr=0.05, num_steps=30, num_samples=8)
    loc = e_step.infer(x, init_params=same).params["loc"]
    assert float((loc[0, 0] - loc[0, 1]).abs()) < 1e-12


def test_constrain_keeps_weights_normalized_and_bounded():
    family = GaussianMixture(3, min_weight=1e-4)
    params = {"loc": torch.zeros(2, 3), "log_var": torch.full((2, 3), 50.0),
              "logits": torch.tensor([[0.0, 5.0, -100.0], [1.0, 1.0, 1.0]])}
    out = family.constrain(params)
    assert float(out["log_var"].max()) == family.log_var_bounds[1]
    assert float(out["logits"].min()) == pytest.approx(torch.log(torch.tensor(1e-4)).item())
    torch.testing.assert_close(out["logits"][1], torch.full((3,), -torch.log(torch.tensor(3.0)).item()))


def test_natural_gradient_divides_each_component_by_its_weight():
    family = GaussianMixture(2)
    params = {"loc": torch.zeros(1, 4), "log_var": torch.log(torch.full((1, 4), 2.0)),
              "logits": torch.log(torch.tensor([[0.25, 0.75]]))}
    grads = {name: torch.ones_like(value) for name, value in params.items()}
    natural = family.natural_gradient(params, grads)
    torch.testing.assert_close(natural["loc"], torch.tensor([[8.0, 8.0, 8 / 3, 8 / 3]]))
    torch.testing.assert_close(natural["log_var"], torch.tensor([[8.0, 8.0, 8 / 3, 8 / 3]]))
    torch.testing.assert_close(natural["logits"], torch.tensor([[4.0, 4 / 3]]))
    # the trust region's norm uses the metric the natural gradient inverts: ΔᵀFΔ = ∇ᵀF⁻¹∇ for Δ = F⁻¹∇
    inner = sum((natural[name] * grads[name]).sum(-1) for name in params)
    torch.testing.assert_close(family.squared_fisher_norm(params, natural), inner)


def _mixture_methods(model: DecoderModel) -> dict[str, torch.nn.Module]:
    family = GaussianMixture(3)
    small = {"hidden_size": 16}
    return {
        "standard": StandardEncoder(model, latent_dim=2, family=family, init="highway", **small),
        "e_step": GradientEStep(model, latent_dim=2, family=family, num_steps=3),
        "semi_amortized": SemiAmortized(model, latent_dim=2, family=family, init="highway", num_steps=2, **small),
        "iterative": IterativeInferenceOptimizer(model, latent_dim=2, family=family, num_steps=2, **small),
        "iterative_natural": IterativeInferenceOptimizer(model, latent_dim=2, family=family, num_steps=2,
                                                         update="natural_gradient", num_samples=2, **small),
    }


@pytest.mark.parametrize("name", ["standard", "e_step", "semi_amortized", "iterative", "iterative_natural"])
def test_every_method_trains_and_infers_with_a_mixture(name):
    model = DecoderModel(mlp_decoder(2, 6, dtype=torch.float32), likelihood="bernoulli", latent_dim=2)
    method = _mixture_methods(model)[name]
    x = torch.bernoulli(torch.full((5, 6), 0.5))
    result = method(x)
    result.loss.backward()
    trained = [p for p in [*model.parameters(), *method.parameters()] if p.grad is not None]
    assert trained and all(torch.isfinite(p.grad).all() for p in trained)
    inferred = method.infer(x, num_steps=2)
    assert isinstance(inferred.posterior, MixtureSameFamily)
    assert inferred.params["logits"].shape == (5, 3) and inferred.params["loc"].shape == (5, 6)
    assert bool(torch.isfinite(inferred.elbo).all())
    iwae = importance_weighted_log_marginal(model, inferred.posterior, x, num_samples=64, chunk_size=32)
    assert bool(torch.isfinite(iwae).all())


def test_the_learned_optimizer_refines_a_given_mixture():
    model = DecoderModel(mlp_decoder(2, 6, dtype=torch.float32), likelihood="bernoulli", latent_dim=2)
    refiner = _mixture_methods(model)["iterative"]
    x = torch.bernoulli(torch.full((4, 6), 0.5))
    start = GaussianMixture(3).initial_params(4, 2, dtype=torch.float32, device=None)
    start["logits"] = torch.log(torch.tensor([[0.7, 0.2, 0.1]])).expand(4, -1).clone()
    result = refiner.infer(x, init_params=start, num_steps=1, record_params=True)
    assert result.trajectory is not None
    torch.testing.assert_close(result.trajectory[0]["logits"], start["logits"])
    with pytest.raises(ValueError, match=r"init_params\['logits'\] must have shape \[4, 3\]"):
        refiner.infer(x, init_params={**start, "logits": start["logits"][:, :2]})


def test_clear_errors_for_unsupported_combinations():
    model = DecoderModel(mlp_decoder(2, 6, dtype=torch.float32), likelihood="bernoulli", latent_dim=2)
    with pytest.raises(ValueError, match="single latent vector"):
        GradientEStep(model, latent_dim={"a": 1, "b": 1}, family=GaussianMixture(2))
    with pytest.raises(ValueError, match="init='encoder'"):
        IterativeInferenceOptimizer(model, latent_dim=2, family=GaussianMixture(2), init="encoder")
    model.encode = lambda x: (torch.zeros(len(x), 2), torch.zeros(len(x), 2))  # a (loc, log_var) encoder
    with pytest.raises(ValueError, match=r"has parameters \['loc', 'log_var', 'logits'\]: use init='highway'"):
        StandardEncoder(model, latent_dim=2, family=GaussianMixture(2), init="encoder")
    with pytest.raises(ValueError, match="start from the prior"):
        IterativeInferenceOptimizer(model, latent_dim=2, family=GaussianMixture(2), init="encoder")
    with pytest.raises(ValueError, match="init_spread=0"):
        GaussianMixture(2, init_spread=0.0)
    with pytest.raises(ValueError, match="num_components"):
        GaussianMixture(0)
    lambda_encoder = StandardEncoder(model, latent_dim=2, family=GaussianMixture(2),
                                     init=lambda x: (torch.zeros(len(x), 2), torch.zeros(len(x), 2)))
    with pytest.raises(TypeError, match="needs an encoder returning all of λ"):
        lambda_encoder.infer(torch.ones(2, 6))
