"""Reference models: with known answers (for tests) and the paper's architectures (for examples and benchmarks).

* :class:`ProbabilisticPCA` — linear-Gaussian, exact posterior and log p(x) known.
* :func:`bernoulli_vae` — the paper's binarized-MNIST VAE (784-512-512-64, ELU, highway, Bernoulli, N(0, I)).
* :func:`gaussian_vae` — the same shape with a Gaussian output of learned global variance (grey-scale images).
* :func:`multinomial_vae` — the text VAE of App. D (2 × 512 ELU, multinomial over the vocabulary).

Each VAE is a :class:`~learned_inference.model.DecoderModel` with an encoder, so it has ``log_joint`` and
``encode`` and works with every inference method.

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

from learned_inference.baselines import HighwayEncoder
from learned_inference.inference import check_int
from learned_inference.likelihoods import gaussian_log_prob
from learned_inference.model import DecoderModel, gaussian_standard_log_prob
from learned_inference.networks import HighwayLayer

__all__ = ["ProbabilisticPCA", "bernoulli_vae", "gaussian_vae", "highway_decoder", "multinomial_vae"]


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


def highway_decoder(*, latent_dim: int, data_dim: int, hidden_size: int = 512, num_layers: int = 2) -> nn.Module:
    """z → Linear → ELU → (num_layers − 1) highway layers → Linear: the paper's decoder (App. C)."""
    for name, value in (("latent_dim", latent_dim), ("data_dim", data_dim), ("hidden_size", hidden_size),
                        ("num_layers", num_layers)):
        check_int(name, value, minimum=1)
    return nn.Sequential(
        nn.Linear(latent_dim, hidden_size), nn.ELU(), *(HighwayLayer(hidden_size) for _ in range(num_layers - 1)),
        nn.Linear(hidden_size, data_dim),
    )


def bernoulli_vae(
    *, data_dim: int = 784, latent_dim: int = 64, hidden_size: int = 512, num_layers: int = 2
) -> DecoderModel:
    """The paper's binarized-MNIST VAE: encoder and decoder with 2 highway layers of 512 ELU units, z of size 64,
    Bernoulli likelihood on logits, N(0, I) prior (App. C.3, C.5.1).

    Example:
        >>> model = bernoulli_vae(data_dim=64, latent_dim=8, hidden_size=32)
        >>> loc, log_var = model.encode(torch.zeros(3, 64))
        >>> model.log_joint(torch.zeros(3, 64), loc).shape
        torch.Size([3])
    """
    decoder = highway_decoder(latent_dim=latent_dim, data_dim=data_dim, hidden_size=hidden_size,
                              num_layers=num_layers)
    encoder = HighwayEncoder(latent_dim, hidden_size=hidden_size, num_layers=num_layers)
    return DecoderModel(decoder, likelihood="bernoulli", latent_dim=latent_dim, encoder=encoder)


def gaussian_vae(
    *, data_dim: int = 784, latent_dim: int = 64, hidden_size: int = 512, num_layers: int = 2,
    log_var: float = math.log(0.1),
) -> DecoderModel:
    """The same architecture with a Gaussian likelihood N(x; μx(z), σx²) whose global log σx² is learned
    (initialised at ``log_var``), for grey-scale images in [0, 1]."""
    decoder = highway_decoder(latent_dim=latent_dim, data_dim=data_dim, hidden_size=hidden_size,
                              num_layers=num_layers)
    encoder = HighwayEncoder(latent_dim, hidden_size=hidden_size, num_layers=num_layers)
    return DecoderModel(decoder, likelihood="gaussian", latent_dim=latent_dim, encoder=encoder, log_var=log_var,
                        learn_variance=True)


class _LogCountEncoder(nn.Module):
    """Encodes counts through log(1 + x), so long documents do not saturate the first layer."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.encoder(torch.log1p(x))


def multinomial_vae(*, vocab_size: int, latent_dim: int = 64, hidden_size: int = 512) -> DecoderModel:
    """The text VAE of App. D: 2-layer ELU encoder and decoder of 512 units, multinomial likelihood over the
    vocabulary (softmax of the decoder's logits), N(0, I) prior. The encoder sees log(1 + counts).

    Example:
        >>> model = multinomial_vae(vocab_size=30, latent_dim=4, hidden_size=16)
        >>> counts = torch.poisson(torch.ones(2, 30))
        >>> model.log_joint(counts, torch.zeros(2, 4)).shape
        torch.Size([2])
    """
    check_int("vocab_size", vocab_size, minimum=2)
    decoder = nn.Sequential(nn.Linear(latent_dim, hidden_size), nn.ELU(), nn.Linear(hidden_size, hidden_size),
                            nn.ELU(), nn.Linear(hidden_size, vocab_size))
    encoder = _LogCountEncoder(HighwayEncoder(latent_dim, hidden_size=hidden_size, num_layers=2))
    return DecoderModel(decoder, likelihood="multinomial", latent_dim=latent_dim, encoder=encoder)
