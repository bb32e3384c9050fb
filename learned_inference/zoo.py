"""Reference models with known answers, for tests, examples and benchmarks.

:class:`ProbabilisticPCA` is the linear-Gaussian model x = W z + b + σ n, z ~ N(0, I), n ~ N(0, I). With
orthogonal loading columns (WᵀW diagonal) its exact posterior is a diagonal Gaussian, so converged mean-field
inference must reach it, and its ELBO then equals the exact log p(x):

    Λ = I + WᵀW / σ²,   μ_post = Λ⁻¹ Wᵀ (x − b) / σ²,   Σ_post = Λ⁻¹,   p(x) = N(x; b, W Wᵀ + σ² I).

Example:
    >>> import torch
    >>> model = ProbabilisticPCA.random(data_dim=6, latent_dim=2, generator=torch.Generator().manual_seed(0))
    >>> x = model.sample(4, generator=torch.Generator().manual_seed(1))
    >>> loc, log_var = model.exact_posterior(x)
    >>> bool(torch.allclose(model.exact_elbo(x, loc, log_var), model.log_marginal(x)))
    True
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, Independent, MultivariateNormal, Normal

from learned_inference.likelihoods import gaussian_log_prob
from learned_inference.model import gaussian_standard_log_prob

__all__ = ["ProbabilisticPCA"]


class ProbabilisticPCA(nn.Module):
    """x = W z + b + σ n with a standard normal prior; closed-form posterior and marginal likelihood.

    Args:
        weight: the loadings W, ``[data_dim, latent_dim]``.
        bias: the offset b, ``[data_dim]``.
        log_var: the observation noise log σ² (a float).
    """

    def __init__(self, weight: Tensor, bias: Tensor, *, log_var: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)
        self.register_buffer("log_var", torch.tensor(float(log_var), dtype=weight.dtype))

    @classmethod
    def random(
        cls,
        *,
        data_dim: int,
        latent_dim: int,
        log_var: float = math.log(0.1),
        dtype: torch.dtype = torch.float32,
        generator: torch.Generator | None = None,
    ) -> ProbabilisticPCA:
        """A model with orthogonal loading columns of random directions and scales in [0.5, 2]."""
        q, _ = torch.linalg.qr(torch.randn(data_dim, latent_dim, dtype=torch.float64, generator=generator))
        scales = 0.5 + 1.5 * torch.rand(latent_dim, dtype=torch.float64, generator=generator)
        bias = 0.5 * torch.randn(data_dim, dtype=torch.float64, generator=generator)
        return cls((q * scales).to(dtype), bias.to(dtype), log_var=log_var)

    @property
    def latent_dim(self) -> int:
        return self.weight.shape[1]

    def likelihood_mean(self, z: Tensor) -> Tensor:
        """E[x | z] = W z + b for ``z`` of shape ``[..., D]``."""
        return z @ self.weight.T + self.bias

    def log_likelihood(self, x: Tensor, z: Tensor) -> Tensor:
        return gaussian_log_prob(self.likelihood_mean(z), self.log_var, x).sum(-1)

    def log_prior(self, z: Tensor) -> Tensor:
        return gaussian_standard_log_prob(z)

    def prior(self) -> Distribution:
        zeros = torch.zeros(self.latent_dim, dtype=self.weight.dtype, device=self.weight.device)
        return Independent(Normal(zeros, torch.ones_like(zeros)), 1)

    def log_joint(self, x: Tensor, z: Tensor) -> Tensor:
        return self.log_likelihood(x, z) + self.log_prior(z)

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """``n`` draws of x from the model."""
        w = self.weight
        z = torch.randn(n, self.latent_dim, dtype=w.dtype, device=w.device, generator=generator)
        noise = torch.randn(n, w.shape[0], dtype=w.dtype, device=w.device, generator=generator)
        return self.likelihood_mean(z) + torch.exp(0.5 * self.log_var) * noise

    def exact_posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(loc, log_var)`` of p(z | x), exact when WᵀW is diagonal (else the mean is exact, the variance
        is the diagonal of the posterior covariance)."""
        w, var = self.weight, torch.exp(self.log_var)
        precision = torch.eye(self.latent_dim, dtype=w.dtype, device=w.device) + w.T @ w / var
        covariance = torch.linalg.inv(precision)
        loc = (x - self.bias) @ w @ covariance.T / var
        return loc, torch.log(torch.diagonal(covariance)).expand_as(loc)

    def log_marginal(self, x: Tensor) -> Tensor:
        """Exact log p(x) = log N(x; b, W Wᵀ + σ² I), shape ``[B]``."""
        w = self.weight
        covariance = w @ w.T + torch.exp(self.log_var) * torch.eye(w.shape[0], dtype=w.dtype, device=w.device)
        return MultivariateNormal(self.bias, covariance_matrix=covariance).log_prob(x)

    def exact_elbo(self, x: Tensor, loc: Tensor, log_var: Tensor) -> Tensor:
        """The ELBO of q = N(loc, diag exp(log_var)) in closed form (no sampling), shape ``[B]``.

        E_q log p(x | z) = −½ [d log 2πσ² + (‖x − W μ − b‖² + Σⱼ ‖W₋ⱼ‖² sⱼ²) / σ²], minus KL(q || N(0, I)).
        """
        var_x = torch.exp(self.log_var)
        residual = x - self.likelihood_mean(loc)
        trace = (torch.exp(log_var) * self.weight.square().sum(0)).sum(-1)
        squared = residual.square().sum(-1) + trace
        expected_ll = -0.5 * (x.shape[-1] * torch.log(2 * math.pi * var_x) + squared / var_x)
        kl = 0.5 * (torch.exp(log_var) + loc.square() - 1.0 - log_var).sum(-1)
        return expected_ll - kl
