"""One learned refinement step: the encoding of the step's state, the update network, and its update heads.

    λ_{t+1} = heads(network(encoding(context_t); φ), context_t),

for every part of the network (one over all of λ, or one per latent variable), with the input layer's share that
stays the same over a run (the data's columns) computed once per run. Used by
:class:`~learned_inference.IterativeInferenceOptimizer` and the Pyro guides (the engine runs it:
:func:`~learned_inference.engine.refine`).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
from torch import Tensor, nn

from learned_inference.context import StepContext, full_precision
from learned_inference.encodings import Concat, Encoding, FeatureShapes
from learned_inference.families import Params
from learned_inference.networks import UpdateNetwork
from learned_inference.updates import Update

__all__ = ["learned_step"]


def learned_step(
    encoding: Encoding, network: UpdateNetwork, update: Update, context: StepContext, state: Any
) -> tuple[Params, Any]:
    """One learned step: encoding → network → update heads, for every part of the network.

    A plain network is one part over all of λ; a :class:`~learned_inference.networks.PerVariableNetwork` has one
    per latent variable, each reading that variable's view of the step and proposing its block of λ.

    Returns:
        The proposed λ_{t+1} (before the family's constraints) and, by part, the states of the network and the
        update to carry to the next step.
    """
    states: dict[str | None, Any] = {}
    blocks: dict[str | None, Params] = {}
    updates = update.parts()
    for variable, part in network.parts().items():
        view = context if variable is None else context.restrict(variable)
        network_state, update_state = (None, None) if state is None else state[variable]
        hidden, network_state = _run_network(encoding, part, view, network_state)
        blocks[variable], update_state = updates[variable](hidden, view, update_state)
        states[variable] = (network_state, update_state)
    if None in blocks:
        return blocks[None], states
    return {n: torch.cat([block[n] for block in blocks.values()], -1) for n in context.params}, states


def _run_network(encoding: Encoding, network: UpdateNetwork, view: StepContext, state: Any) -> tuple[Tensor, Any]:
    """The network on the view's encoding. With features that stay the same over the run (``step_constant``, the
    data), the input layer W f + b is split by W's column blocks into a constant share P = W_c f_c + b and the
    varying features' W_v f_v; P and W_v are taken from W once per run (``view.constants``): W f + b = W_v f_v + P.
    """
    pieces = encoding.encodings if isinstance(encoding, Concat) else (encoding,)
    if (torch.jit.is_tracing()  # a traced graph records every step as it is
            or type(network).forward is not UpdateNetwork.forward or not network.is_sized
            or not any(piece.step_constant for piece in pieces)):
        with full_precision(view.x):
            features = encoding(view)
        return network(features, state)
    space = view.objective.space
    size = space.total_dim if view.variable is None else space.sizes[view.variable]
    shapes = FeatureShapes.of(data=math.prod(view.x.shape[1:]), param_names=view.family.param_sizes(size), space=space,
                              variable=view.variable)
    widths = [piece.num_features(shapes) for piece in pieces]
    network.materialize(sum(widths))  # checks the input layer's width
    weight, bias = network.input.weight, network.input.bias
    columns = [(piece, start, start + width)
               for piece, start, width in zip(pieces, itertools.accumulate([0, *widths]), widths, strict=False)]

    def encoded(constant: bool) -> Tensor:
        with full_precision(view.x):
            # one piece may be in the data's dtype, another in λ's: each is cast to the weights' dtype
            return torch.cat([piece(view).to(weight.dtype) for piece, _, _ in columns
                              if piece.step_constant == constant], -1)

    def block(constant: bool) -> Tensor:
        return torch.cat([weight[:, a:b] for piece, a, b in columns if piece.step_constant == constant], -1)

    key = f"update_network:{view.variable}"
    projected = view.constants.get(f"{key}:constant_share",
                                   lambda: nn.functional.linear(encoded(True), block(True), bias))
    if all(piece.step_constant for piece in pieces):
        return network(projected.new_zeros(projected.shape[0], 0), state, projected=projected)
    varying = encoded(False)
    weight_varying = view.constants.get(f"{key}:varying_weight", lambda: block(False))
    return network(varying, state, projected=nn.functional.linear(varying, weight_varying) + projected)
