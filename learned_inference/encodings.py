"""What the update network sees: small, composable encodings of the current inference state.

Each encoding maps an :class:`EncodingInputs` (the λ-gradient, λ itself, the data and, when asked for, the
errors) to a ``[B, F]`` feature tensor; :class:`Concat` joins several, in the spirit of ``optax.chain``.
Names accepted by :func:`make_encoding`: ``"gradient"`` (log/sign, paper App. B.1), ``"standardized_gradient"``,
``"data"``, ``"params"``, ``"errors"`` (paper Sec. 4.1), ``"hierarchical_errors"`` (bottom-up and top-down
precision-weighted errors per level, paper Sec. 4.3, eqs. 60-61). The default, gradient + data + params, is the paper's
best configuration.

Example:
    >>> import torch
    >>> enc = make_encoding(("gradient", "params"))
    >>> g = {"loc": torch.randn(4, 3), "log_var": torch.randn(4, 3)}
    >>> enc(EncodingInputs(grads=g, params=g, x=torch.zeros(4, 7))).shape
    torch.Size([4, 18])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from learned_inference.families import Params

__all__ = [
    "DEFAULT_ENCODING",
    "Concat",
    "Data",
    "Encoding",
    "EncodingInputs",
    "Errors",
    "HierarchicalErrors",
    "LogSignGradient",
    "PosteriorParams",
    "StandardizedGradient",
    "log_sign_encode",
    "make_encoding",
    "standardize",
]

DEFAULT_ENCODING = ("gradient", "data", "params")


@dataclass(frozen=True)
class EncodingInputs:
    """Everything an encoding may look at, for one refinement step.

    Attributes:
        grads: ∇_λ L, a dict of ``[B, D]`` tensors keyed like ``params``.
        params: the current λ.
        x: the data, ``[B, *event]``.
        errors: ``(εx, εz)`` = (x − E[x | z], z − μ_p) averaged over samples, when the encoding needs them.
        level_errors: the precision-weighted error of every level, bottom-up (``{"x": ..., "z1": ..., ...}``,
            see :func:`~learned_inference.hierarchical.precision_weighted_errors`), when the encoding needs them.
        variable: the latent variable that ``grads`` and ``params`` are restricted to (one update network per
            variable), or None when they cover all of λ.
    """

    grads: Params
    params: Params
    x: Tensor
    errors: tuple[Tensor, Tensor] | None = None
    level_errors: dict[str, Tensor] | None = None
    variable: str | None = None


def log_sign_encode(g: Tensor, *, alpha: float, eps: float) -> Tensor:
    """[α·log(|g| + ε), sign(g)] along the last dimension (paper App. B.1, Andrychowicz et al. 2016).

    Finite for every finite g (|g| up to the dtype's maximum): log grows only logarithmically.
    """
    return torch.cat([alpha * torch.log(g.abs() + eps), torch.sign(g)], dim=-1)


def standardize(g: Tensor, *, eps: float) -> Tensor:
    """Per-example standardisation over the last dimension: (g − mean) / (std + ε)."""
    mean = g.mean(-1, keepdim=True)
    std = g.std(-1, keepdim=True, correction=0)
    return (g - mean) / (std + eps)


class Encoding:
    """Base class: ``__call__(inputs) -> [B, F]``; ``needs_errors`` / ``needs_level_errors`` say whether
    ``inputs.errors`` / ``inputs.level_errors`` are used."""

    needs_errors: bool = False
    needs_level_errors: bool = False

    def __call__(self, inputs: EncodingInputs) -> Tensor:
        raise NotImplementedError


class LogSignGradient(Encoding):
    """[α·log(|∇λL| + ε), sign(∇λL)] for every component of λ.

    Args:
        alpha: the scale α of the log-magnitude.
        eps: the stabiliser ε inside the log.
    """

    def __init__(self, *, alpha: float = 0.1, eps: float = 1e-8) -> None:
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        self.alpha, self.eps = alpha, eps

    def __call__(self, inputs: EncodingInputs) -> Tensor:
        return torch.cat([log_sign_encode(g, alpha=self.alpha, eps=self.eps) for g in inputs.grads.values()], -1)

    def __repr__(self) -> str:
        return f"LogSignGradient(alpha={self.alpha}, eps={self.eps})"


class StandardizedGradient(Encoding):
    """Each example's gradient standardised to zero mean and unit variance over the latent dimensions.

    Args:
        eps: added to the standard deviation.
    """

    def __init__(self, *, eps: float = 1e-5) -> None:
        self.eps = eps

    def __call__(self, inputs: EncodingInputs) -> Tensor:
        return torch.cat([standardize(g, eps=self.eps) for g in inputs.grads.values()], -1)

    def __repr__(self) -> str:
        return f"StandardizedGradient(eps={self.eps})"


class Data(Encoding):
    """The data x, flattened to ``[B, prod(event)]``.

    For count data (bag-of-words) use ``Data(log1p=True)``: raw counts reach the hundreds and train badly (on 20
    Newsgroups, perplexity 15.6 with raw counts vs 14.8 with log(1 + x), ``benchmarks/results/text_perplexity.md``).

    Args:
        log1p: encode log(1 + x) instead of x (for count data).
    """

    def __init__(self, *, log1p: bool = False) -> None:
        self.log1p = log1p

    def __call__(self, inputs: EncodingInputs) -> Tensor:
        x = inputs.x.flatten(1)
        return torch.log1p(x) if self.log1p else x

    def __repr__(self) -> str:
        return f"Data(log1p={self.log1p})"


class PosteriorParams(Encoding):
    """The current λ (e.g. μ and log σ²), concatenated."""

    def __call__(self, inputs: EncodingInputs) -> Tensor:
        return torch.cat(list(inputs.params.values()), -1)

    def __repr__(self) -> str:
        return "PosteriorParams()"


class Errors(Encoding):
    """The errors [εx, εz] = [x − E[x | z], z − μ_p] (paper Sec. 4.1, constant variances dropped as in B.1).

    Needs a model with ``likelihood_mean(z)`` and ``prior()``.
    """

    needs_errors = True

    def __call__(self, inputs: EncodingInputs) -> Tensor:
        if inputs.errors is None:
            raise ValueError("the errors encoding needs EncodingInputs.errors = (εx, εz)")
        error_x, error_z = inputs.errors
        return torch.cat([error_x.flatten(1), error_z], -1)

    def __repr__(self) -> str:
        return "Errors()"


class HierarchicalErrors(Encoding):
    """Bottom-up and top-down precision-weighted errors of a hierarchical model (paper Sec. 4.3, eqs. 60-61).

    With ε_ℓ = E_q[(v_ℓ − μ_ℓ,p) / σ²_ℓ,p] (level 0 is x), the gradient for level ℓ's posterior is built from the
    bottom-up error ε_ℓ−1 and the top-down error ε_ℓ. For one latent variable ℓ (``inputs.variable``, one update
    network per variable) the features are [ε_ℓ−1, ε_ℓ]; for all of λ they are [ε_x, ε_1, …, ε_L]. Needs a model
    with ``conditionals(z)`` (see :mod:`learned_inference.hierarchical`).

    Precision-weighted errors range over orders of magnitude while inference runs (large far from the optimum,
    small near it), which the paper notes makes them hard to learn from (App. B.1); by default each error is
    therefore encoded like the gradient, as [α·log(|ε| + eps), sign(ε)].

    Args:
        log_sign: encode [α·log(|ε| + eps), sign(ε)] (default) instead of the raw errors.
        alpha: the scale α of the log-magnitude.
        eps: the stabiliser inside the log.

    Example:
        >>> import torch
        >>> errors = {"x": torch.ones(2, 5), "z1": torch.ones(2, 3), "z2": torch.ones(2, 1)}
        >>> inputs = EncodingInputs(grads={}, params={}, x=torch.ones(2, 5), level_errors=errors, variable="z2")
        >>> HierarchicalErrors(log_sign=False)(inputs).shape
        torch.Size([2, 4])
    """

    needs_level_errors = True

    def __init__(self, *, log_sign: bool = True, alpha: float = 0.1, eps: float = 1e-8) -> None:
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        self.log_sign, self.alpha, self.eps = log_sign, alpha, eps

    def __call__(self, inputs: EncodingInputs) -> Tensor:
        errors = inputs.level_errors
        if errors is None:
            raise ValueError("the hierarchical_errors encoding needs EncodingInputs.level_errors")
        levels = list(errors)
        if inputs.variable is not None:
            if inputs.variable not in levels[1:]:
                raise ValueError(f"EncodingInputs.variable must be one of the latent levels {levels[1:]}, got "
                                 f"{inputs.variable!r}")
            index = levels.index(inputs.variable)
            levels = levels[index - 1:index + 1]
        features = torch.cat([errors[level] for level in levels], -1)
        return log_sign_encode(features, alpha=self.alpha, eps=self.eps) if self.log_sign else features

    def __repr__(self) -> str:
        return f"HierarchicalErrors(log_sign={self.log_sign}, alpha={self.alpha}, eps={self.eps})"


class Concat(Encoding):
    """Concatenates the features of several encodings (in order)."""

    def __init__(self, *encodings: Encoding) -> None:
        if not encodings:
            raise ValueError("Concat needs at least one encoding")
        self.encodings = encodings
        self.needs_errors = any(e.needs_errors for e in encodings)
        self.needs_level_errors = any(e.needs_level_errors for e in encodings)

    def __call__(self, inputs: EncodingInputs) -> Tensor:
        return torch.cat([e(inputs) for e in self.encodings], -1)

    def __repr__(self) -> str:
        return f"Concat({', '.join(map(repr, self.encodings))})"


_ENCODINGS: dict[str, type[Encoding]] = {
    "gradient": LogSignGradient,
    "standardized_gradient": StandardizedGradient,
    "data": Data,
    "params": PosteriorParams,
    "errors": Errors,
    "hierarchical_errors": HierarchicalErrors,
}


def make_encoding(spec: str | Encoding | Sequence[str | Encoding]) -> Encoding:
    """An :class:`Encoding` from a name, an instance, or a sequence of them (concatenated in order)."""
    if isinstance(spec, Encoding):
        return spec
    if isinstance(spec, str):
        if spec not in _ENCODINGS:
            raise ValueError(f"encoding must be one of {sorted(_ENCODINGS)} or an Encoding, got {spec!r}")
        return _ENCODINGS[spec]()
    if not isinstance(spec, Sequence):
        raise TypeError(f"encoding must be a name, an Encoding or a sequence of them, got {type(spec).__name__}")
    parts = [make_encoding(s) for s in spec]
    if not parts:
        raise ValueError(f"encoding must name at least one of {sorted(_ENCODINGS)}, got an empty sequence")
    return parts[0] if len(parts) == 1 else Concat(*parts)
