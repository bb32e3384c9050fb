"""The learned update networks: they map encoded features ``[B, F]`` to a hidden representation ``[B, H]``.

* :class:`HighwayMLP` (default): feed-forward, ELU, highway connections between hidden layers (paper App. B.3,
  C). It carries no state, so training can detach between steps and keep memory flat in the number of steps.
* :class:`RecurrentNetwork`: an LSTM or GRU cell whose state carries non-local (momentum-like) information;
  trained by backpropagation through the steps.

The first layer is lazy (``nn.LazyLinear``): its input size is fixed on the first call, when the data's size is
known, as Pyro's autoguides set up their parameters on first use. Optimizers may be built before that call.

Example:
    >>> import torch
    >>> net = HighwayMLP(hidden_size=8, num_layers=2)
    >>> hidden, state = net(torch.randn(5, 3))
    >>> hidden.shape, state is None
    (torch.Size([5, 8]), True)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["HighwayLayer", "HighwayMLP", "RecurrentNetwork", "UpdateNetwork", "make_network"]

State = tuple[Tensor, ...] | None


class UpdateNetwork(nn.Module):
    """Base class: ``forward(features, state) -> (hidden, state)``; ``recurrent`` says whether state is used."""

    recurrent: bool = False
    hidden_size: int

    def forward(self, features: Tensor, state: State = None) -> tuple[Tensor, State]:
        raise NotImplementedError


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
    """

    def __init__(self, *, hidden_size: int = 512, num_layers: int = 2) -> None:
        super().__init__()
        if hidden_size <= 0 or num_layers < 1:
            raise ValueError(f"need hidden_size > 0 and num_layers >= 1, got {hidden_size!r}, {num_layers!r}")
        self.hidden_size = hidden_size
        self.input = nn.LazyLinear(hidden_size)
        self.layers = nn.Sequential(*(HighwayLayer(hidden_size) for _ in range(num_layers - 1)))

    def forward(self, features: Tensor, state: State = None) -> tuple[Tensor, State]:
        return self.layers(nn.functional.elu(self.input(features))), None


class RecurrentNetwork(UpdateNetwork):
    """Recurrent update network: a lazy ELU input layer, then an LSTM or GRU cell.

    Args:
        cell: ``"lstm"`` or ``"gru"``.
        hidden_size: units of the input layer and of the cell.
    """

    recurrent = True

    def __init__(self, *, cell: str = "lstm", hidden_size: int = 512) -> None:
        super().__init__()
        cells = {"lstm": nn.LSTMCell, "gru": nn.GRUCell}
        if cell not in cells:
            raise ValueError(f"cell must be one of {sorted(cells)}, got {cell!r}")
        if hidden_size <= 0:
            raise ValueError(f"hidden_size must be > 0, got {hidden_size!r}")
        self.hidden_size = hidden_size
        self.input = nn.LazyLinear(hidden_size)
        self.cell = cells[cell](hidden_size, hidden_size)

    def forward(self, features: Tensor, state: State = None) -> tuple[Tensor, State]:
        inputs = nn.functional.elu(self.input(features))
        if isinstance(self.cell, nn.LSTMCell):
            h, c = self.cell(inputs, state)
            return h, (h, c)
        h = self.cell(inputs, None if state is None else state[0])
        return h, (h,)


def make_network(network: str | UpdateNetwork, *, hidden_size: int, num_layers: int) -> UpdateNetwork:
    """An :class:`UpdateNetwork` from ``"highway"``, ``"lstm"``, ``"gru"`` or an instance."""
    if isinstance(network, UpdateNetwork):
        return network
    if network == "highway":
        return HighwayMLP(hidden_size=hidden_size, num_layers=num_layers)
    if network in ("lstm", "gru"):
        return RecurrentNetwork(cell=network, hidden_size=hidden_size)
    raise ValueError(f"network must be 'highway', 'lstm', 'gru' or an UpdateNetwork, got {network!r}")
