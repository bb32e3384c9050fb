"""Annealed importance sampling against the exact log p(x) of linear-Gaussian models, and its API.

Settings of the exactness test: probabilistic PCA with 8 data and 3 latent dimensions (noise variance 0.1), 4 examples,
float64; from the prior: K = 512 chains, T = 1000 annealing steps (sigmoid schedule), L = 5 leapfrog steps, the step
size adapted toward an acceptance rate of 0.9 (the default); about 10 s on one thread. Each example's standard error is
then about 0.02 nats (log weights spread with a standard deviation of 0.4-0.55 over the chains).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.distributions import Independent, MultivariateNormal, Normal

from learned_inference import DecoderModel
from learned_inference.ais import AISResult, annealed_importance_sampling, hmc_transition, sigmoid_schedule
from learned_inference.zoo import LinearGaussianHierarchy, ProbabilisticPCA


def _ppca(*, correlated: bool = False) -> tuple[ProbabilisticPCA, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    model = ProbabilisticPCA.random(data_dim=8, latent_dim=3, generator=gen, dtype=torch.float64)
    if correlated:  # non-orthogonal loadings: the exact posterior has correlations a diagonal q cannot express
        with torch.no_grad():
            model.weight.copy_(torch.randn(8, 3, generator=gen, dtype=torch.float64))
    return model.requires_grad_(False), model.sample(4, generator=gen)


def _exact_posterior(model: ProbabilisticPCA, x: torch.Tensor) -> MultivariateNormal:
    w, var = model.weight, model.log_var.exp()
    covariance = torch.linalg.inv(torch.eye(3, dtype=w.dtype) + w.T @ w / var)
    return MultivariateNormal((x - model.bias) @ w @ covariance / var, covariance_matrix=covariance)


@pytest.fixture(scope="module")
def annealed() -> AISResult:
    model, x = _ppca()
    return annealed_importance_sampling(model, x, num_chains=512, num_steps=1000, num_leapfrog=5,
                                        generator=torch.Generator().manual_seed(1))


def test_ais_from_the_prior_matches_the_exact_log_marginal_within_0_05_nats(annealed: AISResult) -> None:
    model, x = _ppca()
    result = annealed
    error = result.log_px - model.log_marginal(x)
    assert error.abs().max() < 0.05, error
    assert result.standard_error.max() < 0.04
    assert ((result.acceptance > 0.8) & (result.acceptance < 1.0)).all()


def test_ais_on_a_correlated_posterior_from_a_diagonal_start_is_exact_where_its_elbo_is_not() -> None:
    model, x = _ppca(correlated=True)
    exact = _exact_posterior(model, x)
    diagonal = Independent(Normal(exact.loc, exact.covariance_matrix.diagonal(dim1=-2, dim2=-1).sqrt()), 1)
    z = diagonal.sample((2000,))
    elbo = (model.log_joint(x, z) - diagonal.log_prob(z)).mean(0)
    result = annealed_importance_sampling(model, x, initial=diagonal, num_chains=32, num_steps=300, num_leapfrog=5,
                                          generator=torch.Generator().manual_seed(2))
    log_px = model.log_marginal(x)
    assert (log_px - elbo).min() > 0.1  # the diagonal family's gap is real here
    assert (result.log_px - log_px).abs().max() < 0.05


def test_ais_from_the_exact_posterior_is_exact_whatever_the_steps() -> None:
    model, x = _ppca(correlated=True)
    result = annealed_importance_sampling(model, x, initial=_exact_posterior(model, x), num_chains=4, num_steps=3,
                                          num_leapfrog=2)
    torch.testing.assert_close(result.log_px, model.log_marginal(x), atol=1e-9, rtol=0)
    assert result.log_weight_std.max() < 1e-9


def test_one_annealing_step_is_plain_importance_sampling_and_visibly_worse(annealed: AISResult) -> None:
    model, x = _ppca()
    gen = torch.Generator().manual_seed(3)
    one = annealed_importance_sampling(model, x, num_chains=512, num_steps=1, generator=gen)
    # with β = (0, 1) the weights are p(x, z0) / p(z0) at prior draws z0: importance sampling from the prior
    torch.testing.assert_close(one.log_weights, model.log_likelihood(x, _first_draws(gen_seed=3, shape=(512, 4, 3))))
    exact = model.log_marginal(x)
    assert (one.log_px - exact).abs().max() > 5 * (annealed.log_px - exact).abs().max()
    assert one.log_weight_std.min() > 5 * annealed.log_weight_std.max()


def _first_draws(*, gen_seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The prior draws z0 that a run seeded with ``Generator().manual_seed(gen_seed)`` starts from."""
    seed = int(torch.randint(2 ** 62, (), generator=torch.Generator().manual_seed(gen_seed)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Independent(Normal(torch.zeros(3, dtype=torch.float64), 1.0), 1).sample(shape[:2])


def test_hmc_transition_leaves_a_gaussian_invariant() -> None:
    def log_density(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return -0.5 * (z / 2).square().sum(-1), -z / 4

    z = 2 * torch.randn(20000, 1, 2, dtype=torch.float64)
    value, grad = log_density(z)
    for _ in range(5):
        z, value, grad, _, _ = hmc_transition(log_density, z, value, grad, step_size=torch.tensor(1.5), num_leapfrog=3)
    assert z.std(0).sub(2).abs().max() < 0.05 and z.mean(0).abs().max() < 0.05


def test_the_schedule_is_increasing_from_zero_to_one() -> None:
    betas = sigmoid_schedule(50)
    assert betas[0] == 0 and betas[-1] == 1 and bool((betas.diff() > 0).all())


@given(batch=st.integers(1, 4), chains=st.integers(1, 5), dim=st.integers(1, 3), steps=st.integers(1, 6),
       seed=st.integers(0, 1000))
def test_ais_api_shapes_ranges_and_seeding(batch: int, chains: int, dim: int, steps: int, seed: int) -> None:
    model = DecoderModel(torch.nn.Linear(dim, 5), likelihood="bernoulli", latent_dim=dim).requires_grad_(False)
    x = torch.bernoulli(torch.full((batch, 5), 0.5, dtype=torch.float32),
                        generator=torch.Generator().manual_seed(seed))
    state = torch.random.get_rng_state()
    runs = [annealed_importance_sampling(model, x, num_chains=chains, num_steps=steps, num_leapfrog=2,
                                         generator=torch.Generator().manual_seed(seed)) for _ in range(2)]
    assert torch.equal(torch.random.get_rng_state(), state)  # the global generator is left alone
    first, second = runs
    assert torch.equal(first.log_px, second.log_px)
    assert first.log_px.shape == (batch,) and first.log_weights.shape == (chains, batch)
    assert first.log_px.dtype == torch.float64 and bool(torch.isfinite(first.log_px).all())
    assert bool((first.log_px <= first.log_weights.max(0).values + 1e-9).all())
    assert bool(((first.acceptance >= 0) & (first.acceptance <= 1)).all())
    assert bool((first.standard_error >= 0).all()) and first.betas.shape == (steps + 1,)


def test_bad_inputs_name_the_argument_and_the_fix() -> None:
    model, x = _ppca()
    with pytest.raises(ValueError, match=r"initial must have batch shape \[\] or \[4\]"):
        annealed_importance_sampling(model, x, initial=Independent(Normal(torch.zeros(3, 3), 1.0), 1))
    with pytest.raises(ValueError, match="betas must be a 1-D tensor increasing"):
        annealed_importance_sampling(model, x, betas=torch.tensor([0.0, 0.7, 0.5, 1.0]))
    with pytest.raises(ValueError, match="target_acceptance must be in"):
        annealed_importance_sampling(model, x, target_acceptance=1.5)
    with pytest.raises(ValueError, match="num_chains must be an int >= 1"):
        annealed_importance_sampling(model, x, num_chains=0)
    hierarchy = LinearGaussianHierarchy.random(data_dim=6, latent_dims=(3, 2))
    with pytest.raises(NotImplementedError, match="single latent vector"):
        annealed_importance_sampling(hierarchy, torch.zeros(2, 6))

    class NoPrior(torch.nn.Module):
        def log_joint(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
            # z ~ N(0, I_2), x.sum() | z ~ N(z.sum(), 1)
            return -0.5 * z.square().sum(-1) - 0.5 * (x.sum(-1) - z.sum(-1)).square() - 1.5 * math.log(2 * math.pi)

    with pytest.raises(ValueError, match="pass latent_dim="):
        annealed_importance_sampling(NoPrior(), torch.zeros(2, 3))
    result = annealed_importance_sampling(NoPrior(), torch.zeros(2, 3), latent_dim=2, num_chains=64, num_steps=200,
                                          generator=torch.Generator().manual_seed(0))
    exact = -0.5 * math.log(2 * math.pi * 3)  # x.sum() = 0 ~ N(0, 1 + 2)
    assert (result.log_px - exact).abs().max() < 0.05
