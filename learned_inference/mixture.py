"""``GaussianMixture``: a posterior family of K diagonal Gaussians with per-example weights.

λ = (μ, log σ², logits): ``loc`` and ``log_var`` are ``[B, K·D]`` (component k in columns k·D … k·D + D − 1) and
``logits`` ``[B, K]``, with π = softmax(logits) and

    q_λ(z) = Σ_k π_k N(z; μ_k, diag σ²_k),      log q_λ(z) = logsumexp_k (log π_k + log N(z; μ_k, diag σ²_k)).

ELBO estimator (stratified over the components, no sampling of the discrete index): every component is
reparameterized with the same S noise draws, z_{k,s} = μ_k + σ_k ⊙ ε_s, and the points are weighted by π_k / S,

    L̂(λ) = Σ_k π_k · 1/S Σ_s [log p(x, z_{k,s}) − log q_λ(z_{k,s})],      E[L̂] = Σ_k π_k E_{q_k}[…] = L(λ),

so it is unbiased, has no score-function term, and its λ-gradient reaches the logits through π_k (and through
log q_λ) and the components through the reparameterization (:func:`~learned_inference.objectives.elbo` does this
for any family with :meth:`~learned_inference.families.Family.sample_weights`). It costs K·S evaluations of
log p(x, z) per step instead of S.

Example:
    >>> import torch
    >>> family = GaussianMixture(num_components=3)
    >>> params = family.initial_params(4, 2, dtype=torch.float32, device=None)
    >>> {name: tuple(value.shape) for name, value in params.items()}
    {'loc': (4, 6), 'log_var': (4, 6), 'logits': (4, 3)}
    >>> z = family.sample(params, torch.randn(5, 4, 2))               # every component, 5 draws each
    >>> z.shape, family.sample_weights(params, 5).sum(0)
    (torch.Size([15, 4, 2]), tensor([1., 1., 1., 1.]))
    >>> q = family.distribution(params)                                 # a MixtureSameFamily
    >>> torch.allclose(q.log_prob(z), family.log_prob(params, z))
    True
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.distributions import Categorical, Distribution, Independent, MixtureSameFamily, Normal

from learned_inference.families import Family, Params
from learned_inference.validation import check_bounds, check_int

__all__ = ["GaussianMixture", "component_view"]


def component_view(params: Params, num_components: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(loc, log_var, log π)`` of a mixture's λ with the components on their own axis: ``[B, K, D]`` twice and
    ``[B, K]`` (log π = log_softmax(logits))."""
    batch = params["logits"].shape[0]
    loc = params["loc"].reshape(batch, num_components, -1)
    log_var = params["log_var"].reshape(batch, num_components, -1)
    return loc, log_var, torch.log_softmax(params["logits"], -1)


class GaussianMixture(Family):
    """q(z) = Σ_k π_k N(z; μ_k, diag σ²_k) with λ = (μ, log σ², logits) (see the module docstring).

    Initialisation (the prior's scale, symmetry broken): equal weights, unit variances, and means at K fixed,
    distinct points ``init_spread`` · (u_k − ū) around the prior mean (u_k ~ N(0, I) from a fixed seed, the same
    for every example). K
    identical components receive identical gradients and would never split, so the start must differ.

    Natural gradient: the Fisher information of the joint q(k, z) (Lin, Khan & Schmidt 2019), diagonal in the
    logits: F⁻¹∇ = (σ²_k ∇_μk, 2 ∇_{log σ²_k}) / π_k and ∇_{logit_k} / π_k, with π_k floored at 0.01 (so a
    nearly dropped component's step stays bounded).
    Parameters are constrained to log σ² ∈ ``log_var_bounds`` and logits normalized to log π ≥ log(``min_weight``).

    Args:
        num_components: K.
        log_var_bounds: the safe range of every component's log σ².
        init_spread: the scale of the initial means' spread.
        min_weight: the smallest mixture weight π_k kept by :meth:`constrain`, so a component can always come back.

    Example:
        >>> import torch
        >>> from learned_inference import DecoderModel, GradientEStep
        >>> model = DecoderModel(torch.nn.Linear(2, 6), likelihood="bernoulli", latent_dim=2)
        >>> e_step = GradientEStep(model, latent_dim=2, family=GaussianMixture(num_components=3), num_steps=5)
        >>> result = e_step.infer(torch.ones(4, 6))
        >>> result.elbo.shape, type(result.posterior).__name__
        (torch.Size([6, 4]), 'MixtureSameFamily')
    """

    param_names = ("loc", "log_var", "logits")

    def __init__(
        self,
        num_components: int,
        *,
        log_var_bounds: tuple[float, float] = (-12.0, 6.0),
        init_spread: float = 1.0,
        min_weight: float = 1e-6,
    ) -> None:
        self.num_components = check_int("num_components", num_components, minimum=1)
        self.log_var_bounds = check_bounds("log_var_bounds", log_var_bounds)
        if not init_spread >= 0:
            raise ValueError(f"init_spread must be >= 0 (0 only for K = 1), got {init_spread!r}")
        if init_spread == 0 and num_components > 1:
            raise ValueError("init_spread=0 starts K > 1 identical components, which gradient ascent never "
                             "separates: pass init_spread > 0")
        if not 0 < min_weight < 1 / num_components:
            raise ValueError(f"min_weight must be in (0, 1/num_components) = (0, {1 / num_components:g}), got "
                             f"{min_weight!r}")
        self.init_spread = float(init_spread)
        self.min_weight = float(min_weight)

    def param_sizes(self, dim: int) -> dict[str, int]:
        k = self.num_components
        return {"loc": k * dim, "log_var": k * dim, "logits": k}

    def initial_params(self, batch: int, dim: int, *, dtype: torch.dtype, device: torch.device | None) -> Params:
        k = self.num_components
        generator = torch.Generator().manual_seed(0)
        draws = torch.randn(k, dim, generator=generator, dtype=torch.float64)
        offsets = self.init_spread * (draws - draws.mean(0))
        loc = offsets.reshape(1, k * dim).to(dtype=dtype, device=device).expand(batch, -1).clone()
        return {"loc": loc, "log_var": torch.zeros_like(loc),
                "logits": torch.zeros(batch, k, dtype=dtype, device=device)}

    def sample(self, params: Params, noise: Tensor) -> Tensor:
        """Points ``[K·S, B, D]``, component-major: z_{k,s} = μ_k + σ_k ⊙ ε_s for every component k."""
        loc, log_var, _ = component_view(params, self.num_components)
        points = loc.transpose(0, 1)[:, None] + torch.exp(0.5 * log_var).transpose(0, 1)[:, None] * noise[None]
        return points.reshape(-1, *noise.shape[1:])

    def sample_weights(self, params: Params, num_samples: int) -> Tensor:
        """π_k / S for each point of :meth:`sample`, ``[K·S, B]``."""
        weights = torch.softmax(params["logits"], -1).transpose(0, 1) / num_samples
        return weights[:, None].expand(-1, num_samples, -1).reshape(-1, weights.shape[-1])

    def log_prob(self, params: Params, z: Tensor) -> Tensor:
        """logsumexp_k (log π_k + log N(z; μ_k, diag σ²_k)) for ``z`` ``[..., B, D]``."""
        loc, log_var, log_pi = component_view(params, self.num_components)
        diff = z.unsqueeze(-2) - loc
        log_normal = -0.5 * (diff.square() * torch.exp(-log_var) + log_var + math.log(2 * math.pi)).sum(-1)
        return torch.logsumexp(log_pi + log_normal, -1)

    def entropy(self, params: Params) -> Tensor:
        raise NotImplementedError("a Gaussian mixture's entropy has no closed form: the ELBO estimates "
                                  "-E_q[log q(z)] from the weighted points (sample_weights)")

    def kl_divergence(self, params: Params, prior_loc: Tensor, prior_var: Tensor) -> None:
        return None

    def constrain(self, params: Params) -> Params:
        log_pi = torch.log_softmax(params["logits"], -1).clamp(min=math.log(self.min_weight))
        return {"loc": params["loc"], "log_var": params["log_var"].clamp(*self.log_var_bounds), "logits": log_pi}

    def _fisher_weights(self, params: Params) -> tuple[Tensor, Tensor]:
        """π (floored at 0.01) ``[B, K]`` and each component's π repeated over its D columns ``[B, K·D]``: the
        weights of the joint Fisher metric that :meth:`natural_gradient` and :meth:`squared_fisher_norm` share."""
        pi = torch.softmax(params["logits"], -1).clamp(min=0.01)
        return pi, pi.repeat_interleave(params["loc"].shape[-1] // self.num_components, -1)

    def natural_gradient(self, params: Params, grads: Params) -> Params:
        pi, per_column = self._fisher_weights(params)
        return {"loc": torch.exp(params["log_var"]) * grads["loc"] / per_column,
                "log_var": 2.0 * grads["log_var"] / per_column, "logits": grads["logits"] / pi}

    def squared_fisher_norm(self, params: Params, step: Params) -> Tensor:
        """Δᵀ F Δ with the metric :meth:`natural_gradient` inverts: each component's Gaussian Fisher weighted by
        its π_k (the Fisher of the joint over the component index and z), and diag(π) for the logits."""
        pi, per_column = self._fisher_weights(params)
        gaussian = step["loc"].square() * torch.exp(-params["log_var"]) + 0.5 * step["log_var"].square()
        return (per_column * gaussian).sum(-1) + (pi * step["logits"].square()).sum(-1)

    def distribution(self, params: Params) -> Distribution:
        loc, log_var, log_pi = component_view(params, self.num_components)
        # valid by construction: no argument validation (it would synchronise a GPU)
        components = Independent(Normal(loc, torch.exp(0.5 * log_var), validate_args=False), 1, validate_args=False)
        return MixtureSameFamily(Categorical(logits=log_pi, validate_args=False), components, validate_args=False)

    def __repr__(self) -> str:
        return (f"GaussianMixture(num_components={self.num_components}, log_var_bounds={self.log_var_bounds}, "
                f"init_spread={self.init_spread}, min_weight={self.min_weight})")
