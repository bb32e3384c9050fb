"""Evaluation: importance-weighted log p(x), many-sample ELBO, amortization gap, perplexity, bits per dim.

With k samples zₛ ~ q(z | x) from any posterior and log weights log wₛ = log p(x, zₛ) − log q(zₛ | x):

    log p̂_k(x) = log (1/k Σₛ wₛ) = logsumexp_s(log wₛ) − log k     (importance weighted, Burda et al. 2016),
    L̂_k(x) = 1/k Σₛ log wₛ                                          (many-sample ELBO).

E[log p̂_k] ≤ log p(x) and is non-decreasing in k. The samples are drawn ``chunk_size`` at a time and reduced
into a float64 running log-sum-exp / sum, so memory depends on ``chunk_size``, never on k.

Example:
    >>> import torch
    >>> from learned_inference.zoo import ProbabilisticPCA
    >>> model = ProbabilisticPCA.random(data_dim=5, latent_dim=2, generator=torch.Generator().manual_seed(0))
    >>> x = model.sample(3, generator=torch.Generator().manual_seed(1))
    >>> loc, log_var = model.exact_posterior(x)
    >>> posterior = torch.distributions.Independent(torch.distributions.Normal(loc, (0.5 * log_var).exp()), 1)
    >>> estimate = importance_weighted_log_marginal(model, posterior, x, num_samples=100, chunk_size=30)
    >>> torch.allclose(estimate, model.log_marginal(x).double(), atol=1e-4)
    True
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor
from torch.distributions import Distribution

from learned_inference.baselines import GradientEStep
from learned_inference.inference import InferenceResult
from learned_inference.model import LatentModel, check_support
from learned_inference.validation import check_data, check_int

__all__ = [
    "amortization_gap",
    "bits_per_dim",
    "elbo_estimate",
    "importance_weighted_log_marginal",
    "log_weights",
    "perplexity",
]

Posterior = Distribution | Mapping[str, Distribution]


def log_weights(model: LatentModel, posterior: Posterior, x: Tensor, *, num_samples: int) -> Tensor:
    """``[num_samples, B]`` log importance weights log p(x, zₛ) − log q(zₛ | x), zₛ ~ q (one chunk).

    Args:
        model: anything with ``log_joint(x, z)``.
        posterior: q with batch shape ``[B]`` and event shape ``[D]``, or a dict of them keyed by latent
            variable name (as in ``InferenceResult.posterior`` for several latent variables).
        x: the data, ``[B, *event]``.
        num_samples: samples drawn.
    """
    batch = x.shape[0]
    parts = posterior if isinstance(posterior, Mapping) else {"z": posterior}
    for name, q in parts.items():
        if not isinstance(q, Distribution) or tuple(q.batch_shape) != (batch,) or len(q.event_shape) != 1:
            label = "posterior" if not isinstance(posterior, Mapping) else f"posterior[{name!r}]"
            got = f"batch shape {list(q.batch_shape)}, event shape {list(q.event_shape)}" \
                if isinstance(q, Distribution) else type(q).__name__
            raise ValueError(f"{label} must be a Distribution with batch shape [{batch}] (x's batch) and an "
                             f"event shape [D], got {got}")
    z = {name: q.sample((num_samples,)) for name, q in parts.items()}
    log_q = sum(q.log_prob(z[name]) for name, q in parts.items())
    z_in = z if isinstance(posterior, Mapping) else z["z"]
    return model.log_joint(x, z_in) - log_q


def _chunks(
    model: LatentModel, posterior: Posterior, x: Tensor, *, num_samples: int, chunk_size: int
) -> Iterator[Tensor]:
    """Log weights ``[c, B]`` in float64, ``chunk_size`` samples at a time, ``num_samples`` in all.

    ``x`` is checked first (finite floating-point data in the model's support), so a bad batch fails with an error
    instead of a plausible-looking bound.
    """
    check_int("num_samples", num_samples, minimum=1)
    check_int("chunk_size", chunk_size, minimum=1)
    check_data(x)
    check_support(model, x)
    for begin in range(0, num_samples, chunk_size):
        size = min(chunk_size, num_samples - begin)
        yield log_weights(model, posterior, x, num_samples=size).double()


@torch.no_grad()
def importance_weighted_log_marginal(
    model: LatentModel, posterior: Posterior, x: Tensor, *, num_samples: int = 5000, chunk_size: int = 100
) -> Tensor:
    """The importance-weighted estimate of log p(x) per example, ``[B]`` float64.

    log p̂_k(x) = logsumexp_{s=1..k}(log p(x, zₛ) − log q(zₛ | x)) − log k, zₛ ~ q: a stochastic lower bound
    whose expectation rises to log p(x) as k grows. Accumulated as a float64 running logsumexp over chunks.

    Args:
        model: anything with ``log_joint(x, z)``.
        posterior: q (e.g. ``result.posterior``), batch shape ``[B]``; a dict for several latent variables.
        x: the data, ``[B, *event]``.
        num_samples: k.
        chunk_size: samples evaluated at once (memory grows with this, not with k).

    Example:
        >>> import torch
        >>> from learned_inference import DecoderModel
        >>> model = DecoderModel(torch.nn.Linear(2, 6), likelihood="bernoulli", latent_dim=2)
        >>> q = torch.distributions.Independent(torch.distributions.Normal(torch.zeros(4, 2), 1.0), 1)
        >>> importance_weighted_log_marginal(model, q, torch.ones(4, 6), num_samples=50, chunk_size=20).dtype
        torch.float64
    """
    total = x.new_full((x.shape[0],), -math.inf, dtype=torch.float64)
    for chunk in _chunks(model, posterior, x, num_samples=num_samples, chunk_size=chunk_size):
        total = torch.logaddexp(total, torch.logsumexp(chunk, dim=0))
    return total - math.log(num_samples)


@torch.no_grad()
def elbo_estimate(
    model: LatentModel, posterior: Posterior, x: Tensor, *, num_samples: int = 1000, chunk_size: int = 100
) -> Tensor:
    """The many-sample ELBO per example, ``[B]`` float64: 1/k Σₛ (log p(x, zₛ) − log q(zₛ | x)), zₛ ~ q.

    Args are as in :func:`importance_weighted_log_marginal`.

    Example:
        >>> import torch
        >>> from learned_inference import DecoderModel
        >>> model = DecoderModel(torch.nn.Linear(2, 6), likelihood="bernoulli", latent_dim=2)
        >>> q = torch.distributions.Independent(torch.distributions.Normal(torch.zeros(4, 2), 1.0), 1)
        >>> elbo_estimate(model, q, torch.ones(4, 6), num_samples=50).shape
        torch.Size([4])
    """
    total = x.new_zeros((x.shape[0],), dtype=torch.float64)
    for chunk in _chunks(model, posterior, x, num_samples=num_samples, chunk_size=chunk_size):
        total = total + chunk.sum(0)
    return total / num_samples


def amortization_gap(
    result: InferenceResult,
    x: Tensor,
    *,
    e_step: GradientEStep,
    num_samples: int = 1000,
    chunk_size: int = 100,
) -> Tensor:
    """Per-example amortization gap ``[B]`` float64: L(λ*) − L(λ), λ* a converged E-step started at λ.

    λ is ``result.params`` (any method's result on ``x``); ``e_step`` (a :class:`GradientEStep` with enough
    steps to converge, on the same model) refines it to λ*. Both ELBOs are :func:`elbo_estimate` with
    ``num_samples`` samples, so the gap carries Monte Carlo noise of order std(log w)/√k.

    Example:
        >>> import torch
        >>> from learned_inference import GradientEStep, StandardEncoder
        >>> from learned_inference.zoo import ProbabilisticPCA
        >>> model = ProbabilisticPCA.random(data_dim=5, latent_dim=2)
        >>> x = model.sample(4)
        >>> guess = lambda x: (torch.zeros(x.shape[0], 2), torch.zeros(x.shape[0], 2))
        >>> result = StandardEncoder(model, latent_dim=2, init=guess).infer(x)
        >>> e_step = GradientEStep(model, latent_dim=2, lr=0.05, num_steps=300)
        >>> amortization_gap(result, x, e_step=e_step).shape
        torch.Size([4])
    """
    if not isinstance(e_step, GradientEStep):
        raise TypeError(f"e_step must be a GradientEStep, got {type(e_step).__name__}")
    converged = e_step.infer(x, init_params=result.params)
    options = {"num_samples": num_samples, "chunk_size": chunk_size}
    model = e_step.model
    refined = elbo_estimate(model, converged.posterior, x, **options)
    return refined - elbo_estimate(model, result.posterior, x, **options)


def _per_example_totals(name: str, log_px: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    if log_px.dim() != 1 or x.dim() < 2 or x.shape[0] != log_px.shape[0]:
        raise ValueError(
            f"{name} needs log_px of shape [N] and x of shape [N, *event] with the same N, got "
            f"{list(log_px.shape)} and {list(x.shape)}"
        )
    return log_px.double(), x.flatten(1).double()


def perplexity(log_px: Tensor, x: Tensor) -> Tensor:
    """Perplexity of count data, exp(−Σᵢ log p(xᵢ) / Σᵢ Nᵢ), Nᵢ the total count of document i (paper eq. 63).

    With log p(xᵢ) from :func:`importance_weighted_log_marginal` (a lower bound) this is an upper bound. It is in
    the topic-model literature's units (NVDM reports 836 on 20 Newsgroups) when log p(xᵢ) is Σ counts · log
    probabilities, as :class:`~learned_inference.likelihoods.MultinomialLikelihood` gives by default; a model with
    ``MultinomialLikelihood(normalized=True)`` includes the multinomial coefficient and gives far smaller values
    that no topic-model paper reports.

    Args:
        log_px: ``[N]`` log p(xᵢ) in nats.
        x: ``[N, V]`` counts.

    Example:
        >>> counts = torch.tensor([[1.0, 1.0], [2.0, 1.0]])
        >>> round(perplexity(torch.tensor([-2 * 4.0, -3 * 4.0]), counts).item(), 3)
        54.598
    """
    log_px, counts = _per_example_totals("perplexity", log_px, x)
    return torch.exp(-log_px.sum() / counts.sum())


def bits_per_dim(log_px: Tensor, x: Tensor) -> Tensor:
    """Bits per dimension, −Σᵢ log₂ p(xᵢ) / (N · d), d the number of dimensions per example.

    ``log_px`` must be a log-probability of the data as modelled (e.g. binarized pixels, or a discretized /
    dequantized density already including any scaling of the pixel values).

    Args:
        log_px: ``[N]`` log p(xᵢ) in nats.
        x: ``[N, *event]`` the data (its shape gives d).

    Example:
        >>> round(bits_per_dim(torch.tensor([-8 * 0.6931471805599453]), torch.zeros(1, 2, 4)).item(), 6)
        1.0
    """
    log_px, flat = _per_example_totals("bits_per_dim", log_px, x)
    return -log_px.mean() / (flat.shape[1] * math.log(2))
