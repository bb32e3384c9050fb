"""Observation models p(x | z): log-densities summed over the data dimensions.

Each likelihood turns a decoder's output (logits, a mean, ...) and data ``x`` of shape ``[B, *event]`` into one
log-density per example. Decoder outputs may carry extra leading sample dimensions (``[S, B, *event]``); the
result then has shape ``[S, B]``.

Each likelihood also knows its data's support: :meth:`Likelihood.check_support` raises a ``ValueError`` that names
the likelihood, the offending examples and the fix when ``x`` is outside it (Bernoulli data outside [0, 1], negative
counts), since the log-density formulas would otherwise return a finite, meaningless number. Inference methods run
it on every call (one reduction over ``x``). Non-integer counts only warn (once per likelihood): fractional counts
such as tf-idf weights are a common, deliberate relaxation of the normalised multinomial.

A Gaussian likelihood with variance σ² is the probabilistic reading of a squared-error reconstruction loss:
:func:`log_var_from_squared_error` gives the log σ² under which "squared error + β·KL" is the negative ELBO up to a
positive factor and a constant.

Example:
    >>> import torch
    >>> from learned_inference.likelihoods import make_likelihood
    >>> bern = make_likelihood("bernoulli")
    >>> bern.log_prob(torch.zeros(2, 3), torch.ones(2, 3)).shape
    torch.Size([2])
"""

from __future__ import annotations

import inspect
import math
import warnings

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
    "log_var_from_squared_error",
    "make_likelihood",
    "multinomial_coefficient",
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


def multinomial_log_prob(logits: Tensor, counts: Tensor, *, normalized: bool = False) -> Tensor:
    """Σᵢ xᵢ log softmax(logits)ᵢ over the last dimension: the log-likelihood of the topic-model literature.

    This is the log-probability of the document's tokens as a sequence of independent draws (the convention of
    NVDM, Miao et al. 2016, and of the paper's perplexity, App. D eq. 63), so perplexities computed from it can be
    compared with published ones. With ``normalized=True`` the multinomial coefficient
    (:func:`multinomial_coefficient`) is added: the normalised log Multinomial(counts; N = Σ counts,
    softmax(logits)), a probability of the bag of words. The two differ by a constant per document, so inference
    and training are the same under either.

    Example:
        >>> counts = torch.tensor([[2.0, 1.0]])
        >>> round(multinomial_log_prob(torch.zeros(1, 2), counts).item(), 4)  # 3 draws from (1/2, 1/2)
        -2.0794
        >>> round(multinomial_log_prob(torch.zeros(1, 2), counts, normalized=True).exp().item(), 4)  # 3 orders
        0.375
    """
    tokens = (counts * torch.log_softmax(logits, dim=-1)).sum(-1)
    return tokens + multinomial_coefficient(counts) if normalized else tokens


def multinomial_coefficient(counts: Tensor) -> Tensor:
    """log N! − Σᵢ log xᵢ! over the last dimension (N = Σᵢ xᵢ): the number of token orders of a bag of words.

    Adding it to a literature-convention log-likelihood (:func:`multinomial_log_prob`) gives the normalised
    multinomial log-probability.

    Example:
        >>> multinomial_coefficient(torch.tensor([[2.0, 1.0]])).exp().item()
        3.0...
    """
    return torch.lgamma(counts.sum(-1) + 1) - torch.lgamma(counts + 1).sum(-1)


def _examples(mask: Tensor) -> str:
    """``"3 example(s) (first: [0, 4, 5])"`` for a ``[B, ...]`` mask of offending entries."""
    rows = mask.flatten(1).any(1).nonzero().flatten()
    return f"{rows.numel()} example(s) (first: {rows[:5].tolist()})"


def _first_entry(x: Tensor, mask: Tensor) -> str:
    """``"x[0, 2] = 2.0"``: the first offending entry, to show what the data look like."""
    index = tuple(int(i) for i in mask.nonzero()[0])
    return f"x[{', '.join(map(str, index))}] = {x[index].item():g}"


class Likelihood(nn.Module):
    """Base class: ``log_prob(output, x)`` sums over data dimensions; ``mean(output)`` gives E[x | z].

    Subclasses whose data live on a subset of the reals override :meth:`check_support`.
    """

    def log_prob(self, output: Tensor, x: Tensor) -> Tensor:
        raise NotImplementedError

    def mean(self, output: Tensor) -> Tensor:
        raise NotImplementedError

    def check_support(self, x: Tensor) -> None:
        """Raises ``ValueError`` if ``x`` (``[B, *event]``) is outside the data's support.

        The base class accepts any value: finiteness is checked for every likelihood by
        :func:`~learned_inference.validation.check_data` before inference.
        """


def _check_unit_interval(likelihood: Likelihood, x: Tensor) -> None:
    """The Bernoulli support check: every entry of ``x`` in [0, 1] (binary, or grey levels read as probabilities)."""
    low, high = x.aminmax()
    if bool((low >= 0) & (high <= 1)):  # one reduction and one synchronisation on the happy path
        return
    outside = (x < 0) | (x > 1)
    raise ValueError(
        f"x is outside the support of {type(likelihood).__name__}: values must lie in [0, 1], but "
        f"{_examples(outside)} have values outside it (e.g. {_first_entry(x, outside)}). The Bernoulli log-density "
        "is then a finite but meaningless number. Scale the data to [0, 1] (e.g. x / 255), or use a likelihood for "
        "real-valued data (likelihood='gaussian')."
    )


class BernoulliLikelihood(Likelihood):
    """Bernoulli on logits: log p(x | z) = Σᵢ xᵢ·ℓᵢ − softplus(ℓᵢ), for binary data (paper eqs. 56-57).

    Support: x in [0, 1] (grey levels in between are accepted, as in the usual binary cross-entropy loss).
    """

    def log_prob(self, output: Tensor, x: Tensor) -> Tensor:
        return sum_event_dims(bernoulli_log_prob(output, x), x.dim() - 1)

    def mean(self, output: Tensor) -> Tensor:
        return torch.sigmoid(output)

    def check_support(self, x: Tensor) -> None:
        """Raises ``ValueError`` naming the examples with values outside [0, 1]."""
        _check_unit_interval(self, x)


class BernoulliProbsLikelihood(Likelihood):
    """Bernoulli on probabilities (for decoders that end in a sigmoid), clamped away from 0 and 1.

    Support: x in [0, 1], as for :class:`BernoulliLikelihood`.

    Args:
        eps: the probabilities are clamped to [eps, 1 − eps].
    """

    def __init__(self, *, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps

    def log_prob(self, output: Tensor, x: Tensor) -> Tensor:
        probs = output.clamp(self.eps, 1 - self.eps)
        return sum_event_dims(bernoulli_log_prob(torch.logit(probs), x), x.dim() - 1)

    def mean(self, output: Tensor) -> Tensor:
        return output

    def check_support(self, x: Tensor) -> None:
        """Raises ``ValueError`` naming the examples with values outside [0, 1]."""
        _check_unit_interval(self, x)


class GaussianLikelihood(Likelihood):
    """Gaussian with a global diagonal variance: log N(x; μx(z), σx²) (paper eqs. 8-9).

    Support: every finite x. For a model trained with a squared-error loss, :func:`log_var_from_squared_error`
    gives the matching ``log_var``.

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
        log_var = self.log_var.to(output)  # the output's dtype and device
        return sum_event_dims(gaussian_log_prob(output, log_var, x), x.dim() - 1)

    def mean(self, output: Tensor) -> Tensor:
        return output


class MultinomialLikelihood(Likelihood):
    """Multinomial over the last data dimension (bag-of-words counts) with ``softmax(logits)`` probabilities.

    By default log p(x | z) = Σᵢ xᵢ log softmax(logits)ᵢ, the topic-model literature's convention, so perplexities
    (:func:`~learned_inference.evaluation.perplexity`) can be put beside published ones; ``normalized=True`` adds
    the multinomial coefficient (see :func:`multinomial_log_prob`).

    Support: non-negative counts. Negative counts raise. Non-integer counts (e.g. tf-idf weights) are a weighted
    cross-entropy under the default; with ``normalized=True`` they give the continuous relaxation of the
    coefficient (through ``lgamma``), which is not a probability, and warn once per likelihood.

    Args:
        normalized: include the multinomial coefficient log N! − Σ log xᵢ!.
    """

    def __init__(self, *, normalized: bool = False) -> None:
        super().__init__()
        self.normalized = bool(normalized)
        self._warned_fractional = False

    def log_prob(self, output: Tensor, x: Tensor) -> Tensor:
        return sum_event_dims(multinomial_log_prob(output, x, normalized=self.normalized), x.dim() - 2)

    def mean(self, output: Tensor) -> Tensor:
        return torch.softmax(output, dim=-1)

    def check_support(self, x: Tensor) -> None:
        """Raises ``ValueError`` naming the examples with negative counts; warns (``RuntimeWarning``, once per
        likelihood) about non-integer counts."""
        if bool(x.min() < 0):
            negative = x < 0
            raise ValueError(
                f"x is outside the support of MultinomialLikelihood: counts must be >= 0, but {_examples(negative)} "
                f"have negative entries (e.g. {_first_entry(x, negative)}). The multinomial log-density is then a "
                "finite but meaningless number. Pass raw counts (e.g. word counts per document), not centred or "
                "standardised values."
            )
        if self._warned_fractional or not self.normalized:
            return
        fractional = x != x.round()
        if bool(fractional.any()):
            self._warned_fractional = True
            warnings.warn(
                f"x has non-integer counts in {_examples(fractional)} (e.g. {_first_entry(x, fractional)}); "
                "MultinomialLikelihood(normalized=True) evaluates the continuous relaxation of the multinomial "
                "coefficient there (through lgamma), which is not a normalised probability. Round the counts if they "
                "should be integers, or use normalized=False (the default). This warning is shown once per "
                "likelihood.",
                RuntimeWarning,
                stacklevel=4,
            )


_LIKELIHOODS: dict[str, type[Likelihood]] = {
    "bernoulli": BernoulliLikelihood,
    "bernoulli-probs": BernoulliProbsLikelihood,
    "gaussian": GaussianLikelihood,
    "multinomial": MultinomialLikelihood,
}


def make_likelihood(likelihood: str | Likelihood, **options: object) -> Likelihood:
    """Returns a :class:`Likelihood` from its name or passes an instance through.

    Args:
        likelihood: ``"bernoulli"``, ``"bernoulli-probs"``, ``"gaussian"``, ``"multinomial"``, or an instance.
        **options: keyword arguments of the named likelihood's constructor (e.g. ``log_var`` for ``"gaussian"``).

    Raises:
        ValueError: an unknown name, or options given with an instance.
        TypeError: an option the named likelihood does not take (the error lists the options it does take).
    """
    if isinstance(likelihood, Likelihood):
        if options:
            raise ValueError(f"likelihood options {sorted(options)} only apply when likelihood is given by name")
        return likelihood
    if likelihood not in _LIKELIHOODS:
        raise ValueError(
            f"likelihood must be one of {sorted(_LIKELIHOODS)} or a Likelihood instance, got {likelihood!r}"
        )
    cls = _LIKELIHOODS[likelihood]
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    accepted = [name for name, p in inspect.signature(cls).parameters.items() if p.kind in named]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        takes = f"takes only {accepted}" if accepted else "takes no options"
        raise TypeError(f"unknown option(s) {unknown} for likelihood={likelihood!r}: {cls.__name__} {takes}")
    return cls(**options)


def log_var_from_squared_error(
    *, kl_weight: float = 1.0, error_weight: float = 1.0, reduction: str = "sum", event_size: int | None = None
) -> float:
    """log σ² of the Gaussian likelihood equivalent to a "squared error + β·KL" training loss.

    A VAE trained on, per example, ``a·c·Σᵢ (xᵢ − x̂ᵢ)² + β·KL`` (a = ``error_weight``; c = 1 for a sum over the
    P data entries, c = 1/P for ``F.mse_loss``'s mean) minimises β times

        (a·c/β)·Σᵢ (xᵢ − x̂ᵢ)² + KL  =  −ELBO of N(x; x̂, σ²) with 1/(2σ²) = a·c/β,  up to a constant,

    so σ² = β / (2·a·c). A mean over the batch as well changes nothing (it scales both terms alike). Pass the result
    as ``log_var=`` to a ``"gaussian"`` likelihood: the ELBO that refinement ascends is then the VAE's own training
    objective (divided by β, up to a constant).

    Common losses:

    * ``Σ (x − x̂)² + KL`` (sum of squares): σ² = 1/2, ``log_var_from_squared_error()``;
    * ``½·Σ (x − x̂)² + KL`` (pythae's ``reconstruction_loss="mse"``): σ² = 1, ``error_weight=0.5``;
    * ``F.mse_loss(x̂, x) + w·KL`` (AntixK's PyTorch-VAE, ``w = kld_weight``): σ² = w·P/2,
      ``kl_weight=w, reduction="mean", event_size=P``.

    Args:
        kl_weight: β, the weight of the KL term.
        error_weight: a, the weight of the squared-error term.
        reduction: ``"sum"`` (squared errors summed over each example's entries) or ``"mean"`` (averaged, as
            ``F.mse_loss`` does by default).
        event_size: P, the number of entries per example (e.g. 3·64·64); needed for ``"mean"`` only.

    Returns:
        log σ² (a float).

    Raises:
        ValueError: a weight that is not a positive number, an unknown ``reduction``, or ``event_size`` missing or
            not a positive int for ``"mean"`` (or given for ``"sum"``).

    Example:
        >>> round(log_var_from_squared_error(), 4)                          # Σ (x − x̂)² + KL: σ² = 1/2
        -0.6931
        >>> log_var_from_squared_error(error_weight=0.5)                    # ½ Σ (x − x̂)² + KL: σ² = 1
        0.0
        >>> round(log_var_from_squared_error(kl_weight=0.00025, reduction="mean", event_size=3 * 64 * 64), 4)
        0.4292
    """
    for name, weight in (("kl_weight", kl_weight), ("error_weight", error_weight)):
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight > 0:
            raise ValueError(f"{name} must be a positive number (its weight in the training loss), got {weight!r}")
    if reduction == "sum":
        if event_size is not None:
            raise ValueError("event_size is only used with reduction='mean'; leave it out for a sum of squares")
        return math.log(kl_weight / (2 * error_weight))
    if reduction != "mean":
        raise ValueError(f"reduction must be 'sum' or 'mean' (as in the training loss), got {reduction!r}")
    if isinstance(event_size, bool) or not isinstance(event_size, int) or event_size < 1:
        raise ValueError(f"reduction='mean' needs event_size, the number of entries per example (e.g. C·H·W), as a "
                         f"positive int, got {event_size!r}")
    return math.log(kl_weight * event_size / (2 * error_weight))
