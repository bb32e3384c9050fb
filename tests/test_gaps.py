"""The gap report on a linear-Gaussian model where every number is known.

Probabilistic PCA with non-orthogonal loadings: the exact posterior N(m, Λ⁻¹) is correlated, so the diagonal family's
best member (mean m, variances 1/Λᵢᵢ) falls short of log p(x) by the approximation gap ½(Σᵢ log Λᵢᵢ − log det Λ),
the same for every x, and any diagonal q's ELBO is known in closed form (``ProbabilisticPCA.exact_elbo``).
"""

from __future__ import annotations

import pytest
import torch

from learned_inference import GradientEStep, StandardEncoder
from learned_inference.gaps import GapReport, gap_report, mean_iwae_by_samples, samples_to_bound
from learned_inference.zoo import ProbabilisticPCA

LATENT = 3


def _model() -> tuple[ProbabilisticPCA, torch.Tensor, torch.Tensor]:
    """The model, 16 examples and the precision Λ of the exact posterior."""
    gen = torch.Generator().manual_seed(0)
    model = ProbabilisticPCA.random(data_dim=6, latent_dim=LATENT, generator=gen, dtype=torch.float64)
    weight = 0.6 * torch.randn(6, LATENT, generator=gen, dtype=torch.float64)
    weight[:, 1] = 0.8 * weight[:, 0] + 0.6 * weight[:, 1]  # two correlated loadings: z₀ and z₁ trade off
    with torch.no_grad():
        model.weight.copy_(weight)
    model.requires_grad_(False)
    precision = torch.eye(LATENT, dtype=torch.float64) + model.weight.T @ model.weight / model.log_var.exp()
    return model, model.sample(16, generator=gen), precision


def _rough_guess(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An amortized guess with a known amortization gap: half the exact posterior mean, variance 0.1."""
    loc = _model()[0].exact_posterior(x)[0]
    return 0.5 * loc, torch.full_like(loc, -2.3)


@pytest.fixture(scope="module")
def report() -> GapReport:
    model, x, _ = _model()
    methods = {"rough": StandardEncoder(model, latent_dim=LATENT, init=_rough_guess),
               "e-step": GradientEStep(model, latent_dim=LATENT, lr=0.03, num_steps=1000, num_samples=8)}
    return gap_report(model, methods, x, log_px=model.log_marginal(x), e_step_steps=1000,
                      e_step_lrs=(0.1, 0.03, 0.01), e_step_samples=8, reference="e-step", elbo_samples=2000,
                      iwae_samples=1024, max_samples=1024, generator=torch.Generator().manual_seed(1))


def test_the_gaps_match_their_closed_forms(report: GapReport) -> None:
    model, x, precision = _model()
    diagonal = precision.diagonal()
    exact_gap = 0.5 * (diagonal.log().sum() - torch.logdet(precision)).item()
    assert exact_gap > 0.5  # the diagonal family cannot reach log p(x) here
    best_loc = (x - model.bias) @ model.weight @ torch.linalg.inv(precision) / model.log_var.exp()
    best_elbo = model.exact_elbo(x, best_loc, -diagonal.log().expand_as(best_loc))
    rough_elbo = model.exact_elbo(x, *_rough_guess(x))
    for name, gaps in report.gaps.items():
        summary = gaps.summary()
        assert summary["approximation_gap"] == pytest.approx(exact_gap, abs=3 * summary["approximation_gap_se"] + 0.02)
        shortfall = best_elbo - gaps.best_elbo  # the E-steps' incomplete convergence, and Monte Carlo error
        assert shortfall.min() > -0.06, name  # above the family's optimum only by Monte Carlo error (s.e. ≈ 0.02)
        assert shortfall.max() < 0.1 and shortfall.mean() < 0.04, name
    rough = report.gaps["rough"]
    # a poor q's ELBO estimate is noisy per example (log weights spread by nats): compare the means over examples
    assert (rough.elbo - rough_elbo).mean().abs() < 0.1
    assert (rough.amortization_gap - (best_elbo - rough_elbo)).mean().abs() < 0.15
    assert rough.amortization_gap.mean() > 1.0
    assert report.gaps["e-step"].summary()["amortization_gap"] == pytest.approx(0.0, abs=0.05)


def test_gaps_are_nonnegative_within_error_and_sum_to_the_elbo_gap(report: GapReport) -> None:
    for gaps in report.gaps.values():
        summary = gaps.summary()
        for name in ("approximation_gap", "amortization_gap"):
            assert summary[name] > -2 * summary[f"{name}_se"] - 1e-3, (name, summary)
        torch.testing.assert_close(gaps.approximation_gap + gaps.amortization_gap, report.log_px - gaps.elbo)
        iwae_excess = (gaps.iwae - report.log_px).double()
        assert iwae_excess.mean() < 2 * iwae_excess.std() / 4  # a lower bound in expectation (s.e. over 16 examples)
        assert bool((gaps.iwae >= gaps.elbo - 0.01).all())


def test_a_tighter_proposal_needs_fewer_samples_to_reach_the_bound(report: GapReport) -> None:
    rough, e_step = report.gaps["rough"], report.gaps["e-step"]
    assert report.reference == "e-step" and report.bound == pytest.approx(e_step.iwae.mean().item())
    assert e_step.samples_to_bound is not None
    assert rough.samples_to_bound is None or 4 * e_step.samples_to_bound <= rough.samples_to_bound
    curve = list(rough.iwae_by_samples.values())
    assert curve == sorted(curve)  # the IWAE bound rises with k
    table = str(report)
    assert "| rough |" in table and "| e-step |" in table and "samples to bound" in table


def test_ais_gives_log_px_when_it_is_not_known() -> None:
    model, x, _ = _model()
    methods = {"e-step": GradientEStep(model, latent_dim=LATENT, lr=0.05, num_steps=300)}
    report = gap_report(model, methods, x[:4], ais_start="e-step",
                        ais_options={"num_chains": 32, "num_steps": 1000, "num_leapfrog": 5}, e_step_steps=10,
                        e_step_lrs=(0.03,), elbo_samples=100, iwae_samples=100, max_samples=64,
                        generator=torch.Generator().manual_seed(2))
    assert report.ais is not None and report.ais_seconds > 0
    assert (report.log_px - model.log_marginal(x[:4])).abs().max() < 0.05
    assert report.settings["ais_options"]["num_chains"] == 32


def test_pooled_iwae_and_the_bound_search() -> None:
    log_w = torch.randn(64, 3, dtype=torch.float64)
    curve = mean_iwae_by_samples(log_w, [1, 64])
    assert curve[1] == pytest.approx(log_w.mean().item())
    assert curve[64] == pytest.approx((torch.logsumexp(log_w, 0) - torch.log(torch.tensor(64.0))).mean().item())
    assert samples_to_bound({1: -3.0, 2: -2.0}, -1.0, tolerance=0.1) is None
    with pytest.raises(ValueError, match=r"sizes must be in 1\.\.64"):
        mean_iwae_by_samples(log_w, [128])


def test_bad_inputs_name_the_argument() -> None:
    model, x, _ = _model()
    method = {"e-step": GradientEStep(model, latent_dim=LATENT, num_steps=2)}
    with pytest.raises(ValueError, match="methods must name at least one"):
        gap_report(model, {}, x)
    with pytest.raises(ValueError, match="reference='encoder' is not one of the methods"):
        gap_report(model, method, x, reference="encoder")
    with pytest.raises(ValueError, match=r"log_px must be a tensor of shape \[16\]"):
        gap_report(model, method, x, log_px=torch.zeros(3))
