"""How λ changes: the update rules (pure functions) and the small output heads that feed them.

Gated ("highway") update, paper App. B.2, eq. 62, with a separate sigmoid gate for every component of every
parameter (so μ and log σ² are gated independently):

    λ_{t+1} = g_t ⊙ λ_t + (1 − g_t) ⊙ f_t,     g_t = sigmoid(W_g h_t + b_g),  f_t = W_f h_t + b_f.

Residual update (Andrychowicz et al. 2016): λ_{t+1} = λ_t + f_t.

Example:
    >>> import torch
    >>> lam, target = torch.randn(2, 3), torch.randn(2, 3)
    >>> torch.equal(gated_update(lam, target, torch.ones(2, 3)), lam)
    True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from learned_inference.families import Params

__all__ = [
    "GatedUpdate",
    "PerVariableUpdate",
    "ResidualUpdate",
    "Update",
    "gated_update",
    "make_update",
    "residual_update",
]


def gated_update(param: Tensor, target: Tensor, gate: Tensor) -> Tensor:
    """g ⊙ λ + (1 − g) ⊙ f for a gate g in [0, 1] (eq. 62): g = 1 keeps λ exactly."""
    return gate * param + (1 - gate) * target


def residual_update(param: Tensor, delta: Tensor) -> Tensor:
    """λ + f."""
    return param + delta


class Update(nn.Module):
    """Base class: maps the network's hidden state ``[B, H]`` and λ to the next λ.

    Attributes:
        hidden_size: H, the size of the update network's output it reads.
        dim: D, the latent size of the λ it updates.
    """

    hidden_size: int
    dim: int

    def forward(self, hidden: Tensor, params: Params) -> Params:
        raise NotImplementedError

    def parts(self) -> dict[str | None, Update]:
        """The updates by the latent variable they apply to (None: all of λ). A plain update is its only part."""
        return {None: self}


class PerVariableUpdate(Update):
    """One update per latent variable (the heads of a per-variable network); ``state_dict`` keys read
    ``update.<variable>.<...>``.

    Args:
        updates: an :class:`Update` per latent variable, in the order of ``latent_dim``.
    """

    def __init__(self, updates: Mapping[str, Update]) -> None:
        super().__init__()
        for name, update in updates.items():
            self.add_module(name, update)
        self.names = tuple(updates)

    def parts(self) -> dict[str | None, Update]:
        return {name: self.get_submodule(name) for name in self.names}  # type: ignore[misc]


def _heads(names: Sequence[str], hidden_size: int, dim: int, *, init_scale: float | None = None) -> nn.ModuleDict:
    """One linear head per parameter of λ; with ``init_scale``, weights N(0, init_scale²) and zero biases."""
    heads = {name: nn.Linear(hidden_size, dim) for name in names}
    if init_scale is not None:
        for head in heads.values():
            nn.init.normal_(head.weight, std=init_scale)
            nn.init.zeros_(head.bias)
    return nn.ModuleDict(heads)


class GatedUpdate(Update):
    """Eq. 62 with one linear head for the target f and one for the gate g, per parameter of λ.

    Args:
        param_names: the names of λ's parameters (the family's ``param_names``).
        hidden_size: the size H of the update network's output.
        dim: the latent size D.
    """

    def __init__(self, param_names: Sequence[str], *, hidden_size: int, dim: int) -> None:
        super().__init__()
        self.hidden_size, self.dim = hidden_size, dim
        self.targets = _heads(param_names, hidden_size, dim)
        self.gates = _heads(param_names, hidden_size, dim)

    def forward(self, hidden: Tensor, params: Params) -> Params:
        return {
            name: gated_update(value, self.targets[name](hidden), self.gates[name](hidden).sigmoid())
            for name, value in params.items()
        }


class ResidualUpdate(Update):
    """λ + f with one linear head per parameter of λ, initialised small so the first steps stay near λ.

    Args:
        param_names: the names of λ's parameters.
        hidden_size: the size H of the update network's output.
        dim: the latent size D.
        init_scale: the standard deviation of the heads' initial weights.
    """

    def __init__(self, param_names: Sequence[str], *, hidden_size: int, dim: int, init_scale: float = 1e-3) -> None:
        super().__init__()
        self.hidden_size, self.dim = hidden_size, dim
        self.deltas = _heads(param_names, hidden_size, dim, init_scale=init_scale)

    def forward(self, hidden: Tensor, params: Params) -> Params:
        return {name: residual_update(value, self.deltas[name](hidden)) for name, value in params.items()}


_UPDATES: dict[str, type[Update]] = {"gated": GatedUpdate, "residual": ResidualUpdate}


def make_update(update: str, param_names: Sequence[str], *, hidden_size: int, dim: int) -> Update:
    """An :class:`Update` module from its name, ``"gated"`` or ``"residual"``."""
    if update not in _UPDATES:
        raise ValueError(f"update must be one of {sorted(_UPDATES)}, got {update!r}")
    return _UPDATES[update](param_names, hidden_size=hidden_size, dim=dim)
