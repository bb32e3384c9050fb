"""The per-example ELBO and its gradient with respect to the posterior parameters λ.

ELBO (paper eq. 13), with S reparameterized samples zₛ = sample(λ, εₛ):

    L(λ; x) = 1/S Σₛ log p(x, zₛ) + H[q_λ]                     (analytic entropy), or
    L(λ; x) = 1/S Σₛ log p(x | zₛ) − KL(q_λ || p(z))            (analytic KL, when the model gives its prior),
    L(λ; x) = Σₙ wₙ (log p(x, zₙ) − log q_λ(zₙ))                 (weighted points, e.g. a mixture's strata),

the last for a family whose points zₙ carry weights wₙ (``Family.sample_weights``).

The λ-gradient is the ``torch.func.vjp`` of the per-example ELBO with cotangent 1, i.e. the gradient of the ELBO
*summed* over the batch: because the model does not couple examples, its rows are exactly the per-example
gradients ∇_λ L(λ_b; x_b), with no ``vmap`` and no dependence on the batch size.

Example:
    >>> import torch
    >>> from learned_inference.families import DiagonalGaussian
    >>> from learned_inference.adapters import DecoderModel
    >>> from learned_inference.latent_space import LatentSpace
    >>> model = DecoderModel(torch.nn.Linear(2, 5), likelihood="bernoulli", latent_dim=2)
    >>> family, space = DiagonalGaussian(), LatentSpace(2)
    >>> params = family.initial_params(3, 2, dtype=torch.float32, device=None)
    >>> values, grads = elbo_and_grad(model, family, params, torch.ones(3, 5), torch.randn(1, 3, 2), space=space)
    >>> values.shape, grads["loc"].shape
    (torch.Size([3]), torch.Size([3, 2]))
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor
from torch.func import vjp

from learned_inference.families import Family, Params, normal_prior_moments
from learned_inference.latent_space import LatentSpace
from learned_inference.model import LatentModel, WithLogLikelihood, WithPrior
from learned_inference.train_mode import TrainModeRun

__all__ = ["Objective", "PriorMoments", "UnscoredObjective", "elbo", "elbo_and_grad", "prior_moments", "sample_noise"]

PriorMoments = tuple[Tensor, Tensor]


def prior_moments(model: LatentModel, space: LatentSpace) -> PriorMoments | None:
    """``(loc, variance)`` of the model's diagonal-Gaussian prior, flattened like λ, or None.

    Available when the model has ``log_likelihood(x, z)`` and ``prior()`` returning a ``Normal`` /
    ``Independent(Normal, 1)`` (or, for several latent variables, a dict of them keyed by name).
    """
    if not (isinstance(model, WithLogLikelihood) and isinstance(model, WithPrior)):
        return None
    prior = model.prior()
    if isinstance(prior, Mapping):
        if space.names is None or set(prior) != set(space.names):
            raise ValueError(f"model.prior() returned priors for {sorted(prior)}, expected {sorted(space.sizes)}")
        named = [(space.sizes[name], prior[name]) for name in space.names]
    else:
        named = [(space.total_dim, prior)]
    locs, variances = [], []
    for size, distribution in named:
        moments = normal_prior_moments(distribution)
        if moments is None:
            return None
        if moments[0].shape[-1:] not in ((size,), (1,), ()) or moments[0].dim() > 1:
            raise ValueError(
                f"model.prior() must be a distribution over {size} latent dimensions without batch dimensions, "
                f"got loc of shape {list(moments[0].shape)}"
            )
        locs.append(moments[0].expand(size))
        variances.append(moments[1].expand(size))
    return torch.cat(locs), torch.cat(variances)


def sample_noise(
    num_samples: int, batch: int, dim: int, *, dtype: torch.dtype, device: torch.device | None,
    generator: torch.Generator | None = None, antithetic: bool = False,
) -> Tensor:
    """Standard normal noise ε of shape ``[S, B, D]`` for the reparameterization trick.

    With ``antithetic`` (S even) the second half is the negated first, (ε, −ε): the estimate stays unbiased, and in
    the reparameterized λ-gradient the noise term that is linear in ε, ∇²log p · σ ε, cancels.
    """
    if not antithetic:
        return torch.randn(num_samples, batch, dim, dtype=dtype, device=device, generator=generator)
    if num_samples % 2:
        raise ValueError(f"antithetic noise needs an even number of samples, got num_samples={num_samples}")
    half = torch.randn(num_samples // 2, batch, dim, dtype=dtype, device=device, generator=generator)
    return torch.cat([half, -half])


def elbo(
    model: LatentModel,
    family: Family,
    params: Params,
    x: Tensor,
    noise: Tensor,
    *,
    space: LatentSpace,
    prior: PriorMoments | None = None,
) -> Tensor:
    """Per-example ELBO ``[B]`` from S reparameterized samples (``noise`` is ``[S, B, D]``).

    With ``prior`` (the moments from :func:`prior_moments`) and a family that has an analytic KL, uses
    E[log p(x | z)] − KL(q || p); otherwise E[log p(x, z)] + H[q]. ``log_joint`` gets ``z`` of shape ``[B, D]``
    when S = 1 and ``[S, B, D]`` otherwise (split into a dict for several latent variables). A family whose
    points are weighted (:meth:`~learned_inference.families.Family.sample_weights`, a mixture) gives
    Σₙ wₙ (log p(x, zₙ) − log q(zₙ)), with ``log_joint`` on its ``[N, B, D]`` points.
    """
    z = family.sample(params, noise)
    weights = family.sample_weights(params, noise.shape[0])
    if weights is not None:
        log_joint = model.log_joint(x, space.split(z.squeeze(0) if z.shape[0] == 1 else z))
        log_w = log_joint.reshape(z.shape[:2]) - family.log_prob(params, z)
        return (weights * log_w).sum(0)
    z_in = space.split(z.squeeze(0) if z.shape[0] == 1 else z)
    kl = None
    if prior is not None:
        loc = params[family.param_names[0]]
        kl = family.kl_divergence(params, prior[0].to(loc), prior[1].to(loc))
    if kl is not None:
        log_term = cast(WithLogLikelihood, model).log_likelihood(x, z_in)  # a prior's moments imply it
    else:
        log_term = model.log_joint(x, z_in)
    if z.shape[0] > 1:
        log_term = log_term.mean(0)
    return log_term - kl if kl is not None else log_term + family.entropy(params)


def elbo_and_grad(
    model: LatentModel,
    family: Family,
    params: Params,
    x: Tensor,
    noise: Tensor,
    *,
    space: LatentSpace,
    prior: PriorMoments | None = None,
) -> tuple[Tensor, Params]:
    """Per-example ELBO ``[B]`` and its gradient ∇_λ L (a dict like ``params``) via ``torch.func``.

    First-order use: call under ``torch.no_grad()`` and nothing is recorded for the outer autograd.
    Second-order use: pass ``params`` that require grad and the returned gradients stay differentiable with
    respect to them and to the model's parameters.
    """

    def per_example(p: Params) -> Tensor:
        return elbo(model, family, p, x, noise, space=space, prior=prior)

    # The pullback of the per-example ELBO with cotangent 1 is the gradient of its sum. A vector-Jacobian product
    # rather than grad(sum): functorch then accumulates gradients in place as autograd does (measured in
    # benchmarks/overhead.py: 1.24x a hand-written autograd.grad with grad_and_value, 1.14x with vjp).
    values, pullback = vjp(per_example, params)[:2]
    (grads,) = pullback(torch.ones_like(values))
    return values, grads


@dataclass(frozen=True)
class Objective:
    """The ELBO that refinement ascends: a model, a posterior family over its latent layout, and how to estimate it.

    A thin holder of the arguments :func:`elbo` and :func:`elbo_and_grad` share, built once per run (the model's
    prior may be trainable, so its moments are read each time).

    Attributes:
        model: the user's model (``log_joint(x, z)``).
        family: the posterior family of λ.
        space: the latent layout.
        prior: the prior's moments for the analytic KL, or None for E[log p(x, z)] + H[q].
        train_mode: the run's context for a model with batch norm or dropout in training mode
            (:class:`~learned_inference.train_mode.TrainModeRun`, active around the run), or None.
    """

    model: LatentModel
    family: Family
    space: LatentSpace
    prior: PriorMoments | None = None
    train_mode: TrainModeRun | None = None

    def elbo(self, params: Params, x: Tensor, noise: Tensor) -> Tensor:
        """Per-example ELBO ``[B]`` (:func:`elbo`)."""
        return elbo(self.model, self.family, params, x, noise, space=self.space, prior=self.prior)

    def elbo_and_grad(
        self, params: Params, x: Tensor, noise: Tensor, *, update_statistics: bool = False
    ) -> tuple[Tensor, Params]:
        """Per-example ELBO ``[B]`` and ∇_λ L (:func:`elbo_and_grad`).

        Args:
            params: λ, detached (first order) or with its graph (second order).
            x: the data.
            noise: ε ``[S, B, D]``.
            update_statistics: this evaluation trains the model (L_T of a training run): batch norms in training
                mode (:attr:`train_mode`) then update their running statistics, once, as in the user's own
                forward. That in-place update is outside what ``torch.func`` differentiates, so the ELBO is taken
                with plain autograd and its λ-gradient with ``torch.autograd.grad`` (the same values).
        """
        run = self.train_mode
        if not (update_statistics and run is not None and run.updates_statistics and torch.is_grad_enabled()):
            return elbo_and_grad(self.model, self.family, params, x, noise, space=self.space, prior=self.prior)
        lam = {n: p if p.requires_grad else p.detach().requires_grad_() for n, p in params.items()}
        with run.updating_statistics():
            values = self.elbo(lam, x, noise)
        names = list(lam)
        grads = torch.autograd.grad(values.sum(), [lam[n] for n in names], retain_graph=True)
        return values, dict(zip(names, grads, strict=True))


@dataclass(frozen=True)
class UnscoredObjective(Objective):
    """An objective that is not evaluated: L = 0 and ∇_λ L = 0 at every λ, and the model never runs.

    For steps that read the data (and λ) only, such as an encoder run as one step of the engine
    (:func:`~learned_inference.engine.refine` with ``num_steps=1``): the loop then costs one network pass.
    """

    def elbo(self, params: Params, x: Tensor, noise: Tensor) -> Tensor:
        """Zeros ``[B]``."""
        return x.new_zeros(x.shape[0])

    def elbo_and_grad(
        self, params: Params, x: Tensor, noise: Tensor, *, update_statistics: bool = False
    ) -> tuple[Tensor, Params]:
        """Zeros ``[B]`` and zero gradients shaped like ``params``."""
        return self.elbo(params, x, noise), {n: torch.zeros_like(p) for n, p in params.items()}
