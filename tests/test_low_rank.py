"""LowRankGaussian: its maths against torch.distributions, positive definiteness, every method with it, hierarchical
use, checkpoints, and issue 30's two claims on a linear-Gaussian model with a correlated (rank-2) posterior.

The correlated model (:func:`_correlated_ppca`): probabilistic PCA whose exact posterior covariance is
Σ* = 0.05 I + C Cᵀ with C two orthogonal columns of norms 0.9 and 0.8 in 6 latent dimensions, the same for every
x. A rank-2 low-rank Gaussian contains the exact posterior; the best diagonal Gaussian (variances 1/Λᵢᵢ, Λ = Σ*⁻¹)
falls short of log p(x) by ½ (Σᵢ log Λᵢᵢ − log det Λ) = 1.41 nats for every x. For any Gaussian q = N(m, S) the
ELBO is known in closed form, log p(x, m) − ½ tr(Λ S) + H[q] (log p(x, z) is quadratic in z with Hessian −Λ).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributions import Distribution, LowRankMultivariateNormal, MultivariateNormal, kl_divergence

from learned_inference import (
    DecoderModel,
    GaussianMixture,
    GradientEStep,
    IterativeInferenceOptimizer,
    LowRankGaussian,
    SemiAmortized,
    StandardEncoder,
)
from learned_inference.checkpoint import load_checkpoint, save_checkpoint
from learned_inference.evaluation import amortization_gap, importance_weighted_log_marginal
from learned_inference.families import make_family
from learned_inference.latent_space import LatentSpace
from learned_inference.objectives import elbo_and_grad
from learned_inference.zoo import LinearGaussianHierarchy, ProbabilisticPCA
from tests.conftest import mlp_decoder

D, X = 6, 10


def _params(gen: torch.Generator, batch: int, dim: int, rank: int, *, scale: float = 1.0) -> dict[str, torch.Tensor]:
    def draw(*shape: int) -> torch.Tensor:
        return scale * torch.randn(*shape, generator=gen, dtype=torch.float64)
    return {"loc": draw(batch, dim), "factor": draw(batch, dim * rank), "log_var": 0.5 * draw(batch, dim)}


def _reference(params: dict[str, torch.Tensor], rank: int) -> LowRankMultivariateNormal:
    factor = params["factor"].reshape(*params["loc"].shape, rank)
    return LowRankMultivariateNormal(params["loc"], factor, params["log_var"].exp())


def _correlated_ppca() -> tuple[ProbabilisticPCA, torch.Tensor]:
    """The model of the module docstring and its posterior precision Λ."""
    gen = torch.Generator().manual_seed(0)
    columns, _ = torch.linalg.qr(torch.randn(D, 2, dtype=torch.float64, generator=gen))
    factor = columns * torch.tensor([0.9, 0.8], dtype=torch.float64)
    precision = torch.linalg.inv(0.05 * torch.eye(D, dtype=torch.float64) + factor @ factor.T)
    values, vectors = torch.linalg.eigh(precision - torch.eye(D, dtype=torch.float64))  # WᵀW / s² = Λ − I ⪰ 0
    root = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
    rotation, _ = torch.linalg.qr(torch.randn(X, D, dtype=torch.float64, generator=gen))
    log_var = math.log(0.1)
    model = ProbabilisticPCA(math.exp(0.5 * log_var) * rotation @ root, 0.5 * torch.randn(X, dtype=torch.float64,
                                                                                            generator=gen),
                             log_var=log_var)
    return model.requires_grad_(False), precision


def _gaussian_elbo(model: ProbabilisticPCA | LinearGaussianHierarchy, x: torch.Tensor, precision: torch.Tensor,
                   posterior: Distribution | dict[str, Distribution]) -> torch.Tensor:
    """The exact ELBO ``[B]`` of a low-rank Gaussian posterior (one, or one per variable: block-diagonal)."""
    parts = list(posterior.values()) if isinstance(posterior, dict) else [posterior]
    blocks = zip(*[q.covariance_matrix for q in parts], strict=True)  # per example, one block per variable
    covariance = torch.stack([torch.block_diag(*example) for example in blocks])
    mean = {name: q.mean for name, q in posterior.items()} if isinstance(posterior, dict) else posterior.mean
    entropy = sum(q.entropy() for q in parts)
    return model.log_joint(x, mean) - 0.5 * (precision * covariance).sum((-1, -2)) + entropy


# -- the family's maths ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("dim", "rank"), [(5, 1), (5, 2), (4, 4), (2, 3)])
def test_log_prob_entropy_and_kl_match_torch(dim: int, rank: int) -> None:
    gen = torch.Generator().manual_seed(rank)
    family, params = LowRankGaussian(rank), _params(gen, 3, dim, rank)
    reference = _reference(params, rank)
    z = torch.randn(7, 3, dim, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(family.log_prob(params, z), reference.log_prob(z))
    torch.testing.assert_close(family.entropy(params), reference.entropy())
    assert isinstance(family.distribution(params), LowRankMultivariateNormal)
    torch.testing.assert_close(family.distribution(params).log_prob(z), reference.log_prob(z))
    prior_loc = torch.randn(dim, generator=gen, dtype=torch.float64)
    prior_var = torch.rand(dim, generator=gen, dtype=torch.float64) + 0.5
    full = MultivariateNormal(params["loc"], reference.covariance_matrix)
    expected = kl_divergence(full, MultivariateNormal(prior_loc, torch.diag(prior_var)))
    torch.testing.assert_close(family.kl_divergence(params, prior_loc, prior_var), expected)


def test_samples_have_the_mean_and_covariance_of_q() -> None:
    gen = torch.Generator().manual_seed(0)
    family, params = LowRankGaussian(2), _params(gen, 2, 4, 2)
    noise = torch.randn(200_000, 2, 4, generator=gen, dtype=torch.float64)
    z = family.sample(params, noise)
    centred = z - z.mean(0)
    covariance = torch.einsum("sbi,sbj->bij", centred, centred) / (len(z) - 1)
    expected = _reference(params, 2).covariance_matrix
    assert float((z.mean(0) - params["loc"]).abs().max()) < 0.02
    assert float(((covariance - expected).abs() / expected.diagonal(dim1=-2, dim2=-1).sqrt().unsqueeze(-1)
                  / expected.diagonal(dim1=-2, dim2=-1).sqrt().unsqueeze(-2)).max()) < 0.02  # correlation units
    # the sampler uses exactly D noise dimensions and is deterministic in them
    torch.testing.assert_close(family.sample(params, noise[:3]), z[:3])


def test_the_start_is_the_diagonal_gaussian_exactly_with_a_nonzero_factor() -> None:
    family = LowRankGaussian(2, init_factor_share=0.3)
    loc, log_var = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    params = family.from_diagonal(loc, log_var)
    covariance = family.distribution(params).covariance_matrix
    torch.testing.assert_close(covariance, torch.diag_embed(log_var.exp()))
    assert bool((params["factor"].abs().sum(-1) > 0).all())
    prior = family.initial_params(5, 3, dtype=torch.float64, device=None)
    torch.testing.assert_close(family.distribution(prior).covariance_matrix, torch.eye(3, dtype=torch.float64)
                               .expand(5, 3, 3))
    assert isinstance(make_family("low_rank"), LowRankGaussian) and make_family("low_rank").rank == 2


finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)


@settings(deadline=None, max_examples=60)
@given(st.integers(1, 6), st.integers(1, 3), st.lists(finite, min_size=1, max_size=80), finite,
       st.sampled_from([torch.float32, torch.float64]))
def test_constrain_keeps_the_covariance_positive_definite(
    dim: int, rank: int, values: list[float], loc: float, dtype: torch.dtype
) -> None:
    """Whatever a step proposes (parallel columns, a vanishing diagonal), the constrained λ is a valid Gaussian
    whose capacitance factors, in float32 too: σ² ≥ e^{low} > 0, |W| bounded, σᵢ² ≥ κ (W Wᵀ)ᵢᵢ."""
    family = LowRankGaussian(rank)
    pool = torch.tensor(values, dtype=dtype)
    pick = pool[torch.arange(dim * (rank + 1)) % len(pool)]
    factor, log_var = pick[: dim * rank].reshape(1, -1), pick[dim * rank:].reshape(1, -1)
    params = family.constrain({"loc": torch.full((1, dim), loc, dtype=dtype), "factor": factor, "log_var": log_var})
    low, high = family.log_var_bounds
    assert bool(((params["log_var"] >= low) & (params["log_var"] <= high)).all())
    assert float(params["factor"].abs().max()) <= family.factor_bound * (1 + 1e-6)  # up to float32 rounding
    rows = params["factor"].reshape(dim, rank).double().square().sum(-1)
    assert bool((params["log_var"][0].double().exp() >= family.min_diagonal_share * rows * (1 - 1e-5)).all())
    covariance = family.distribution({n: v.double() for n, v in params.items()}).covariance_matrix
    assert float(torch.linalg.eigvalsh(covariance).min()) >= math.exp(low) * (1 - 1e-6)
    z = family.sample(params, torch.randn(4, 1, dim, dtype=dtype))
    assert bool(torch.isfinite(family.log_prob(params, z)).all() and torch.isfinite(family.entropy(params)).all())


def test_natural_gradient_inverts_the_metric_that_bounds_the_fisher_information() -> None:
    """F⁻¹: Σ ∇_μ for the mean; ½ Δᵀ M Δ (squared_fisher_norm) is consistent with it and bounds the KL from above
    to second order (the joint Fisher of q(u, z) dominates the marginal's)."""
    gen = torch.Generator().manual_seed(3)
    family, params = LowRankGaussian(2), _params(gen, 4, 5, 2)
    grads = _params(gen, 4, 5, 2)
    natural = family.natural_gradient(params, grads)
    covariance = _reference(params, 2).covariance_matrix
    torch.testing.assert_close(natural["loc"], (covariance @ grads["loc"].unsqueeze(-1)).squeeze(-1))
    inner = sum((grads[name] * natural[name]).sum(-1) for name in grads)
    torch.testing.assert_close(family.squared_fisher_norm(params, natural), inner)
    for _ in range(5):
        step = {name: 1e-3 * value for name, value in _params(gen, 4, 5, 2).items()}
        moved = _reference({name: params[name] + step[name] for name in params}, 2)
        kl = kl_divergence(_reference(params, 2), moved)
        assert bool((0.5 * family.squared_fisher_norm(params, step) >= kl * (1 - 1e-3)).all())


def test_the_lambda_gradient_through_torch_func_is_the_gradient_of_the_exact_elbo() -> None:
    gen = torch.Generator().manual_seed(0)  # non-orthogonal loadings, unit noise: a correlated, mild posterior
    model = ProbabilisticPCA(0.6 * torch.randn(X, D, generator=gen, dtype=torch.float64),
                             torch.zeros(X, dtype=torch.float64), log_var=0.0).requires_grad_(False)
    precision = torch.eye(D, dtype=torch.float64) + model.weight.T @ model.weight
    family, space = LowRankGaussian(2), LatentSpace(D)
    x = model.sample(3, generator=gen)
    params = family.constrain(_params(gen, 3, D, 2, scale=0.5))
    noise = torch.randn(40_000, 3, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    noise = torch.cat([noise, -noise])
    _, grads = elbo_and_grad(model, family, params, x, noise, space=space)
    lam = {name: value.clone().requires_grad_() for name, value in params.items()}
    exact = _gaussian_elbo(model, x, precision, family.distribution(lam)).sum()
    expected = dict(zip(lam, torch.autograd.grad(exact, list(lam.values())), strict=True))
    for name in params:  # Monte Carlo error: about 1% of the gradient's scale with these 80,000 samples
        torch.testing.assert_close(grads[name], expected[name], rtol=0, atol=0.03 * float(expected[name].abs().max()))


# -- every method --------------------------------------------------------------------------------------------------


def _small_model() -> DecoderModel:
    model = DecoderModel(mlp_decoder(3, 8), likelihood="bernoulli", latent_dim=3)
    model.encode = lambda x: (0.1 * x[:, :3], -1.0 + 0.1 * x[:, 3:6])  # a (loc, log_var) encoder
    return model


def _loss_falls(method: torch.nn.Module, x: torch.Tensor, *, iterations: int, by: float) -> bool:
    """Whether ``iterations`` Adam steps on ``method(x).loss`` lower it (on common noise) by more than ``by``."""
    noise = torch.randn(method.num_steps + 1, method.num_samples, len(x), method.space.total_dim, dtype=x.dtype)
    optim = torch.optim.Adam(method.parameters(), lr=3e-3)
    with torch.no_grad():
        before = float(method(x, noise=noise).loss)
    for _ in range(iterations):
        optim.zero_grad()
        method(x).loss.backward()
        optim.step()
    with torch.no_grad():
        return float(method(x, noise=noise).loss) < before - by


def test_every_method_runs_and_trains_with_the_low_rank_family() -> None:
    model, _ = _correlated_ppca()
    x = model.sample(32, generator=torch.Generator().manual_seed(0))
    trainable = {
        "standard encoder": StandardEncoder(model, latent_dim=D, family="low_rank", init="highway", hidden_size=16),
        "semi-amortized": SemiAmortized(model, latent_dim=D, family="low_rank", init="highway", hidden_size=16,
                                        num_steps=3, lr=0.01),
        "learned optimizer": IterativeInferenceOptimizer(model, latent_dim=D, family="low_rank", num_steps=3,
                                                         hidden_size=16, data_shape=(X,)),
    }
    for name, method in trainable.items():
        method.double()
        result = method.infer(x, num_steps=2)
        assert result.params["factor"].shape == (32, 2 * D), name
        assert isinstance(result.posterior, LowRankMultivariateNormal), name
        assert _loss_falls(method, x, iterations=50, by=5.0), name
    stopped = trainable["learned optimizer"].infer(x, num_steps=6, tol=1e-3, keep_best=True)  # the engine's watches
    assert bool((stopped.steps <= 6).all()) and bool(torch.isfinite(stopped.elbo).all())
    e_step = GradientEStep(model, latent_dim=D, family=LowRankGaussian(2), num_steps=30, lr=0.05, num_samples=4)
    elbo = e_step.infer(x).elbo.mean(1)
    assert float(elbo[-1]) > float(elbo[0]) + 5.0


def test_a_diagonal_encoder_starts_every_method_at_its_gaussian() -> None:
    """init="encoder" with model.encode's (loc, log_var): λ_0 is that diagonal Gaussian, the factor non-zero."""
    model = _small_model()
    x = torch.rand(5, 8, dtype=torch.float64)
    loc, log_var = model.encode(x)
    methods = [
        IterativeInferenceOptimizer(model, latent_dim=3, family="low_rank", init="encoder", hidden_size=8),
        GradientEStep(model, latent_dim=3, family="low_rank", init="encoder"),
        SemiAmortized(model, latent_dim=3, family="low_rank", init="encoder"),
        StandardEncoder(model, latent_dim=3, family="low_rank", init="encoder"),
    ]
    for method in methods:
        method.double()
        result = method.infer(x, num_steps=0)
        torch.testing.assert_close(result.posterior.mean, loc)
        torch.testing.assert_close(result.posterior.covariance_matrix, torch.diag_embed(log_var.exp()))
        assert bool((result.params["factor"] != 0).any())


def test_hierarchical_latents_get_a_low_rank_factor_per_variable() -> None:
    """A factor per variable (ranks 3 and 2 on sizes 3 and 2: every block-diagonal Gaussian) on a two-level
    linear-Gaussian model with correlated loadings: E-steps from the mean-field optimum gain the 1.1 nats the
    correlations within a level are worth and reach the best block-diagonal Gaussian; the learned optimizer with a
    network per variable trains; λ round-trips through init_params."""
    gen = torch.Generator().manual_seed(0)
    model = LinearGaussianHierarchy.random(data_dim=8, latent_dims=(3, 2), log_var=math.log(0.5),
                                           dtype=torch.float64, generator=gen)
    with torch.no_grad():  # z1's three loadings nearly (anti-)parallel
        model.weight[:, 1] = 0.9 * model.weight[:, 0] + 0.3 * model.weight[:, 1]
        model.weight[:, 2] = -0.9 * model.weight[:, 0] + 0.3 * model.weight[:, 2]
    model.requires_grad_(False)
    x = model.sample(8, generator=gen)
    precision = model.posterior_precision()
    blocks = [precision[:3, :3], precision[3:, 3:]]
    best = model.log_marginal(x) - 0.5 * (sum(torch.logdet(b) for b in blocks) - torch.logdet(precision))
    mean_field = model.exact_elbo(x, model.mean_field_optimum(x))
    assert float((best - mean_field).min()) > 1.0
    family = {"z1": LowRankGaussian(3), "z2": LowRankGaussian(2)}
    start = {v: family[v].from_diagonal(p["loc"], p["log_var"]) for v, p in model.mean_field_optimum(x).items()}
    result = GradientEStep(model, latent_dim=model.latent_dim, family=family, num_steps=200, lr=0.03,
                           num_samples=16).infer(x, init_params=start)
    result = GradientEStep(model, latent_dim=model.latent_dim, family=family, num_steps=200, lr=0.005,
                           num_samples=16).infer(x, init_params=result.params)
    assert result.params["z1"]["factor"].shape == (8, 9) and result.params["z2"]["factor"].shape == (8, 4)
    assert isinstance(result.posterior, dict) and isinstance(result.posterior["z1"], LowRankMultivariateNormal)
    gap = best - _gaussian_elbo(model, x, precision, result.posterior)
    assert float(gap.mean()) < 0.05 and float(gap.max()) < 0.1 and float(gap.min()) > -1e-9, gap
    inference = IterativeInferenceOptimizer(model, latent_dim=model.latent_dim, family=family, num_steps=2,
                                            network={"z1": "highway", "z2": "highway"}, hidden_size=16,
                                            data_shape=(8,)).double()
    assert _loss_falls(inference, x, iterations=50, by=5.0)
    refined = inference.infer(x, init_params=result.params, num_steps=0)
    torch.testing.assert_close(refined.params["z1"]["factor"], result.params["z1"]["factor"])


def test_checkpoint_round_trip_of_a_learned_optimizer_with_the_family(tmp_path) -> None:
    model = _small_model()
    x = torch.rand(4, 8, dtype=torch.float64)
    make = lambda: IterativeInferenceOptimizer(model, latent_dim=3, family=LowRankGaussian(2), num_steps=2,  # noqa: E731
                                               hidden_size=8, data_shape=(8,)).double()
    saved, loaded = make(), make()
    save_checkpoint(tmp_path / "run.pt", step=1, inference=saved)
    load_checkpoint(tmp_path / "run.pt", inference=loaded)
    noise = torch.randn(3, 2, 4, 3, dtype=torch.float64)
    for name, value in saved.infer(x, noise=noise).params.items():
        torch.testing.assert_close(loaded.infer(x, noise=noise).params[name], value)


def test_iwae_with_the_exact_low_rank_posterior_is_exact() -> None:
    model, precision = _correlated_ppca()
    x = model.sample(4, generator=torch.Generator().manual_seed(1))
    covariance = torch.linalg.inv(precision)
    loc = (x - model.bias) @ model.weight @ covariance / model.log_var.exp()
    values, vectors = torch.linalg.eigh(covariance)  # exact: Σ* = 0.05 I + rank 2, the top two eigenpairs
    factor = (vectors[:, -2:] * (values[-2:] - 0.05).sqrt()).reshape(1, -1).expand(4, -1)
    params = {"loc": loc, "factor": factor, "log_var": torch.full_like(loc, math.log(0.05))}
    estimate = importance_weighted_log_marginal(model, LowRankGaussian(2).distribution(params), x, num_samples=16)
    torch.testing.assert_close(estimate, model.log_marginal(x).double())
    start = StandardEncoder(model, latent_dim=D, family="low_rank", init=lambda x: (loc, torch.zeros_like(loc)))
    e_step = GradientEStep(model, latent_dim=D, family="low_rank", num_steps=300, lr=0.03, num_samples=16)
    gap = amortization_gap(start.infer(x), x, e_step=e_step, num_samples=2000)  # a unit-variance guess, mean exact
    assert float(gap.min()) > 1.0


def test_clear_errors() -> None:
    with pytest.raises(ValueError, match="rank"):
        LowRankGaussian(0)
    with pytest.raises(ValueError, match="init_factor_share must be in"):
        LowRankGaussian(2, init_factor_share=0.0)
    with pytest.raises(ValueError, match="min_diagonal_share"):
        LowRankGaussian(2, min_diagonal_share=1.0)
    with pytest.raises(ValueError, match="log_var_bounds"):
        LowRankGaussian(2, log_var_bounds=(1.0, 0.0))
    half = LowRankGaussian(2).initial_params(3, 4, dtype=torch.bfloat16, device=None)
    with pytest.raises(TypeError, match=r"float32 or float64, got torch.bfloat16.*torch.autocast"):
        LowRankGaussian(2).entropy(half)
    model = DecoderModel(mlp_decoder(2, 6), likelihood="bernoulli", latent_dim=2)
    with pytest.raises(ValueError, match="share their parameter names"):
        GradientEStep(model, latent_dim={"a": 1, "b": 1}, family={"a": "low_rank", "b": "diagonal_gaussian"})
    with pytest.raises(ValueError, match=r"\['a', 'b'\] weight their points.*single latent vector"):
        GradientEStep(model, latent_dim={"a": 1, "b": 1}, family={"a": GaussianMixture(2), "b": GaussianMixture(2)})


# -- issue 30, item 1 ----------------------------------------------------------------------------------------------


def test_low_rank_e_step_reaches_log_px_where_the_diagonal_family_cannot() -> None:
    """The rank-2 E-step (Adam, 400 steps at lr 0.03 then 400 at 0.005, 64 samples) ends within 0.05 nats of log p(x)
    on every example (measured: 0.009 on average, 0.024 at most); the best diagonal Gaussian stays 1.41 nats below
    (closed form, for every x), and the diagonal E-step with it (measured: 1.42 on average)."""
    model, precision = _correlated_ppca()
    x = model.sample(32, generator=torch.Generator().manual_seed(1))
    log_px = model.log_marginal(x)
    diagonal_gap = 0.5 * (precision.diagonal().log().sum() - torch.logdet(precision))
    assert float(diagonal_gap) == pytest.approx(1.408, abs=1e-3)
    family = LowRankGaussian(2)
    result = GradientEStep(model, latent_dim=D, family=family, num_steps=400, lr=0.03, num_samples=64).infer(x)
    result = GradientEStep(model, latent_dim=D, family=family, num_steps=400, lr=0.005, num_samples=64).infer(
        x, init_params=result.params)
    low_rank_gap = log_px - _gaussian_elbo(model, x, precision, result.posterior)
    assert float(low_rank_gap.max()) < 0.05 and float(low_rank_gap.min()) > -1e-9, low_rank_gap
    diagonal = GradientEStep(model, latent_dim=D, num_steps=400, lr=0.03, num_samples=64).infer(x)
    diagonal_elbo = model.exact_elbo(x, diagonal.params["loc"], diagonal.params["log_var"])
    assert float((log_px - diagonal_elbo).min()) > float(diagonal_gap) - 1e-6


def test_learned_optimizer_with_the_low_rank_family_closes_the_diagonal_gap() -> None:
    """Trained on the correlated model (5 steps, 8 samples, 600 batches), the learned optimizer's ELBO after 20 steps
    from the prior is within 10% of the diagonal-to-low-rank gap (1.41 nats) of log p(x) on fresh data: ≥ 90% of it
    closed (measured: 93% after 1 step, 97% after 5, 98% after 20; 0.034 nats below log p(x))."""
    torch.manual_seed(0)
    model, precision = _correlated_ppca()
    inference = IterativeInferenceOptimizer(model, latent_dim=D, family=LowRankGaussian(2), num_steps=5,
                                            num_samples=8, hidden_size=64, data_shape=(X,)).double()
    optim = torch.optim.Adam(inference.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(5)
    for _ in range(600):
        optim.zero_grad()
        inference(model.sample(64, generator=gen)).loss.backward()
        optim.step()
    x = model.sample(64, generator=torch.Generator().manual_seed(99))
    log_px = model.log_marginal(x)
    diagonal_gap = 0.5 * (precision.diagonal().log().sum() - torch.logdet(precision))
    best_diagonal = log_px - diagonal_gap
    elbo = _gaussian_elbo(model, x, precision, inference.infer(x, num_steps=20).posterior)
    closed = float(((elbo - best_diagonal) / diagonal_gap).mean())
    assert closed >= 0.9, closed
