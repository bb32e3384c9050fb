"""``FamilyEncoder``: an inference network x → λ for any posterior family, one linear head per parameter of λ.

A highway MLP body (ELU, paper App. C) reads the flattened data and one linear head per parameter gives λ, each
head as wide as the family says (:meth:`~learned_inference.families.Family.param_sizes`): for a
:class:`~learned_inference.mixture.GaussianMixture` with K components over D dimensions, μ and log σ² of width
K·D and the K logits. It is the *non-recursive mixture encoder* (all components from one network, trained on the
mixture's ELBO); the baselines build it for ``init="highway"`` with such a family. (The diagonal Gaussian keeps
its :class:`~learned_inference.networks.HighwayEncoder`, whose ``(loc, log_var)`` output and state-dict names
models and checkpoints rely on.)

Example:
    >>> import torch
    >>> from learned_inference.mixture import GaussianMixture
    >>> encoder = FamilyEncoder(GaussianMixture(num_components=3).param_sizes(2), hidden_size=8)
    >>> {name: tuple(value.shape) for name, value in encoder(torch.zeros(5, 4, 4)).items()}
    {'loc': (5, 6), 'log_var': (5, 6), 'logits': (5, 3)}
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from learned_inference.networks import HighwayMLP
from learned_inference.validation import check_int

__all__ = ["FamilyEncoder"]


class FamilyEncoder(nn.Module):
    """x → {name: head_name(body(x))}: a highway MLP body with a linear head per parameter of λ.

    The body's input layer is lazy (sized on the first call); ``x`` ``[B, *event]`` is flattened to ``[B, F]``.

    Args:
        param_sizes: the width of each parameter of λ, in order (a family's ``param_sizes(latent_dim)``).
        hidden_size: units per hidden layer.
        num_layers: hidden layers.
    """

    def __init__(self, param_sizes: Mapping[str, int], *, hidden_size: int = 512, num_layers: int = 2) -> None:
        super().__init__()
        if not param_sizes:
            raise ValueError("param_sizes must name at least one parameter of λ, got an empty mapping")
        for name, size in param_sizes.items():
            check_int(f"param_sizes[{name!r}]", size, minimum=1)
        self.body = HighwayMLP(hidden_size=hidden_size, num_layers=num_layers)
        self.heads = nn.ModuleDict({name: nn.Linear(hidden_size, size) for name, size in param_sizes.items()})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        hidden, _ = self.body(x.flatten(1))
        return {name: head(hidden) for name, head in self.heads.items()}
