"""The learned update networks: they map encoded features ``[B, F]`` to a hidden representation ``[B, H]``.

* :class:`HighwayMLP` (default): feed-forward, ELU, highway connections between hidden layers (paper App. B.3,
  C). It carries no state, so training can detach between steps and keep memory flat in the number of steps.
* :class:`RecurrentNetwork`: an LSTM or GRU cell whose state carries non-local (momentum-like) information;
  trained by backpropagation through the steps.
* :class:`PerVariableNetwork`: one update network per latent variable (a composite; each sees its own view).
* :class:`HighwayEncoder`: the standard inference network x → (μ, log σ²) built from the same highway layers.

The first layer is lazy (``nn.LazyLinear``) unless ``input_size`` is given: its input size is fixed by
:meth:`UpdateNetwork.materialize` (the learned optimizer calls it when the data's size is known) or on the first
call, as Pyro's autoguides set up their parameters on first use. Optimizers may be built before that. A network
that is not sized yet leaves its input layer out of ``state_dict()`` (so ``torch.load`` with its defaults reads
the file), and loading such a state dict keeps the layer lazy.

Example:
    >>> import torch
    >>> net = HighwayMLP(hidden_size=8, num_layers=2)
    >>> hidden, state = net(torch.randn(5, 3))
    >>> hidden.shape, state is None
    (torch.Size([5, 8]), True)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy

from learned_inference.validation import check_int

__all__ = [
    "HighwayEncoder",
    "HighwayLayer",
    "HighwayMLP",
    "PerVariableNetwork",
    "RecurrentNetwork",
    "UpdateNetwork",
    "make_network",
]

State = tuple[Tensor, ...] | None


def _input_layer(hidden_size: int, input_size: int | None) -> nn.Linear:
    return nn.LazyLinear(hidden_size) if input_size is None else nn.Linear(input_size, hidden_size)


def _drop_unsized(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """state_dict post-hook: unsized (lazy) parameters are left out, so the file loads with ``weights_only``."""
    for name, param in module.named_parameters():
        if is_lazy(param):
            state_dict.pop(prefix + name, None)


def _allow_unsized(module: nn.Module, incompatible_keys: Any) -> None:
    """load_state_dict post-hook: keys missing for parameters that are still lazy are not an error."""
    for name, param in module.named_parameters():
        if is_lazy(param):
            for key in [k for k in incompatible_keys.missing_keys if k == name or k.endswith("." + name)]:
                incompatible_keys.missing_keys.remove(key)


class UpdateNetwork(nn.Module):
    """Base class: ``forward(features, state) -> (hidden, state)``; ``recurrent`` says whether state is used.

    Subclasses build their first layer with ``self.input = _input_layer(hidden_size, input_size)`` and implement
    :meth:`after_input`, the network after it (``forward`` is ``after_input(input(features), state)``). A learned
    step then computes the input layer's share of the features that stay the same over a run (the data) once per
    run instead of at every step (:class:`~learned_inference.context.RunConstants`). A subclass may override
    ``forward`` instead; it then sees all features at every step.
    """

    recurrent: bool = False
    hidden_size: int
    input: nn.Linear

    def __init__(self) -> None:
        super().__init__()
        self.register_state_dict_post_hook(_drop_unsized)
        self.register_load_state_dict_post_hook(_allow_unsized)

    def forward(self, features: Tensor, state: State = None, *, projected: Tensor | None = None
                ) -> tuple[Tensor, State]:
        """``(hidden, state)`` from the encoded ``features`` ``[B, F]``.

        Args:
            features: the encoded features.
            state: the state carried from the previous step (None at the first, and for feed-forward networks).
            projected: the input layer's output W f + b when the caller has computed it; ``features`` are then
                the part it computed at this step (a learned step adds the data's share, computed once per run).
        """
        return self.after_input(self.input(features) if projected is None else projected, state)

    def after_input(self, projected: Tensor, state: State = None) -> tuple[Tensor, State]:
        """The network after its input layer: ``(hidden, state)`` from the input layer's output W f + b."""
        raise NotImplementedError

    @property
    def is_sized(self) -> bool:
        """Whether the input layer has its shape."""
        return not any(is_lazy(p) for p in self.parameters())

    def materialize(self, input_size: int) -> None:
        """Sizes a lazy input layer for ``input_size`` features (its weights are drawn now); checks a sized one."""
        check_int("input_size", input_size, minimum=1)
        if self.is_sized:
            expected = self.input.weight.shape[1]
            if expected != input_size:
                raise ValueError(f"the update network's input layer takes {expected} features, but the encoding "
                                 f"gives {input_size}: was it built or loaded for other data or another encoding?")
            return
        weight = self.input.weight
        with torch.no_grad():
            self.input(torch.empty(0, input_size, dtype=weight.dtype, device=weight.device))

    def parts(self) -> dict[str | None, UpdateNetwork]:
        """The networks by the latent variable they update (None: all of λ). A plain network is its only part."""
        return {None: self}


class HighwayLayer(nn.Module):
    """h ← t ⊙ ELU(W h + b) + (1 − t) ⊙ h, with the transform gate t = sigmoid(W_t h + b_t)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.transform = nn.Linear(size, size)
        self.gate = nn.Linear(size, size)
        nn.init.constant_(self.gate.bias, -1.0)

    def forward(self, h: Tensor) -> Tensor:
        t = torch.sigmoid(self.gate(h))
        return t * nn.functional.elu(self.transform(h)) + (1 - t) * h


class HighwayMLP(UpdateNetwork):
    """Feed-forward update network: a lazy input layer with ELU, then ``num_layers − 1`` highway layers.

    Args:
        hidden_size: units per layer.
        num_layers: number of hidden layers (at least 1).
        input_size: the number of input features, or None to size the input layer later (lazily).
    """

    def __init__(self, *, hidden_size: int = 512, num_layers: int = 2, input_size: int | None = None) -> None:
        super().__init__()
        self.hidden_size = check_int("hidden_size", hidden_size, minimum=1)
        check_int("num_layers", num_layers, minimum=1)
        self.input = _input_layer(hidden_size, input_size)
        self.layers = nn.Sequential(*(HighwayLayer(hidden_size) for _ in range(num_layers - 1)))

    def after_input(self, projected: Tensor, state: State = None) -> tuple[Tensor, State]:
        return self.layers(nn.functional.elu(projected)), None


class RecurrentNetwork(UpdateNetwork):
    """Recurrent update network: a lazy ELU input layer, then an LSTM or GRU cell.

    Args:
        cell: ``"lstm"`` or ``"gru"``.
        hidden_size: units of the input layer and of the cell.
        input_size: the number of input features, or None to size the input layer later (lazily).
    """

    recurrent = True

    def __init__(self, *, cell: str = "lstm", hidden_size: int = 512, input_size: int | None = None) -> None:
        super().__init__()
        cells = {"lstm": nn.LSTMCell, "gru": nn.GRUCell}
        if cell not in cells:
            raise ValueError(f"cell must be one of {sorted(cells)}, got {cell!r}")
        self.hidden_size = check_int("hidden_size", hidden_size, minimum=1)
        self.input = _input_layer(hidden_size, input_size)
        self.cell = cells[cell](hidden_size, hidden_size)

    def after_input(self, projected: Tensor, state: State = None) -> tuple[Tensor, State]:
        inputs = nn.functional.elu(projected)
        if isinstance(self.cell, nn.LSTMCell):
            h, c = self.cell(inputs, state)
            return h, (h, c)
        h = self.cell(inputs, None if state is None else state[0])
        return h, (h,)


class PerVariableNetwork(UpdateNetwork):
    """One update network per latent variable: a composite whose :meth:`parts` are its members.

    Variable v's network sees the encoding of v's view of the step (its own gradient and λ block, the data, and
    for ``"hierarchical_errors"`` its bottom-up and top-down errors) and updates only v's block of λ. Its
    members are children named by variable, so ``state_dict`` keys read ``network.<variable>.<...>``.

    Args:
        networks: an :class:`UpdateNetwork` per latent variable, in the order of ``latent_dim``.

    Example:
        >>> gru = RecurrentNetwork(cell="gru", hidden_size=4)
        >>> net = PerVariableNetwork({"z1": HighwayMLP(hidden_size=8), "z2": gru})
        >>> {v: type(n).__name__ for v, n in net.parts().items()}, net.recurrent
        ({'z1': 'HighwayMLP', 'z2': 'RecurrentNetwork'}, True)
    """

    def __init__(self, networks: Mapping[str, UpdateNetwork]) -> None:
        super().__init__()
        if not networks:
            raise ValueError("PerVariableNetwork needs one network per latent variable, got none")
        for name, network in networks.items():
            if not isinstance(network, UpdateNetwork) or isinstance(network, PerVariableNetwork):
                raise TypeError(f"networks[{name!r}] must be an UpdateNetwork, got {type(network).__name__}")
            self.add_module(name, network)
        self.names = tuple(networks)
        self.recurrent = any(network.recurrent for network in networks.values())

    def parts(self) -> dict[str | None, UpdateNetwork]:
        return {name: cast(UpdateNetwork, self.get_submodule(name)) for name in self.names}

    @property
    def is_sized(self) -> bool:
        return all(network.is_sized for network in self.parts().values())

    def materialize(self, input_size: int) -> None:
        raise TypeError("size the members of a PerVariableNetwork one by one (each sees its own view)")

    def forward(self, features: Tensor, state: State = None, *, projected: Tensor | None = None
                ) -> tuple[Tensor, State]:
        raise TypeError("a PerVariableNetwork is not called on features: call each of its parts() on its own view")


class HighwayEncoder(nn.Module):
    """An inference network x → (μ, log σ²): a highway MLP (ELU, paper App. C) with two linear heads.

    The input layer is lazy, so the data's size is read on the first call; ``x`` of shape ``[B, *event]`` is
    flattened to ``[B, F]``.

    Args:
        latent_dim: the size of z (the total size for several latent variables).
        hidden_size: units per hidden layer.
        num_layers: hidden layers.

    Example:
        >>> import torch
        >>> loc, log_var = HighwayEncoder(3, hidden_size=8)(torch.zeros(5, 2, 4))
        >>> loc.shape, log_var.shape
        (torch.Size([5, 3]), torch.Size([5, 3]))
    """

    def __init__(self, latent_dim: int, *, hidden_size: int = 512, num_layers: int = 2) -> None:
        super().__init__()
        check_int("latent_dim", latent_dim, minimum=1)
        self.body = HighwayMLP(hidden_size=hidden_size, num_layers=num_layers)
        self.loc = nn.Linear(hidden_size, latent_dim)
        self.log_var = nn.Linear(hidden_size, latent_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        hidden, _ = self.body(x.flatten(1))
        return self.loc(hidden), self.log_var(hidden)


def make_network(network: str | UpdateNetwork, *, hidden_size: int, num_layers: int) -> UpdateNetwork:
    """An :class:`UpdateNetwork` from ``"highway"``, ``"lstm"``, ``"gru"`` or an instance."""
    if isinstance(network, UpdateNetwork):
        return network
    if network == "highway":
        return HighwayMLP(hidden_size=hidden_size, num_layers=num_layers)
    if network in ("lstm", "gru"):
        return RecurrentNetwork(cell=network, hidden_size=hidden_size)
    raise ValueError(f"network must be 'highway', 'lstm', 'gru' or an UpdateNetwork, got {network!r}")
