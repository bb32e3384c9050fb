"""Hierarchical latent models: the per-level conditionals protocol and the precision-weighted errors.

A strict hierarchy z_L → … → z_2 → z_1 → x (paper Sec. 4.3, App. A.6) lists its latent variables bottom-up in
``latent_dim`` (``{"z1": 64, "z2": 32}``: z1 next to the data). A model may expose, besides ``log_joint(x, z)``,

    ``conditionals(z) -> {"x": (μ_x, σ²_x), "z1": (μ_1,p, σ²_1,p), …, "zL": (μ_L,p, σ²_L,p)}``

the mean and variance of every level given the level above it (the top level's prior), evaluated at the
samples z (a dict of ``[..., B, D_ℓ]`` tensors; the entries have the same leading shape). From them
:func:`~learned_inference.errors.precision_weighted_errors` computes, for every level ℓ (x counts as level 0),

    ε_ℓ = E_q[(v_ℓ − μ_ℓ,p) / σ²_ℓ,p],      v_0 = x,  v_ℓ = z_ℓ = μ_ℓ,q + σ_ℓ,q ⊙ ε  (ℓ ≥ 1),

averaged over the samples. The gradient of the ELBO with respect to level ℓ's posterior mean is made of these
terms (eq. 60): ∇_{μ_ℓ,q} L = E[(∂μ_ℓ−1,p / ∂z_ℓ)ᵀ ε_ℓ−1 − ε_ℓ]: a *bottom-up* error ε_ℓ−1 from the level below
and a *top-down* error ε_ℓ from the prior the level above generates; eq. 61 has the same two terms for σ²_ℓ,q
plus ½ σ⁻²_ℓ,q from the entropy. A standard (bottom-up) encoder cannot see the top-down term; the
``"hierarchical_errors"`` encoding (:class:`~learned_inference.encodings.HierarchicalErrors`) gives both to
the update network. For a Bernoulli observation return σ²_x = 1: x − μ_x is the gradient with respect to the
logits (eqs. 56-57), and it stays bounded where the Bernoulli variance μ(1 − μ) vanishes.

Example:
    >>> import torch
    >>> from learned_inference.zoo import LinearGaussianHierarchy
    >>> model = LinearGaussianHierarchy.random(data_dim=6, latent_dims=(3, 2))
    >>> isinstance(model, HierarchicalModel)
    True
    >>> moments = model.conditionals({"z1": torch.zeros(5, 3), "z2": torch.zeros(5, 2)})
    >>> {level: tuple(mean.shape) for level, (mean, variance) in moments.items()}
    {'x': (5, 6), 'z1': (5, 3), 'z2': (5, 2)}
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor

from learned_inference.latent_space import LatentSpace

__all__ = ["OBSERVED", "HierarchicalModel", "check_hierarchical_model"]

#: the key of the observed level in ``conditionals(z)`` and in the errors
OBSERVED = "x"


@runtime_checkable
class HierarchicalModel(Protocol):
    """A latent model that exposes every level's conditional mean and variance given the level above."""

    def log_joint(self, x: Tensor, z: dict[str, Tensor]) -> Tensor: ...

    def conditionals(self, z: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]: ...


def check_hierarchical_model(model: object, space: LatentSpace) -> None:
    """Raises ``ValueError`` unless ``model`` has ``conditionals`` and ``space`` names several latent variables
    (none of them called ``"x"``, the observed level's key)."""
    if not callable(getattr(model, "conditionals", None)):
        raise ValueError(
            f"the 'hierarchical_errors' encoding needs model.conditionals(z) -> {{level: (mean, variance)}} (see "
            f"learned_inference.hierarchical); {type(model).__name__} has none. Use encoding=('gradient', 'data', "
            "'params') for any model."
        )
    if space.names is None:
        raise ValueError("the 'hierarchical_errors' encoding needs latent_dim as a dict of sizes, listed bottom-up "
                         "(e.g. {'z1': 64, 'z2': 32})")
    if OBSERVED in space.names:
        raise ValueError(f"latent_dim must not name a latent variable {OBSERVED!r}: that key is the observed level")
