"""Prediction errors the update network may see: the observation errors and a hierarchy's precision-weighted errors.

Observation errors (paper Sec. 4.1; constant variances dropped, App. B.1), averaged over the S samples z_s ~ q_λ:

    ε_x = x − E[x | z],      ε_z = z − μ_p.

Precision-weighted errors of a hierarchy z_L → … → z_1 → x (Sec. 4.3, eqs. 60-61; see
:mod:`learned_inference.hierarchical` for the ``conditionals(z)`` protocol), for every level ℓ (x is level 0):

    ε_ℓ = E_q[(v_ℓ − μ_ℓ,p) / σ²_ℓ,p],      v_0 = x,  v_ℓ = z_ℓ.

Example:
    >>> import torch
    >>> from learned_inference.zoo import LinearGaussianHierarchy
    >>> gen = torch.Generator().manual_seed(0)
    >>> model = LinearGaussianHierarchy.random(data_dim=6, latent_dims=(3, 2), generator=gen)
    >>> z = {"z1": torch.zeros(4, 5, 3), "z2": torch.zeros(4, 5, 2)}
    >>> {level: tuple(e.shape) for level, e in precision_weighted_errors(model, torch.zeros(5, 6), z).items()}
    {'x': (5, 6), 'z1': (5, 3), 'z2': (5, 2)}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from learned_inference.hierarchical import OBSERVED, HierarchicalModel
from learned_inference.latent_space import Latents

__all__ = ["observation_errors", "precision_weighted_errors"]


def observation_errors(
    model: Any, x: Tensor, z: Tensor, z_latents: Latents, prior_loc: Tensor
) -> tuple[Tensor, Tensor]:
    """(ε_x, ε_z) = (x − E[x | z], z − μ_p), averaged over the samples.

    Args:
        model: has ``likelihood_mean(z)`` (``DecoderModel`` and ``VAEModel`` provide it).
        x: the data ``[B, *event]``.
        z: flat samples ``[S, B, D]``.
        z_latents: the same samples in the model's layout (a dict for several variables).
        prior_loc: the prior mean μ_p, ``[D]``.
    """
    mean_x = model.likelihood_mean(z_latents).mean(0)
    return x - mean_x, (z - prior_loc.to(z)).mean(0)


def precision_weighted_errors(model: HierarchicalModel, x: Tensor, z: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """ε_ℓ = mean over samples of (v_ℓ − μ_ℓ,p) / σ²_ℓ,p for every level, bottom-up (x first, then ``z``'s order).

    Args:
        model: has ``conditionals(z)`` (see the module docstring).
        x: the data, ``[B, *event]``.
        z: samples, a dict of ``[S, B, D_ℓ]`` tensors in bottom-up order.

    Returns:
        ``{"x": [B, prod(event)], name: [B, D_ℓ] for name in z}`` (x flattened).
    """
    moments = model.conditionals(dict(z))
    missing = [level for level in (OBSERVED, *z) if level not in moments]
    if missing:
        raise ValueError(f"model.conditionals(z) must return (mean, variance) for levels {[OBSERVED, *z]}; "
                         f"missing {missing}")
    values = {OBSERVED: x, **z}
    errors = {}
    for level, value in values.items():
        mean, variance = moments[level]
        errors[level] = ((value - mean) / variance).mean(0)
    errors[OBSERVED] = errors[OBSERVED].flatten(1)
    return errors
