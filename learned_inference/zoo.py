"""Reference models: with known answers (for tests) and the paper's architectures (for examples and benchmarks).

* :class:`ProbabilisticPCA` — linear-Gaussian, exact posterior and log p(x) known.
* :class:`MixturePriorModel` — a Gaussian-mixture prior with Gaussian noise: its exact posterior is a Gaussian
  mixture (for mixture posteriors: the approximation gap of a single Gaussian is known).
* :func:`bernoulli_vae` — the paper's binarized-MNIST VAE (784-512-512-64, ELU, highway, Bernoulli, N(0, I)).
* :func:`gaussian_vae` — the same shape with a Gaussian output of learned global variance (grey-scale images).
* :func:`multinomial_vae` — the text VAE of App. D (2 × 512 ELU, multinomial over the vocabulary).
* :class:`LinearGaussianHierarchy` — two-level linear-Gaussian hierarchy, exact posterior, ELBO and log p(x).
* :class:`TwoLevelVAE` + :class:`BottomUpEncoder` — the paper's hierarchical binarized-MNIST model (latents 64
  and 32) and its standard, bottom-up-only encoder (App. C.5.1).

Each VAE is a :class:`~learned_inference.adapters.DecoderModel` with an encoder, so it has ``log_joint`` and
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
from functools import reduce

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, Independent, MultivariateNormal, Normal

from learned_inference.adapters import DecoderModel, gaussian_standard_log_prob
from learned_inference.likelihoods import gaussian_log_prob, make_likelihood
from learned_inference.networks import HighwayEncoder, HighwayLayer, HighwayMLP
from learned_inference.validation import check_int

__all__ = [
    "BottomUpEncoder",
    "LinearGaussianHierarchy",
    "MixturePriorModel",
    "ProbabilisticPCA",
    "TwoLevelVAE",
    "bernoulli_vae",
    "gaussian_vae",
    "highway_decoder",
    "multinomial_vae",
]


class ProbabilisticPCA(nn.Module):
    """x = W z + b + σ n with a standard normal prior; closed-form posterior and marginal likelihood.

    Args:
        weight: the loadings W, ``[data_dim, latent_dim]``.
        bias: the offset b, ``[data_dim]``.
        log_var: the observation noise log σ² (a float).
    """

    log_var: Tensor  # a buffer

    def __init__(self, weight: Tensor, bias: Tensor, *, log_var: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)
        self.register_buffer("log_var", torch.tensor(float(log_var), dtype=weight.dtype, device=weight.device))

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
        return Independent(Normal(zeros, torch.ones_like(zeros), validate_args=False), 1, validate_args=False)

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


class MixturePriorModel(nn.Module):
    """z ~ Σ_j w_j N(m_j, s² I), x | z ~ N(z, τ² I): the exact posterior is a Gaussian mixture.

    Every prior component j gives one posterior component, with v = (1/s² + 1/τ²)⁻¹:

        p(z | x) = Σ_j ρ_j N(z; v (m_j/s² + x/τ²), v I),   ρ_j ∝ w_j N(x; m_j, (s² + τ²) I),
        log p(x) = logsumexp_j (log w_j + log N(x; m_j, (s² + τ²) I)).

    For x between two well-separated means the posterior is bimodal, and the best single Gaussian falls short of
    log p(x) by about −log max_j ρ_j (its *approximation gap*; log 2 for two equal modes).

    Args:
        means: the prior means m_j, ``[J, D]``.
        scale: the prior components' standard deviation s.
        noise_scale: the observation noise's standard deviation τ.
        weights: the prior weights w_j (default: equal).

    Example:
        >>> import torch
        >>> model = MixturePriorModel(torch.tensor([[-2.0], [2.0]]), scale=0.5, noise_scale=1.0)
        >>> params = model.exact_posterior(torch.zeros(1, 1))
        >>> params["loc"], params["logits"].softmax(-1)
        (tensor([[-1.6000,  1.6000]]), tensor([[0.5000, 0.5000]]))
    """

    means: Tensor  # buffers
    log_weights: Tensor

    def __init__(self, means: Tensor, *, scale: float, noise_scale: float, weights: Tensor | None = None) -> None:
        super().__init__()
        if means.dim() != 2:
            raise ValueError(f"means must be [J, D] (one row per prior component), got shape {list(means.shape)}")
        if not (scale > 0 and noise_scale > 0):
            raise ValueError(f"scale and noise_scale must be > 0, got {scale!r} and {noise_scale!r}")
        weights = means.new_full((means.shape[0],), 1.0 / means.shape[0]) if weights is None \
            else weights.to(means)
        if weights.shape != means.shape[:1] or not bool((weights > 0).all()):
            raise ValueError(f"weights must be {means.shape[0]} positive numbers, got {weights!r}")
        self.register_buffer("means", means)
        self.register_buffer("log_weights", torch.log(weights / weights.sum()))
        self.scale, self.noise_scale = float(scale), float(noise_scale)

    @property
    def latent_dim(self) -> int:
        return self.means.shape[1]

    def _log_normal(self, value: Tensor, variance: float) -> Tensor:
        """log N(value; m_j, variance I) for every component j, ``[..., J]``."""
        diff = value.unsqueeze(-2) - self.means
        return -0.5 * (diff.square().sum(-1) / variance + self.latent_dim * math.log(2 * math.pi * variance))

    def log_prior(self, z: Tensor) -> Tensor:
        return torch.logsumexp(self.log_weights + self._log_normal(z, self.scale ** 2), -1)

    def log_likelihood(self, x: Tensor, z: Tensor) -> Tensor:
        return Normal(z, self.noise_scale).log_prob(x).sum(-1)

    def log_joint(self, x: Tensor, z: Tensor) -> Tensor:
        return self.log_likelihood(x, z) + self.log_prior(z)

    def log_marginal(self, x: Tensor) -> Tensor:
        """Exact log p(x), ``[B]``."""
        return torch.logsumexp(self.log_weights + self._log_normal(x, self.scale ** 2 + self.noise_scale ** 2), -1)

    def exact_posterior(self, x: Tensor) -> dict[str, Tensor]:
        """p(z | x) as the λ of a :class:`~learned_inference.mixture.GaussianMixture` with J components:
        ``{"loc": [B, J·D], "log_var": [B, J·D], "logits": [B, J]}``."""
        s2, t2 = self.scale ** 2, self.noise_scale ** 2
        variance = 1.0 / (1.0 / s2 + 1.0 / t2)
        loc = variance * (self.means / s2 + x.unsqueeze(-2) / t2)
        logits = torch.log_softmax(self.log_weights + self._log_normal(x, s2 + t2), -1)
        return {"loc": loc.flatten(1), "log_var": torch.full_like(loc.flatten(1), math.log(variance)),
                "logits": logits}

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """``n`` draws of x from the model."""
        m = self.means
        j = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        z = m[j] + self.scale * torch.randn(n, self.latent_dim, dtype=m.dtype, device=m.device, generator=generator)
        return z + self.noise_scale * torch.randn(z.shape, dtype=m.dtype, device=m.device, generator=generator)


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


class LinearGaussianHierarchy(nn.Module):
    """A two-level linear-Gaussian hierarchy z2 → z1 → x with known posterior, ELBO and log p(x).

    z2 ~ N(0, I),  z1 | z2 ~ N(A z2 + a, s1² I),  x | z1 ~ N(W z1 + b, s0² I).  The joint is Gaussian, so
    p(z | x) = N(Λ⁻¹ h, Λ⁻¹) with precision and linear term

        Λ = [[I/s1² + WᵀW/s0², −A/s1²], [−Aᵀ/s1², I + AᵀA/s1²]],   h = [a/s1² + Wᵀ(x − b)/s0², −Aᵀa/s1²],

    and p(x) = N(x; W a + b, W (A Aᵀ + s1² I) Wᵀ + s0² I). The best mean-field (diagonal Gaussian) posterior
    has μ = Λ⁻¹ h and σ²ᵢ = 1/Λᵢᵢ; for any diagonal q the ELBO is log p(x, μ) − ½ Σᵢ Λᵢᵢ σ²ᵢ + H[q] (log p(x, z)
    is quadratic in z with Hessian −Λ). The latent variables are ``"z1"`` (next to the data) and ``"z2"``.

    Args:
        weight: W, ``[data_dim, D1]``.
        bias: b, ``[data_dim]``.
        top_weight: A, ``[D1, D2]``.
        top_bias: a, ``[D1]``.
        log_var: log s0², the observation noise.
        top_log_var: log s1², the noise of z1 given z2.

    Example:
        >>> import torch
        >>> gen = torch.Generator().manual_seed(0)
        >>> model = LinearGaussianHierarchy.random(data_dim=6, latent_dims=(3, 2), generator=gen)
        >>> x = model.sample(4, generator=gen)
        >>> best = model.mean_field_optimum(x)
        >>> bool((model.exact_elbo(x, best) <= model.log_marginal(x)).all())
        True
    """

    log_var: Tensor  # buffers
    top_log_var: Tensor

    def __init__(
        self, weight: Tensor, bias: Tensor, top_weight: Tensor, top_bias: Tensor, *, log_var: float,
        top_log_var: float,
    ) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(weight), nn.Parameter(bias)
        self.top_weight, self.top_bias = nn.Parameter(top_weight), nn.Parameter(top_bias)
        self.register_buffer("log_var", torch.tensor(float(log_var), dtype=weight.dtype, device=weight.device))
        self.register_buffer("top_log_var", torch.tensor(float(top_log_var), dtype=weight.dtype, device=weight.device))

    @classmethod
    def random(
        cls, *, data_dim: int, latent_dims: tuple[int, int], log_var: float = math.log(0.1),
        top_log_var: float = math.log(0.3), dtype: torch.dtype = torch.float32,
        generator: torch.Generator | None = None,
    ) -> LinearGaussianHierarchy:
        """A model with Gaussian random weights scaled by 1/√fan-in and small random offsets."""
        d1, d2 = latent_dims
        for name, value in (("data_dim", data_dim), ("latent_dims[0]", d1), ("latent_dims[1]", d2)):
            check_int(name, value, minimum=1)

        def draw(*shape: int) -> Tensor:
            return torch.randn(*shape, dtype=torch.float64, generator=generator).to(dtype)

        return cls(1.5 * draw(data_dim, d1) / math.sqrt(d1), 0.5 * draw(data_dim), 1.5 * draw(d1, d2) / math.sqrt(d2),
                   0.5 * draw(d1), log_var=log_var, top_log_var=top_log_var)

    @property
    def latent_dim(self) -> dict[str, int]:
        """``{"z1": D1, "z2": D2}``, bottom-up."""
        return {"z1": self.top_weight.shape[0], "z2": self.top_weight.shape[1]}

    def conditionals(self, z: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
        """Mean and variance of x | z1, z1 | z2 and z2 (see :mod:`learned_inference.hierarchical`)."""
        z1, z2 = z["z1"], z["z2"]
        return {
            "x": (z1 @ self.weight.T + self.bias, torch.exp(self.log_var).expand(self.bias.shape)),
            "z1": (z2 @ self.top_weight.T + self.top_bias, torch.exp(self.top_log_var).expand(self.top_bias.shape)),
            "z2": (torch.zeros_like(z2), torch.ones_like(z2)),
        }

    def log_joint(self, x: Tensor, z: dict[str, Tensor]) -> Tensor:
        """log p(x, z1, z2) = Σ over levels of log N(level; conditional mean, conditional variance)."""
        moments = self.conditionals(z)
        values = {"x": x, "z1": z["z1"], "z2": z["z2"]}
        return reduce(torch.add, [gaussian_log_prob(mean, torch.log(var), values[level]).sum(-1)
                                  for level, (mean, var) in moments.items()])

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """``n`` draws of x from the model."""
        def noise(size: int) -> Tensor:
            return torch.randn(n, size, dtype=self.weight.dtype, device=self.weight.device, generator=generator)

        dims = self.latent_dim
        z2 = noise(dims["z2"])
        z1 = z2 @ self.top_weight.T + self.top_bias + torch.exp(0.5 * self.top_log_var) * noise(dims["z1"])
        return z1 @ self.weight.T + self.bias + torch.exp(0.5 * self.log_var) * noise(self.bias.shape[0])

    def posterior_precision(self) -> Tensor:
        """Λ, ``[D1 + D2, D1 + D2]`` (the same for every x)."""
        w, a = self.weight, self.top_weight
        v0, v1 = torch.exp(self.log_var), torch.exp(self.top_log_var)
        d1, d2 = a.shape
        top = torch.cat([torch.eye(d1, dtype=w.dtype, device=w.device) / v1 + w.T @ w / v0, -a / v1], 1)
        bottom = torch.cat([-a.T / v1, torch.eye(d2, dtype=w.dtype, device=w.device) + a.T @ a / v1], 1)
        return torch.cat([top, bottom], 0)

    def _split(self, flat: Tensor) -> dict[str, Tensor]:
        return dict(zip(("z1", "z2"), flat.split(list(self.latent_dim.values()), -1), strict=True))

    def mean_field_optimum(self, x: Tensor) -> dict[str, dict[str, Tensor]]:
        """The best diagonal-Gaussian posterior, ``{"z1": {"loc", "log_var"}, "z2": {...}}`` (μ = Λ⁻¹h,
        σ²ᵢ = 1/Λᵢᵢ), in the form of ``InferenceResult.params``."""
        precision = self.posterior_precision()
        v0, v1 = torch.exp(self.log_var), torch.exp(self.top_log_var)
        h1 = self.top_bias / v1 + (x - self.bias) @ self.weight / v0
        h2 = (-self.top_bias @ self.top_weight / v1).expand(x.shape[0], -1)
        loc = torch.linalg.solve(precision, torch.cat([h1, h2], -1).T).T
        log_var = (-torch.log(torch.diagonal(precision))).expand_as(loc)
        locs, log_vars = self._split(loc), self._split(log_var)
        return {v: {"loc": locs[v], "log_var": log_vars[v]} for v in locs}

    def exact_elbo(self, x: Tensor, params: dict[str, dict[str, Tensor]]) -> Tensor:
        """The ELBO of a diagonal Gaussian q (``InferenceResult.params`` form) in closed form, shape ``[B]``."""
        loc = {v: params[v]["loc"] for v in ("z1", "z2")}
        log_var = torch.cat([params["z1"]["log_var"], params["z2"]["log_var"]], -1)
        spread = 0.5 * (torch.diagonal(self.posterior_precision()) * torch.exp(log_var)).sum(-1)
        entropy = 0.5 * (math.log(2 * math.pi) + 1.0 + log_var).sum(-1)
        return self.log_joint(x, loc) - spread + entropy

    def log_marginal(self, x: Tensor) -> Tensor:
        """Exact log p(x), shape ``[B]``."""
        w, a = self.weight, self.top_weight
        eye = torch.eye(a.shape[0], dtype=w.dtype, device=w.device)
        cov_z1 = a @ a.T + torch.exp(self.top_log_var) * eye
        cov_x = w @ cov_z1 @ w.T + torch.exp(self.log_var) * torch.eye(w.shape[0], dtype=w.dtype, device=w.device)
        return MultivariateNormal(w @ self.top_bias + self.bias, covariance_matrix=cov_x).log_prob(x)


class TwoLevelVAE(nn.Module):
    """The paper's two-level binarized-MNIST model (App. C.5.1): z2 (32) → z1 (64) → x (784).

    p(z2) = N(0, I),  p(z1 | z2) = N(μ1(z2), diag σ1²(z2)),  p(x | z1) = Bernoulli(sigmoid(f(z1))),

    with f a highway ELU network of 2 × 512 units and (μ1, log σ1²) one of 2 × 256 units (log σ1² clamped to
    ``log_var_bounds``). Exposes ``conditionals(z)`` for the ``"hierarchical_errors"`` encoding (σ²_x = 1 for the
    Bernoulli level: its error x − p is the gradient with respect to the logits). Departures from the paper: no
    batch normalisation (it couples the examples of a batch, which the model contract forbids) and no extra
    deterministic units at the first level. Pair it with :class:`BottomUpEncoder` for the standard encoder.

    Args:
        data_dim: the size of x.
        latent_dims: sizes of z1 and z2.
        hidden_sizes: units per hidden layer at the first and the second level.
        log_var_bounds: the range of log σ1²(z2).

    Example:
        >>> import torch
        >>> model = TwoLevelVAE(data_dim=20, latent_dims=(4, 2), hidden_sizes=(16, 8))
        >>> z = {"z1": torch.zeros(3, 5, 4), "z2": torch.zeros(3, 5, 2)}
        >>> model.log_joint(torch.ones(5, 20), z).shape
        torch.Size([3, 5])
    """

    def __init__(
        self, *, data_dim: int = 784, latent_dims: tuple[int, int] = (64, 32),
        hidden_sizes: tuple[int, int] = (512, 256), log_var_bounds: tuple[float, float] = (-7.0, 3.0),
    ) -> None:
        super().__init__()
        (d1, d2), (h1, h2) = latent_dims, hidden_sizes
        self.dims = {"z1": d1, "z2": d2}
        self.decoder_x = highway_decoder(latent_dim=d1, data_dim=data_dim, hidden_size=h1)
        self.decoder_z1 = highway_decoder(latent_dim=d2, data_dim=2 * d1, hidden_size=h2)
        self.log_var_bounds = log_var_bounds
        self.likelihood = make_likelihood("bernoulli")

    @property
    def latent_dim(self) -> dict[str, int]:
        """``{"z1": D1, "z2": D2}``, bottom-up."""
        return dict(self.dims)

    def _z1_moments(self, z2: Tensor) -> tuple[Tensor, Tensor]:
        loc, log_var = self.decoder_z1(z2).chunk(2, dim=-1)
        return loc, log_var.clamp(*self.log_var_bounds)

    def conditionals(self, z: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
        """Mean and variance of x | z1 (variance 1: logit-space errors), z1 | z2 and z2."""
        probs = self.likelihood.mean(self.decoder_x(z["z1"]))
        loc, log_var = self._z1_moments(z["z2"])
        z2 = z["z2"]
        return {"x": (probs, torch.ones_like(probs)), "z1": (loc, torch.exp(log_var)),
                "z2": (torch.zeros_like(z2), torch.ones_like(z2))}

    def log_joint(self, x: Tensor, z: dict[str, Tensor]) -> Tensor:
        """log p(x | z1) + log p(z1 | z2) + log p(z2), one value per example (and sample)."""
        loc, log_var = self._z1_moments(z["z2"])
        log_p_z1 = gaussian_log_prob(loc, log_var, z["z1"]).sum(-1)
        return self.likelihood.log_prob(self.decoder_x(z["z1"]), x) + log_p_z1 + gaussian_standard_log_prob(z["z2"])

    def check_support(self, x: Tensor) -> None:
        """Raises ``ValueError`` if ``x`` is outside [0, 1], the Bernoulli likelihood's support."""
        self.likelihood.check_support(x)


class BottomUpEncoder(nn.Module):
    """The standard hierarchical encoder (bottom-up only): x → h1 → (μ1, log σ1²), h1 → h2 → (μ2, log σ2²).

    q(z1, z2 | x) = N(z1; μ1, σ1²) N(z2; μ2, σ2²), both levels computed from x through one deterministic
    bottom-up pass (highway ELU networks, 2 × 512 units then 2 × 256), so it sees no top-down information.
    Returns dicts keyed ``"z1"``, ``"z2"``, the form ``StandardEncoder(model, init=encoder)`` accepts.

    Args:
        latent_dims: sizes of z1 and z2.
        hidden_sizes: units per hidden layer at the first and the second level.

    Example:
        >>> import torch
        >>> loc, log_var = BottomUpEncoder(latent_dims=(4, 2), hidden_sizes=(16, 8))(torch.zeros(3, 20))
        >>> loc["z1"].shape, log_var["z2"].shape
        (torch.Size([3, 4]), torch.Size([3, 2]))
    """

    def __init__(self, *, latent_dims: tuple[int, int] = (64, 32), hidden_sizes: tuple[int, int] = (512, 256)) -> None:
        super().__init__()
        (d1, d2), (h1, h2) = latent_dims, hidden_sizes
        self.level1 = HighwayMLP(hidden_size=h1)
        self.level2 = HighwayMLP(hidden_size=h2)
        self.heads = nn.ModuleDict({"z1": nn.Linear(h1, 2 * d1), "z2": nn.Linear(h2, 2 * d2)})

    def forward(self, x: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        hidden1, _ = self.level1(x.flatten(1))
        hidden2, _ = self.level2(hidden1)
        out = {"z1": self.heads["z1"](hidden1).chunk(2, -1), "z2": self.heads["z2"](hidden2).chunk(2, -1)}
        return {v: loc for v, (loc, _) in out.items()}, {v: log_var for v, (_, log_var) in out.items()}
