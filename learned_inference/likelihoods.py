"""Observation models p(x | z): log-densities summed over the data dimensions.

Each likelihood turns a decoder's output (logits, a mean, ...) and data ``x`` of shape ``[B, *event]`` into one
log-density per example. Decoder outputs may carry extra leading sample dimensions (``[S, B, *event]``); the
result then has shape ``[S, B]``.

Example:
    >>> import torch
    >>> from learned_inference.likelihoods import make_likelihood
    >>> bern = make_likelihood("bernoulli")
    >>> bern.log_prob(torch.zeros(2, 3), torch.ones(2, 3)).shape
    torch.Size([2])
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "BernoulliLikelihood",
    "BernoulliProbsLikelihood",
    "GaussianLikelihood",
    "Likelihood",
    "MultinomialLikelihood",
    "bernoulli_log_prob",
    "gaussian_log_prob",
    "make_likelihood",
    "multinomial_log_prob",
    "sum_event_dims",
]


def sum_event_dims(values: Tensor, event_dims: int) -> Tensor:
    """Sums the trailing ``event_dims`` dimensions, keeping leading sample and batch dimensions."""
    if event_dims == 0:
        return values
    return values.flatten(start_dim=values.dim() - event_dims).sum(-1)


def bernoulli_log_prob(logits: Tensor, x: Tensor) -> Tensor:
    """Element-wise log Bernoulli(x; sigmoid(logits)) = x·logits + log sigmoid(−logits), stable for any logits.

    Written with ``logsigmoid`` rather than ``binary_cross_entropy_with_logits``: under ``torch.func.grad`` the
    latter is decomposed into many elementwise kernels (a third slower per λ-gradient at the paper's size).
    """
    return x * logits + F.logsigmoid(-logits)


def gaussian_log_prob(mean: Tensor, log_var: Tensor, x: Tensor) -> Tensor:
    """Element-wise log N(x; mean, exp(log_var))."""
    return -0.5 * (math.log(2 * math.pi) + log_var + (x - mean).square() * torch.exp(-log_var))


def multinomial_log_prob(logits: Tensor, counts: Tensor) -> Tensor:
    """log Multinomial(counts; N = Σ counts, softmax(logits)) over the last dimension.

    Includes the multinomial coefficient log N! − Σ log xᵢ!, so the result is a normalised log-probability.
    """
    log_probs = torch.log_softmax(logits, dim=-1)
    total = counts.sum(-1)
    coefficient = torch.lgamma(total + 1) - torch.lgamma(counts + 1).sum(-1)
    return (counts * log_probs).sum(-1) + coefficient


class Likelihood(nn.Module):
    """Base class: ``log_prob(output, x)`` sums over data dimensions; ``mean(output)`` gives E[x | z]."""

    def log_prob(self, output: Tensor, x: Tensor) -> Tensor:
        raise NotImplementedError

    def mean(self, output: Tensor) -> Tensor:
        raise NotImplementedError


class BernoulliLikelihood(Likelihood):
    """Bernoulli on logits: log p(x | z) = Σᵢ xᵢ·ℓᵢ − softplus(ℓᵢ), for binary data (paper eqs. 56-57)."""

    def log_prob(self, output: Tensor, x: Tensor) -> Tensor:
        return sum_event_dims(bernoulli_log_prob(output, x), x.dim() - 1)

    def mean(self, output: Tensor) -> Tensor:
        return torch.sigmoid(output)


class BernoulliProbsLikelihood(Likelihood):
    """Bernoulli on probabilities (for decoders that end in a sigmoid), clamped away from 0 and 1."""

    def __init__(self, *, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps

    def log_prob(self, output: Tensor, x: Tensor) -> Tensor:
        probs = output.clamp(self.eps, 1 - self.eps)
        return sum_event_dims(bernoulli_log_prob(torch.logit(probs), x), x.dim() - 1)

    def mean(self, output: Tensor) -> Tensor:
        return output


class GaussianLikelihood(Likelihood):
    """Gaussian with a global diagonal variance: log N(x; μx(z), σx²) (paper eqs. 8-9).

    Args:
        log_var: initial value of log σx² (a scalar, shared by all data dimensions).
        learn_variance: make log σx² a trainable parameter instead of a fixed buffer.
    """

    def __init__(self, *, log_var: float = 0.0, learn_variance: bool = False) -> None:
        super().__init__()
        value = torch.tensor(float(log_var))
        if learn_variance:
            self.log_var = nn.Parameter(value)
        else:
            self.register_buffer("log_var", value)

    def log_prob(self, output: Tensor, x: Tensor) -> Tensor:
        log_var = self.log_var.to(output.dtype)
        return sum_event_dims(gaussian_log_prob(output, log_var, x), x.dim() - 1)

    def mean(self, output: Tensor) -> Tensor:
        return output


class MultinomialLikelihood(Likelihood):
    """Multinomial over the last data dimension (bag-of-words counts) with ``softmax(logits)`` probabilities."""

    def log_prob(self, output: Tensor, x: Tensor) -> Tensor:
        return sum_event_dims(multinomial_log_prob(output, x), x.dim() - 2)

    def mean(self, output: Tensor) -> Tensor:
        return torch.softmax(output, dim=-1)


_LIKELIHOODS: dict[str, type[Likelihood]] = {
    "bernoulli": BernoulliLikelihood,
    "bernoulli-probs": BernoulliProbsLikelihood,
    "gaussian": GaussianLikelihood,
    "multinomial": MultinomialLikelihood,
}


def make_likelihood(likelihood: str | Likelihood, **options: object) -> Likelihood:
    """Returns a :class:`Likelihood` from its name (``"bernoulli"``, ``"bernoulli-probs"``, ``"gaussian"``,
    ``"multinomial"``) or passes an instance through. ``options`` go to the constructor (e.g. ``log_var``)."""
    if isinstance(likelihood, Likelihood):
        if options:
            raise ValueError(f"likelihood options {sorted(options)} only apply when likelihood is given by name")
        return likelihood
    if likelihood not in _LIKELIHOODS:
        raise ValueError(
            f"likelihood must be one of {sorted(_LIKELIHOODS)} or a Likelihood instance, got {likelihood!r}"
        )
    return _LIKELIHOODS[likelihood](**options)
