"""Posterior families: pure functions on the posterior parameters λ.

λ is a dict of ``[B, D]`` tensors (for ``DiagonalGaussian``: ``{"loc": μ, "log_var": log σ²}``). A family knows
how to start (the prior), draw reparameterized samples from given noise, compute its entropy and analytic KL to a
Gaussian prior, keep its parameters in a safe range, and build a ``torch.distributions.Distribution``.

Example:
    >>> import torch
    >>> family = DiagonalGaussian()
    >>> params = family.initial_params(4, 2, dtype=torch.float32, device=None)
    >>> family.sample(params, torch.zeros(1, 4, 2)).shape, family.entropy(params).shape
    (torch.Size([1, 4, 2]), torch.Size([4]))
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import reduce

import torch
from torch import Tensor
from torch.distributions import Distribution, Independent, Normal, constraints

from learned_inference.validation import check_bounds

__all__ = ["Delta", "DiagonalGaussian", "Dirac", "Family", "detach", "make_family", "normal_prior_moments"]

Params = dict[str, Tensor]


def detach(params: Params) -> Params:
    """λ with every tensor detached from the graph."""
    return {name: value.detach() for name, value in params.items()}


def normal_prior_moments(prior: Distribution) -> tuple[Tensor, Tensor] | None:
    """``(loc, variance)`` of a diagonal Gaussian prior (``Normal`` or ``Independent(Normal, 1)``), else None."""
    base = prior.base_dist if isinstance(prior, Independent) else prior
    if isinstance(base, Normal):
        return base.loc, base.scale.square()
    return None


class Dirac(Distribution):
    """A point mass at ``loc`` with event shape ``loc.shape[-1:]`` (the ``Delta`` family's posterior)."""

    arg_constraints = {"loc": constraints.real}  # noqa: RUF012
    has_rsample = True

    def __init__(self, loc: Tensor, *, validate_args: bool | None = None) -> None:
        self.loc = loc
        super().__init__(loc.shape[:-1], loc.shape[-1:], validate_args=validate_args)

    @property
    def mean(self) -> Tensor:
        return self.loc

    @property
    def mode(self) -> Tensor:
        return self.loc

    @property
    def variance(self) -> Tensor:
        return torch.zeros_like(self.loc)

    def rsample(self, sample_shape: torch.Size | list[int] | tuple[int, ...] = torch.Size()) -> Tensor:  # noqa: B008
        return self.loc.expand(*sample_shape, *self.loc.shape)

    def log_prob(self, value: Tensor) -> Tensor:
        equal = (value == self.loc).all(-1)
        return torch.where(equal, 0.0, -math.inf).to(self.loc.dtype)

    def entropy(self) -> Tensor:
        return torch.zeros(self.batch_shape, dtype=self.loc.dtype, device=self.loc.device)


class Family:
    """Interface of a posterior family (all methods are pure functions of their arguments)."""

    #: names of the parameters in λ, in the order the update network sees them
    param_names: tuple[str, ...] = ()
    #: whether samples need noise (False for point estimates)
    stochastic: bool = True

    def initial_params(self, batch: int, dim: int, *, dtype: torch.dtype, device: torch.device | None) -> Params:
        """The prior's λ (N(0, I) or the origin) for ``batch`` examples."""
        raise NotImplementedError

    def from_diagonal(self, loc: Tensor, log_var: Tensor) -> Params | None:
        """λ of this family's member for N(loc, diag exp(log_var)) (``[B, D]`` each): how a ``(loc, log_var)``
        encoder such as ``model.encode`` starts it, or None where the family cannot start from such a pair (a
        mixture). By default the pair itself, for families whose λ is part of it (λ = (μ, log σ²), or μ)."""
        pair = {"loc": loc, "log_var": log_var}
        if not set(self.param_names) <= set(pair):
            return None
        return {name: pair[name] for name in self.param_names}

    def sample(self, params: Params, noise: Tensor) -> Tensor:
        """Reparameterized samples ``[S, B, D]`` from ``noise`` of shape ``[S, B, D]`` (``[N, B, D]`` points when
        :meth:`sample_weights` weights them)."""
        raise NotImplementedError

    def sample_weights(self, params: Params, num_samples: int) -> Tensor | None:
        """The weights w ``[N, B]`` of the N points :meth:`sample` makes from ``num_samples`` noise draws, for the
        unbiased estimate E_q[f(z)] ≈ Σ_n w_n f(z_n) (a mixture's strata: every component, weighted by its
        probability); None when the points are draws from q itself (w_n = 1/S: the plain mean)."""
        return None

    def log_prob(self, params: Params, z: Tensor) -> Tensor:
        """log q_λ(z) per point and example: ``z`` ``[..., B, D]`` → ``[..., B]``."""
        return self.distribution(params).log_prob(z)

    def param_sizes(self, dim: int) -> dict[str, int]:
        """The width of each of λ's parameters for a latent vector of size ``dim`` (``dim`` each by default)."""
        return dict.fromkeys(self.param_names, dim)

    def entropy(self, params: Params) -> Tensor:
        """Analytic entropy per example, ``[B]``."""
        raise NotImplementedError

    def kl_divergence(self, params: Params, prior_loc: Tensor, prior_var: Tensor) -> Tensor | None:
        """Analytic KL(q || N(prior_loc, diag prior_var)) per example, or None where it is undefined."""
        raise NotImplementedError

    def constrain(self, params: Params) -> Params:
        """Keeps λ in its valid, numerically safe range."""
        return params

    def natural_gradient(self, params: Params, grads: Params) -> Params:
        """F(λ)⁻¹ ∇_λ L: the gradient preconditioned by the inverse Fisher information of q_λ (identity when the
        family has no Fisher metric, as for point estimates)."""
        return grads

    def squared_fisher_norm(self, params: Params, step: Params) -> Tensor:
        """Per-example ‖Δ‖_F² = Δᵀ F(λ) Δ of a step Δ at λ, ``[B]``: to second order 2 KL(q_λ ‖ q_{λ+Δ}) (the
        squared Euclidean norm when the family has no Fisher metric)."""
        return reduce(torch.add, [s.square().sum(-1) for s in step.values()])

    def distribution(self, params: Params) -> Distribution:
        """The posterior as a ``Distribution`` with batch shape ``[B]`` and event shape ``[D]``."""
        raise NotImplementedError


class DiagonalGaussian(Family):
    """q(z) = N(z; μ, diag σ²) with λ = (μ, log σ²).

    Sampling: z = μ + σ ⊙ ε. Entropy: ½ Σ (log 2π + 1 + log σ²). KL to N(m, diag v):
    ½ Σ (σ²/v + (μ − m)²/v − 1 + log v − log σ²).

    Args:
        log_var_bounds: the safe range log σ² is clamped to after every update.
    """

    param_names = ("loc", "log_var")

    def __init__(self, *, log_var_bounds: tuple[float, float] = (-12.0, 6.0)) -> None:
        self.log_var_bounds = check_bounds("log_var_bounds", log_var_bounds)

    def initial_params(self, batch: int, dim: int, *, dtype: torch.dtype, device: torch.device | None) -> Params:
        zeros = torch.zeros(batch, dim, dtype=dtype, device=device)
        return {"loc": zeros, "log_var": zeros.clone()}

    def sample(self, params: Params, noise: Tensor) -> Tensor:
        return params["loc"] + torch.exp(0.5 * params["log_var"]) * noise

    def entropy(self, params: Params) -> Tensor:
        return 0.5 * (math.log(2 * math.pi) + 1.0 + params["log_var"]).sum(-1)

    def kl_divergence(self, params: Params, prior_loc: Tensor, prior_var: Tensor) -> Tensor:
        loc, log_var = params["loc"], params["log_var"]
        var = torch.exp(log_var)
        return 0.5 * ((var + (loc - prior_loc).square()) / prior_var - 1.0 + torch.log(prior_var) - log_var).sum(-1)

    def constrain(self, params: Params) -> Params:
        return {"loc": params["loc"], "log_var": params["log_var"].clamp(*self.log_var_bounds)}

    def natural_gradient(self, params: Params, grads: Params) -> Params:
        """F⁻¹∇ with the Fisher information of N(μ, diag σ²) in (μ, log σ²): F_μ = 1/σ², F_{log σ²} = 1/2. A step
        of 1 along it is Newton's step where q's precision matches the posterior's (the optimum of a Gaussian
        posterior)."""
        return {"loc": torch.exp(params["log_var"]) * grads["loc"], "log_var": 2.0 * grads["log_var"]}

    def squared_fisher_norm(self, params: Params, step: Params) -> Tensor:
        """Σ Δμ² / σ² + ½ Σ (Δ log σ²)², with the Fisher information above."""
        return ((step["loc"].square() * torch.exp(-params["log_var"])).sum(-1)
                + 0.5 * step["log_var"].square().sum(-1))

    def distribution(self, params: Params) -> Distribution:
        scale = torch.exp(0.5 * params["log_var"])  # valid by construction: no validation (it would synchronise)
        return Independent(Normal(params["loc"], scale, validate_args=False), 1, validate_args=False)

    def __repr__(self) -> str:
        return f"DiagonalGaussian(log_var_bounds={self.log_var_bounds})"


class Delta(Family):
    """A point estimate q(z) = δ(z − μ) with λ = (μ,): MAP-style inference, and 2-D visualisations.

    Its entropy is taken as 0, so the objective is log p(x, μ) (paper App. C.1).
    """

    param_names = ("loc",)
    stochastic = False

    def initial_params(self, batch: int, dim: int, *, dtype: torch.dtype, device: torch.device | None) -> Params:
        return {"loc": torch.zeros(batch, dim, dtype=dtype, device=device)}

    def sample(self, params: Params, noise: Tensor) -> Tensor:
        return params["loc"].expand(noise.shape[0], *params["loc"].shape)

    def entropy(self, params: Params) -> Tensor:
        return params["loc"].new_zeros(params["loc"].shape[:-1])

    def kl_divergence(self, params: Params, prior_loc: Tensor, prior_var: Tensor) -> None:
        return None

    def distribution(self, params: Params) -> Distribution:
        return Dirac(params["loc"])

    def __repr__(self) -> str:
        return "Delta()"


def _low_rank() -> Family:
    """``LowRankGaussian()`` (rank 2), imported here: its module imports this one."""
    from learned_inference.low_rank import LowRankGaussian

    return LowRankGaussian()


_FAMILIES: dict[str, Callable[[], Family]] = {"diagonal_gaussian": DiagonalGaussian, "delta": Delta,
                                              "low_rank": _low_rank}


def make_family(family: str | Family) -> Family:
    """A :class:`Family` from its name (``"diagonal_gaussian"``, ``"delta"``, ``"low_rank"``: a
    :class:`~learned_inference.low_rank.LowRankGaussian` of rank 2) or passes an instance through."""
    if isinstance(family, Family):
        return family
    if family not in _FAMILIES:
        raise ValueError(f"family must be one of {sorted(_FAMILIES)} or a Family instance, got {family!r}")
    return _FAMILIES[family]()
