"""λ-gradients against the paper's analytic forms (Marino et al. 2018, App. A).

Gaussian output: eqs. 8-9; Bernoulli output: eqs. 56-57. Both are assembled from the components derived in
App. A.2 (prior, eqs. 28-29), A.3 (log q, eq. 34) and A.4 (likelihood, eqs. 54-55 and the Bernoulli analogue):

    ∇μq L  = (∂μx/∂μq)ᵀ e_x − (z − μp)/σp²
    ∇σq² L = (∂μx/∂σq²)ᵀ e_x − (ε/(2σq)) ⊙ (z − μp)/σp² + 1/(2σq²)

with z = μq + σq ε, ∂μx/∂σq² = (∂μx/∂z) diag(ε/(2σq)), and e_x = (x − μx)/σx² (Gaussian) or
(x − μx)/(μx(1 − μx)) (Bernoulli). The last term is +1/(2σq²) because L contains −log q and eq. 34 gives
∇σq² E[log q] = −1/(2σq²). The library differentiates λ = (μq, log σq²), so ∇log σq² L = σq² ∇σq² L.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd.functional import jacobian

from learned_inference import DecoderModel, DiagonalGaussian, LatentSpace, elbo_and_grad, prior_moments
from tests.conftest import mlp_decoder

B, D, X = 5, 3, 7


def _analytic(model, x, loc, log_var, eps, *, error_weight, analytic_prior: bool):
    """The paper's gradients for each example, with the Jacobian of μx(z) from autograd."""
    sigma = torch.exp(0.5 * log_var)
    z = loc + sigma * eps
    grad_loc, grad_var = [], []
    for b in range(x.shape[0]):
        mean_x = model.likelihood_mean(z[b])
        jac = jacobian(model.likelihood_mean, z[b])  # ∂μx/∂z, [X, D]
        e_x = error_weight(x[b], mean_x)
        bottom_up = jac.T @ e_x
        if analytic_prior:  # E over ε of the prior terms: −(μq − μp)/σp² and −1/(2σp²)
            g_loc = bottom_up - loc[b]
            g_var = bottom_up * eps[b] / (2 * sigma[b]) - 0.5 + 1 / (2 * sigma[b] ** 2)
        else:
            g_loc = bottom_up - z[b]
            g_var = (bottom_up - z[b]) * eps[b] / (2 * sigma[b]) + 1 / (2 * sigma[b] ** 2)
        grad_loc.append(g_loc)
        grad_var.append(g_var)
    return torch.stack(grad_loc), torch.stack(grad_var)


def _library(model, x, loc, log_var, eps, *, analytic_prior: bool):
    space = LatentSpace(D)
    prior = prior_moments(model, space) if analytic_prior else None
    params = {"loc": loc, "log_var": log_var}
    _, grads = elbo_and_grad(model, DiagonalGaussian(), params, x, eps[None], space=space, prior=prior)
    return grads["loc"], grads["log_var"] / torch.exp(log_var)  # chain rule: ∇σ² = ∇log σ² / σ²


def _inputs(binary: bool):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(B, X, generator=gen, dtype=torch.float64)
    if binary:
        x = (x > 0).double()
    loc = torch.randn(B, D, generator=gen, dtype=torch.float64)
    log_var = 0.5 * torch.randn(B, D, generator=gen, dtype=torch.float64)
    eps = torch.randn(B, D, generator=gen, dtype=torch.float64)
    return x, loc, log_var, eps


@pytest.mark.parametrize("analytic_prior", [False, True], ids=["sampled-prior", "analytic-kl"])
def test_gaussian_output_matches_eqs_8_9(analytic_prior):
    log_var_x = math.log(0.3)
    model = DecoderModel(mlp_decoder(D, X), likelihood="gaussian", latent_dim=D, log_var=log_var_x)
    model.double()
    x, loc, log_var, eps = _inputs(binary=False)
    expected = _analytic(
        model, x, loc, log_var, eps, error_weight=lambda xb, m: (xb - m) / math.exp(log_var_x),
        analytic_prior=analytic_prior,
    )
    got = _library(model, x, loc, log_var, eps, analytic_prior=analytic_prior)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-10)


@pytest.mark.parametrize("analytic_prior", [False, True], ids=["sampled-prior", "analytic-kl"])
def test_bernoulli_output_matches_eqs_56_57(analytic_prior):
    model = DecoderModel(mlp_decoder(D, X), likelihood="bernoulli", latent_dim=D).double()
    x, loc, log_var, eps = _inputs(binary=True)
    expected = _analytic(
        model, x, loc, log_var, eps, error_weight=lambda xb, m: (xb - m) / (m * (1 - m)),
        analytic_prior=analytic_prior,
    )
    got = _library(model, x, loc, log_var, eps, analytic_prior=analytic_prior)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-10)


def test_gradient_wrong_sign_would_be_caught():
    """The comparison is sensitive: flipping the entropy term's sign breaks agreement."""
    model = DecoderModel(mlp_decoder(D, X), likelihood="bernoulli", latent_dim=D).double()
    x, loc, log_var, eps = _inputs(binary=True)
    _, got_var = _library(model, x, loc, log_var, eps, analytic_prior=False)
    _, expected_var = _analytic(
        model, x, loc, log_var, eps, error_weight=lambda xb, m: (xb - m) / (m * (1 - m)), analytic_prior=False
    )
    wrong = expected_var - 1 / torch.exp(log_var)  # +1/(2σ²) replaced by −1/(2σ²)
    assert not torch.allclose(got_var, wrong, rtol=1e-3)
