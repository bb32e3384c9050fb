"""``LowRankGaussian``: a Gaussian posterior with a rank-r-plus-diagonal covariance, for correlated posteriors.

λ = (μ, W, log σ²): ``loc`` ``[B, D]``, ``factor`` ``[B, D·r]`` (the factor W ``[B, D, r]``, row-major: latent
dimension i in columns i·r … i·r + r − 1) and ``log_var`` ``[B, D]``, with

    q_λ(z) = N(z; μ, Σ),     Σ = W Wᵀ + diag σ²,

positive definite for every W since σ² > 0. Everything is computed through the r × r *capacitance*
K = I + Uᵀ U, U = diag(σ)⁻¹ W, and its Cholesky factor L (L Lᵀ = K), never forming a D × D matrix: per example
O(D·r² + r³) once per step, and O(D·r) per sample.

* Samples from D noise dimensions, like the diagonal family (no extra noise: the engine's ``[S, B, D]`` ε is used
  as it is): z = μ + A ε with the square root A = diag(σ) (I + U (L + I)⁻¹ Uᵀ) of Σ, i.e.
  z = μ + σ ⊙ ε + W (L + I)⁻¹ Wᵀ (ε / σ). (A Aᵀ = Σ because C = (L + I)⁻¹ solves C + Cᵀ + C Uᵀ U Cᵀ = I.)
* log det Σ = Σᵢ log σᵢ² + 2 Σⱼ log Lⱼⱼ (the matrix determinant lemma), and by Woodbury, with y = (z − μ) / σ,
  (z − μ)ᵀ Σ⁻¹ (z − μ) = ‖y‖² − ‖L⁻¹ Uᵀ y‖²:
  log q(z) = −½ (D log 2π + log det Σ + (z − μ)ᵀ Σ⁻¹ (z − μ)),   H[q] = ½ D (log 2π + 1) + ½ log det Σ.
* KL(q ‖ N(m, diag v)) = ½ [Σᵢ (σᵢ² + Σⱼ Wᵢⱼ²) / vᵢ + Σᵢ (μᵢ − mᵢ)² / vᵢ − D + Σᵢ log vᵢ − log det Σ].

Why the factor never starts at zero. Σ depends on W only through W Wᵀ, so W = 0 is a stationary point of the
ELBO in W (exactly, for this sampler: ∂z/∂W = 0 there), and gradient steps started at W = 0 would never leave it:
the family would stay diagonal. The start from a diagonal Gaussian N(m, diag s²) (:meth:`LowRankGaussian.from_diagonal`,
used for the prior's λ and for a ``(loc, log_var)`` encoder) is therefore that same distribution written with a
non-zero factor: W's column j is c·sⱼ eⱼ (j < min(r, D)) and σⱼ² = (1 − c²) sⱼ², so W Wᵀ + diag σ² = diag s² exactly.

Example:
    >>> import torch
    >>> family = LowRankGaussian(rank=2)
    >>> params = family.initial_params(4, 3, dtype=torch.float64, device=None)    # the prior N(0, I)
    >>> {name: tuple(value.shape) for name, value in params.items()}
    {'loc': (4, 3), 'factor': (4, 6), 'log_var': (4, 3)}
    >>> q = family.distribution(params)                                       # a LowRankMultivariateNormal
    >>> torch.allclose(q.covariance_matrix, torch.eye(3, dtype=torch.float64))
    True
    >>> z = family.sample(params, torch.randn(5, 4, 3, dtype=torch.float64))
    >>> torch.allclose(family.log_prob(params, z), q.log_prob(z)), torch.allclose(family.entropy(params), q.entropy())
    (True, True)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.distributions import Distribution, LowRankMultivariateNormal

from learned_inference.families import Family, Params
from learned_inference.validation import check_bounds, check_int

__all__ = ["LowRankGaussian"]


class LowRankGaussian(Family):
    """q(z) = N(z; μ, W Wᵀ + diag σ²) with λ = (μ, W, log σ²) and W of rank r (see the module docstring).

    Cost per example and step: O(D·r² + r³) for the capacitance's Cholesky factor, O(D·r) per sample; no D × D
    matrix is formed. A diagonal Gaussian's ELBO costs O(D) per sample, so r = 2 … 8 adds little to a step whose
    cost is the model's.

    Precision: λ in float32 or float64 (torch's Cholesky factorisation has no half-precision kernels). Training
    under ``torch.autocast`` works (the ELBO and its λ-gradient are evaluated in float32); a model and data in pure
    bfloat16 are refused with a ``TypeError``.

    Initialisation (:meth:`initial_params`, :meth:`from_diagonal`): the given diagonal Gaussian (the prior
    N(0, I) by default) exactly, with a non-zero factor carrying the share ``init_factor_share`` = c² of the
    variance of the first min(r, D) coordinates (W = 0 is a stationary point that gradient steps never leave).

    Constraints (:meth:`constrain`): log σ² ∈ ``log_var_bounds`` (so Σ ⪰ e^{low} I: positive definite), every
    entry of W in [−``factor_bound``, ``factor_bound``], and σᵢ² ≥ κ (W Wᵀ)ᵢᵢ with κ = ``min_diagonal_share``: every
    coordinate keeps a share of its variance on the diagonal, so the capacitance's eigenvalues stay in
    [1, 1 + D/κ] and its Cholesky factor exists in float32 (with κ = 10⁻³ up to D ≈ 1,600; correlations up to
    |ρ| ≈ 1 − κ/2 remain expressible).

    Natural gradient (a documented approximation; the Fisher information of N(μ, Σ) in (W, log σ²) is dense):
    for μ the exact block F_μ = Σ⁻¹ (the Fisher information is block-diagonal between μ and the covariance), so
    F_μ⁻¹ ∇_μ = Σ ∇_μ = σ² ⊙ ∇_μ + W (Wᵀ ∇_μ), Newton's step for μ where Σ matches the posterior's covariance;
    for W and log σ² the Fisher information of the joint q(u, z) = N(u; 0, I) N(z; μ + W u, diag σ²) of which q is
    the marginal: diagonal, F_Wᵢⱼ = 1/σᵢ² and F_{log σᵢ²} = ½ (as :class:`~learned_inference.mixture.GaussianMixture`
    uses the joint over its component index). The joint's information bounds the marginal's from above, so
    :meth:`squared_fisher_norm`, Δμᵀ Σ⁻¹ Δμ + Σ ΔWᵢⱼ² / σᵢ² + ½ Σ (Δ log σᵢ²)², is at least 2 KL(q_λ ‖ q_{λ+Δ}) to
    second order: a trust region in this norm is conservative. At W = 0 all of it is the diagonal family's metric.

    Hierarchical models: one ``LowRankGaussian`` per latent variable (a factor per variable, correlations within a
    variable only), e.g. ``family={"z1": LowRankGaussian(2), "z2": LowRankGaussian(1)}``. Not for
    :class:`~learned_inference.RecursiveMixtureEncoder`: RME builds a mixture of diagonal Gaussians, and a mixture
    of low-rank Gaussians is not a family of this library.

    Args:
        rank: r, the factor's columns (columns beyond D start at zero and stay there: a rank-D family).
        log_var_bounds: the safe range of the diagonal's log σ².
        factor_bound: the largest |Wᵢⱼ|; None: exp(½ · log_var_bounds[1]), the largest diagonal scale.
        init_factor_share: c², the share of a starting coordinate's variance the factor carries, in (0, 1).
        min_diagonal_share: κ, the smallest σᵢ² / (W Wᵀ)ᵢᵢ :meth:`constrain` keeps, in (0, 1).

    Example:
        >>> import torch
        >>> from learned_inference import GradientEStep
        >>> from learned_inference.zoo import ProbabilisticPCA
        >>> model = ProbabilisticPCA.random(data_dim=6, latent_dim=3, generator=torch.Generator().manual_seed(0))
        >>> e_step = GradientEStep(model, latent_dim=3, family="low_rank", num_steps=5)
        >>> result = e_step.infer(model.sample(4, generator=torch.Generator().manual_seed(1)))
        >>> result.params["factor"].shape, type(result.posterior).__name__
        (torch.Size([4, 6]), 'LowRankMultivariateNormal')
    """

    param_names = ("loc", "factor", "log_var")

    def __init__(
        self,
        rank: int = 2,
        *,
        log_var_bounds: tuple[float, float] = (-12.0, 6.0),
        factor_bound: float | None = None,
        init_factor_share: float = 0.5,
        min_diagonal_share: float = 1e-3,
    ) -> None:
        self.rank = check_int("rank", rank, minimum=1)
        self.log_var_bounds = check_bounds("log_var_bounds", log_var_bounds)
        bound = math.exp(0.5 * self.log_var_bounds[1]) if factor_bound is None else factor_bound
        if not bound > 0:
            raise ValueError(f"factor_bound must be > 0 (or None for exp(log_var_bounds[1] / 2)), got {factor_bound!r}")
        self.factor_bound = float(bound)
        if not 0 < init_factor_share < 1:
            raise ValueError(f"init_factor_share must be in (0, 1): 0 starts the factor at W = 0, a stationary point "
                             f"gradient steps never leave, and 1 leaves no diagonal; got {init_factor_share!r}")
        self.init_factor_share = float(init_factor_share)
        if not 0 < min_diagonal_share < 1:
            raise ValueError(f"min_diagonal_share must be in (0, 1) (it keeps the capacitance's Cholesky factor "
                             f"computable), got {min_diagonal_share!r}")
        self.min_diagonal_share = float(min_diagonal_share)

    def param_sizes(self, dim: int) -> dict[str, int]:
        return {"loc": dim, "factor": dim * self.rank, "log_var": dim}

    def _factor(self, params: Params) -> Tensor:
        """W ``[B, D, r]``."""
        return params["factor"].unflatten(-1, (-1, self.rank))

    @staticmethod
    def _check_dtype(loc: Tensor) -> None:
        if loc.dtype in (torch.float16, torch.bfloat16):
            raise TypeError(f"LowRankGaussian needs λ in float32 or float64, got {loc.dtype}: torch's Cholesky "
                            "factorisation has no half-precision kernels. Keep the model and data in float32 and train "
                            "under torch.autocast (the ELBO and its λ-gradient are then evaluated in float32)")

    def _capacitance(self, params: Params) -> tuple[Tensor, Tensor, Tensor]:
        """``(σ [B, D], U = W / σ [B, D, r], L [B, r, r])`` with L Lᵀ = I + Uᵀ U (lower triangular)."""
        self._check_dtype(params["loc"])
        scale = torch.exp(0.5 * params["log_var"])
        u = self._factor(params) / scale.unsqueeze(-1)
        eye = torch.eye(self.rank, dtype=u.dtype, device=u.device)
        return scale, u, torch.linalg.cholesky(eye + u.mT @ u)

    def _log_det(self, params: Params, chol: Tensor) -> Tensor:
        """log det Σ ``[B]`` by the matrix determinant lemma."""
        return params["log_var"].sum(-1) + 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)

    @staticmethod
    def _mahalanobis(y: Tensor, u: Tensor, chol: Tensor) -> Tensor:
        """(z − μ)ᵀ Σ⁻¹ (z − μ) = ‖y‖² − ‖L⁻¹ Uᵀ y‖² for whitened differences y = (z − μ) / σ ``[..., B, D]``."""
        projected = torch.einsum("bdr,...bd->...br", u, y).unsqueeze(-1)                      # [..., B, r, 1]
        solved = torch.linalg.solve_triangular(chol, projected, upper=False).squeeze(-1)
        return y.square().sum(-1) - solved.square().sum(-1)

    def from_diagonal(self, loc: Tensor, log_var: Tensor) -> Params:
        """N(loc, diag exp(log_var)) exactly, with the factor carrying the share c² of the variance of the first
        min(r, D) coordinates: Wⱼⱼ = c·sⱼ, σⱼ² = (1 − c²) sⱼ² there (see the class docstring)."""
        dim = loc.shape[-1]
        carried = torch.eye(dim, self.rank, dtype=loc.dtype, device=loc.device)                # [D, r], 1 at (j, j)
        scale = torch.exp(0.5 * log_var) * math.sqrt(self.init_factor_share)
        factor = (scale.unsqueeze(-1) * carried).flatten(-2)
        return {"loc": loc, "factor": factor,
                "log_var": log_var + math.log1p(-self.init_factor_share) * carried.sum(-1)}

    def initial_params(self, batch: int, dim: int, *, dtype: torch.dtype, device: torch.device | None) -> Params:
        zeros = torch.zeros(batch, dim, dtype=dtype, device=device)
        return self.from_diagonal(zeros, zeros)

    def sample(self, params: Params, noise: Tensor) -> Tensor:
        """z = μ + σ ⊙ ε + W (L + I)⁻¹ Wᵀ (ε / σ) for ``noise`` ε ``[S, B, D]``: exact draws from N(μ, Σ)."""
        scale, u, chol = self._capacitance(params)
        projected = torch.einsum("bdr,sbd->brs", u, noise)                                     # Uᵀ ε [B, r, S]
        shifted = chol + torch.eye(self.rank, dtype=chol.dtype, device=chol.device)
        solved = torch.linalg.solve_triangular(shifted, projected, upper=False)                # [B, r, S]
        return params["loc"] + scale * noise + torch.einsum("bdr,brs->sbd", self._factor(params), solved)

    def log_prob(self, params: Params, z: Tensor) -> Tensor:
        """log N(z; μ, Σ) for ``z`` ``[..., B, D]`` (Woodbury and the determinant lemma)."""
        scale, u, chol = self._capacitance(params)
        squared = self._mahalanobis((z - params["loc"]) / scale, u, chol)
        return -0.5 * (z.shape[-1] * math.log(2 * math.pi) + self._log_det(params, chol) + squared)

    def entropy(self, params: Params) -> Tensor:
        _, _, chol = self._capacitance(params)
        return 0.5 * (params["loc"].shape[-1] * (math.log(2 * math.pi) + 1.0) + self._log_det(params, chol))

    def kl_divergence(self, params: Params, prior_loc: Tensor, prior_var: Tensor) -> Tensor:
        _, _, chol = self._capacitance(params)
        variance = torch.exp(params["log_var"]) + self._factor(params).square().sum(-1)        # diag Σ
        mean = (params["loc"] - prior_loc).square()
        return 0.5 * (((variance + mean) / prior_var + torch.log(prior_var)).sum(-1) - params["loc"].shape[-1]
                      - self._log_det(params, chol))

    def constrain(self, params: Params) -> Params:
        factor = params["factor"].clamp(-self.factor_bound, self.factor_bound)
        low, high = self.log_var_bounds
        floor = torch.log((self.min_diagonal_share * self._factor({"factor": factor}).square().sum(-1))
                          .clamp(min=math.exp(low)))                                           # log κ (W Wᵀ)ᵢᵢ
        return {"loc": params["loc"], "factor": factor,
                "log_var": torch.maximum(params["log_var"], floor).clamp(low, high)}

    def natural_gradient(self, params: Params, grads: Params) -> Params:
        """(Σ ∇_μ, σᵢ² ∇_Wᵢⱼ, 2 ∇_{log σ²}): the metric of the class docstring inverted, in O(D·r); Σ ∇_μ =
        σ² ⊙ ∇_μ + W (Wᵀ ∇_μ)."""
        var = torch.exp(params["log_var"])
        factor = self._factor(params)
        loc = var * grads["loc"] + (factor @ (factor.mT @ grads["loc"].unsqueeze(-1))).squeeze(-1)
        return {"loc": loc, "factor": grads["factor"] * var.repeat_interleave(self.rank, -1),
                "log_var": 2.0 * grads["log_var"]}

    def squared_fisher_norm(self, params: Params, step: Params) -> Tensor:
        """Δμᵀ Σ⁻¹ Δμ + Σ ΔWᵢⱼ² / σᵢ² + ½ Σ (Δ log σᵢ²)² (the metric :meth:`natural_gradient` inverts)."""
        scale, u, chol = self._capacitance(params)
        precision = torch.exp(-params["log_var"]).repeat_interleave(self.rank, -1)
        return (self._mahalanobis(step["loc"] / scale, u, chol) + (step["factor"].square() * precision).sum(-1)
                + 0.5 * step["log_var"].square().sum(-1))

    def distribution(self, params: Params) -> Distribution:
        self._check_dtype(params["loc"])
        # valid by construction: no argument validation (it would synchronise a GPU)
        return LowRankMultivariateNormal(params["loc"], self._factor(params), torch.exp(params["log_var"]),
                                         validate_args=False)

    def __repr__(self) -> str:
        return (f"LowRankGaussian(rank={self.rank}, log_var_bounds={self.log_var_bounds}, "
                f"factor_bound={self.factor_bound}, init_factor_share={self.init_factor_share}, "
                f"min_diagonal_share={self.min_diagonal_share})")
