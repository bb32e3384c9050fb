"""What the update network sees: small, composable encodings of the current inference state.

Each encoding maps a :class:`~learned_inference.context.StepContext` (the λ-gradient, λ itself, the data, and
the errors it computes on demand) to a ``[B, F]`` feature tensor, and says how many features it gives
(:meth:`Encoding.num_features`, so update networks can be sized before the first call); :class:`Concat` joins
several, in the spirit of ``optax.chain``.
Names accepted by :func:`make_encoding`: ``"gradient"`` (log/sign, paper App. B.1), ``"standardized_gradient"``,
``"data"``, ``"params"``, ``"errors"`` (paper Sec. 4.1), ``"hierarchical_errors"`` (bottom-up and top-down
precision-weighted errors per level, paper Sec. 4.3, eqs. 60-61). The default, gradient + data + params, is the paper's
best configuration.

Example:
    >>> enc = make_encoding(("gradient", "params"))
    >>> enc.num_features(FeatureShapes(data=7, params={"loc": 3, "log_var": 3}, levels={"x": 7, "z": 3}))
    18
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from learned_inference.context import StepContext
from learned_inference.hierarchical import OBSERVED, check_hierarchical_model
from learned_inference.latent_space import LatentSpace
from learned_inference.model import LatentModel

__all__ = [
    "DEFAULT_ENCODING",
    "Concat",
    "Data",
    "Encoding",
    "Errors",
    "FeatureShapes",
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
class FeatureShapes:
    """The sizes an encoding's feature count depends on (one view: all of λ, or one latent variable's block).

    Attributes:
        data: the number of data features, prod(event).
        params: the size of each of λ's parameters in this view (``{"loc": D, "log_var": D}``).
        levels: the size of every level of the model, bottom-up, the data first (``{"x": F, "z1": D1, …}``).
        variable: the latent variable of this view, or None for all of λ.
    """

    data: int
    params: Mapping[str, int]
    levels: Mapping[str, int]
    variable: str | None = None

    @classmethod
    def of(cls, *, data: int, param_names: Sequence[str] | Mapping[str, int], space: LatentSpace,
           variable: str | None = None) -> FeatureShapes:
        """The shapes of a view of λ over ``space`` (restricted to ``variable`` when given); ``param_names`` may map
        each name to its width (a family's ``param_sizes``) where it is not the latent size."""
        size = space.total_dim if variable is None else space.sizes[variable]
        levels = {OBSERVED: data, **space.sizes} if space.names is not None else {OBSERVED: data, "z": size}
        params = dict(param_names) if isinstance(param_names, Mapping) else dict.fromkeys(param_names, size)
        return cls(data=data, params=params, levels=levels, variable=variable)


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
    """Base class: ``__call__(context) -> [B, F]`` with F = ``num_features(shapes)``.

    ``step_constant`` marks an encoding whose features depend on the data alone, the same at every step of a run
    (the learned step projects them once per run).
    """

    step_constant: bool = False

    def __call__(self, context: StepContext) -> Tensor:
        raise NotImplementedError

    def num_features(self, shapes: FeatureShapes) -> int:
        """The feature count F for a view of these shapes."""
        raise NotImplementedError

    def check(self, model: LatentModel, space: LatentSpace) -> None:
        """Raises a ``ValueError`` naming what is missing if ``model`` cannot provide this encoding's inputs."""


def _check_eps(eps: float, owner: str) -> None:
    """Raises a ``ValueError`` naming ``eps``, why it must be positive and what to pass, unless ``eps > 0``."""
    if not eps > 0:
        raise ValueError(
            f"{owner}(eps={eps!r}): eps must be > 0. It is the ε in log(|g| + ε), which keeps the log-magnitude "
            "finite where a component g is exactly 0; with eps <= 0 (or NaN) the encoding is -inf or NaN there and "
            "the update network's output with it. Pass a small positive value, e.g. the default eps=1e-8"
        )


class LogSignGradient(Encoding):
    """[α·log(|∇λL| + ε), sign(∇λL)] for every component of λ.

    Args:
        alpha: the scale α of the log-magnitude.
        eps: the stabiliser ε inside the log.
    """

    def __init__(self, *, alpha: float = 0.1, eps: float = 1e-8) -> None:
        _check_eps(eps, type(self).__name__)
        self.alpha, self.eps = alpha, eps

    def __call__(self, context: StepContext) -> Tensor:
        return torch.cat([log_sign_encode(g, alpha=self.alpha, eps=self.eps) for g in context.grads.values()], -1)

    def num_features(self, shapes: FeatureShapes) -> int:
        return 2 * sum(shapes.params.values())

    def __repr__(self) -> str:
        return f"LogSignGradient(alpha={self.alpha}, eps={self.eps})"


class StandardizedGradient(Encoding):
    """Each example's gradient standardised to zero mean and unit variance over the latent dimensions.

    Args:
        eps: added to the standard deviation.
    """

    def __init__(self, *, eps: float = 1e-5) -> None:
        self.eps = eps

    def __call__(self, context: StepContext) -> Tensor:
        return torch.cat([standardize(g, eps=self.eps) for g in context.grads.values()], -1)

    def num_features(self, shapes: FeatureShapes) -> int:
        return sum(shapes.params.values())

    def __repr__(self) -> str:
        return f"StandardizedGradient(eps={self.eps})"


class Data(Encoding):
    """The data x, flattened to ``[B, prod(event)]``.

    For count data (bag-of-words) use ``Data(log1p=True)``: raw counts reach the hundreds and train badly (on 20
    Newsgroups, with the paper's gated update, perplexity including the multinomial coefficient 15.6 with raw counts
    vs 14.8 with log(1 + x); ``benchmarks/text_perplexity.py`` uses log(1 + x)).

    Args:
        log1p: encode log(1 + x) instead of x (for count data).
    """

    step_constant = True

    def __init__(self, *, log1p: bool = False) -> None:
        self.log1p = log1p

    def __call__(self, context: StepContext) -> Tensor:
        x = context.x.flatten(1)
        return torch.log1p(x) if self.log1p else x

    def num_features(self, shapes: FeatureShapes) -> int:
        return shapes.data

    def __repr__(self) -> str:
        return f"Data(log1p={self.log1p})"


class PosteriorParams(Encoding):
    """The current λ (e.g. μ and log σ²), concatenated."""

    def __call__(self, context: StepContext) -> Tensor:
        return torch.cat(list(context.params.values()), -1)

    def num_features(self, shapes: FeatureShapes) -> int:
        return sum(shapes.params.values())

    def __repr__(self) -> str:
        return "PosteriorParams()"


class Errors(Encoding):
    """The errors [εx, εz] = [x − E[x | z], z − μ_p] (paper Sec. 4.1, constant variances dropped as in B.1).

    Needs a model with ``likelihood_mean(z)`` and ``prior()``.
    """

    def __call__(self, context: StepContext) -> Tensor:
        error_x, error_z = context.observation_errors
        return torch.cat([error_x.flatten(1), error_z], -1)

    def num_features(self, shapes: FeatureShapes) -> int:
        return shapes.data + next(iter(shapes.params.values()))

    def check(self, model: LatentModel, space: LatentSpace) -> None:
        for method in ("likelihood_mean", "prior"):
            if not callable(getattr(model, method, None)):
                raise ValueError(
                    f"the 'errors' encoding needs model.{method}(); {type(model).__name__} has none "
                    "(DecoderModel and VAEModel provide it), or use encoding=('gradient', 'data', 'params')"
                )

    def __repr__(self) -> str:
        return "Errors()"


class HierarchicalErrors(Encoding):
    """Bottom-up and top-down precision-weighted errors of a hierarchical model (paper Sec. 4.3, eqs. 60-61).

    With ε_ℓ = E_q[(v_ℓ − μ_ℓ,p) / σ²_ℓ,p] (level 0 is x), the gradient for level ℓ's posterior is built from the
    bottom-up error ε_ℓ−1 and the top-down error ε_ℓ. For one latent variable ℓ (``context.variable``, one update
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
        >>> shapes = FeatureShapes(data=5, params={"loc": 1}, levels={"x": 5, "z1": 3, "z2": 1}, variable="z2")
        >>> HierarchicalErrors().num_features(shapes)      # [ε_1, ε_2] (3 + 1) for the view of z2, log/sign: × 2
        8
    """

    def __init__(self, *, log_sign: bool = True, alpha: float = 0.1, eps: float = 1e-8) -> None:
        _check_eps(eps, type(self).__name__)
        self.log_sign, self.alpha, self.eps = log_sign, alpha, eps

    def __call__(self, context: StepContext) -> Tensor:
        errors = context.level_errors
        features = torch.cat([errors[level] for level in self._levels(list(errors), context.variable)], -1)
        return log_sign_encode(features, alpha=self.alpha, eps=self.eps) if self.log_sign else features

    def num_features(self, shapes: FeatureShapes) -> int:
        size = sum(shapes.levels[level] for level in self._levels(list(shapes.levels), shapes.variable))
        return 2 * size if self.log_sign else size

    def check(self, model: LatentModel, space: LatentSpace) -> None:
        check_hierarchical_model(model, space)

    @staticmethod
    def _levels(levels: list[str], variable: str | None) -> list[str]:
        """All levels, or for one variable's view the level below it and its own."""
        if variable is None:
            return levels
        if variable not in levels[1:]:
            raise ValueError(f"the view's variable must be one of the latent levels {levels[1:]}, got {variable!r}")
        index = levels.index(variable)
        return levels[index - 1:index + 1]

    def __repr__(self) -> str:
        return f"HierarchicalErrors(log_sign={self.log_sign}, alpha={self.alpha}, eps={self.eps})"


class Concat(Encoding):
    """Concatenates the features of several encodings (in order)."""

    def __init__(self, *encodings: Encoding) -> None:
        if not encodings:
            raise ValueError("Concat needs at least one encoding")
        self.encodings = encodings

    def __call__(self, context: StepContext) -> Tensor:
        return torch.cat([e(context) for e in self.encodings], -1)

    def num_features(self, shapes: FeatureShapes) -> int:
        return sum(e.num_features(shapes) for e in self.encodings)

    def check(self, model: LatentModel, space: LatentSpace) -> None:
        for encoding in self.encodings:
            encoding.check(model, space)

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
