"""How λ changes: the update rules (pure functions) and the small output heads that feed them.

Gated ("highway") update, paper App. B.2, eq. 62, with a separate sigmoid gate for every component of every
parameter (so μ and log σ² are gated independently):

    λ_{t+1} = g_t ⊙ λ_t + (1 − g_t) ⊙ f_t,     g_t = sigmoid(W_g h_t + b_g),  f_t = W_f h_t + b_f.

Residual update (Andrychowicz et al. 2016): λ_{t+1} = λ_t + f_t.

Natural-gradient update: a learned, per-component step size on the gradient preconditioned by the inverse Fisher
information of q_λ (a learned preconditioner whose step vanishes with the gradient), with learned momentum:

    v_{t+1} = c_t · (β_t ⊙ v_t + η_t ⊙ F(λ_t)⁻¹ ∇_λ L_t),   λ_{t+1} = λ_t + v_{t+1},
    η_t = η_max · sigmoid(W_η h_t + b_η),   β_t = sigmoid(W_β h_t + b_β)   (v_0 = 0; β = 0 without momentum),

with an optional trust region on every example's step, c_t = min(1, √(2·KL_max) / ‖v‖_F) (‖·‖_F the Fisher norm:
½‖v‖_F² is KL(q_{λ_t} ‖ q_{λ_{t+1}}) to second order), so a step is never longer than KL_max nats, however steep
the ELBO (far from the posterior, e.g. from the prior).

Staged update (the library's default, ``"gated_then_natural_gradient"``): the gated update for the first step of
a run, the natural-gradient update (momentum, trust region of 20 nats) for every later one (:class:`StagedUpdate`).

Updates may carry state from step to step (the momentum v): ``forward(hidden, context, state) -> (λ, state)``.

Example:
    >>> import torch
    >>> lam, target = torch.randn(2, 3), torch.randn(2, 3)
    >>> torch.equal(gated_update(lam, target, torch.ones(2, 3)), lam)
    True
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from learned_inference.context import StepContext
from learned_inference.families import Params

__all__ = [
    "GatedUpdate",
    "NaturalGradientUpdate",
    "PerVariableUpdate",
    "ResidualUpdate",
    "StagedUpdate",
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
    """Base class: maps the network's hidden state ``[B, H]`` and the step (λ_t, ∇_λ L_t, … in a
    :class:`~learned_inference.context.StepContext`) to the next λ.

    Attributes:
        hidden_size: H, the size of the update network's output it reads.
        dim: D, the latent size of the λ it updates.
    """

    hidden_size: int
    dim: int

    def forward(self, hidden: Tensor, context: StepContext, state: Any = None) -> tuple[Params, Any]:
        """The next λ and the state to carry to the next step (None at the first step)."""
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
        return {name: cast(Update, self.get_submodule(name)) for name in self.names}


#: λ's parameter names, or their widths by name where they differ from the latent size (``Family.param_sizes``)
ParamNames = Sequence[str] | Mapping[str, int]


def _heads(names: ParamNames, hidden_size: int, dim: int, *, init_scale: float | None = None,
           init_bias: float = 0.0) -> nn.ModuleDict:
    """One linear head per parameter of λ (``dim`` wide, or as wide as ``names`` maps it); with ``init_scale``,
    weights N(0, init_scale²) and biases ``init_bias``."""
    heads = {name: nn.Linear(hidden_size, names[name] if isinstance(names, Mapping) else dim) for name in names}
    if init_scale is not None:
        for head in heads.values():
            nn.init.normal_(head.weight, std=init_scale)
            nn.init.constant_(head.bias, init_bias)
    return nn.ModuleDict(heads)


class GatedUpdate(Update):
    """Eq. 62 with one linear head for the target f and one for the gate g, per parameter of λ.

    Args:
        param_names: the names of λ's parameters (the family's ``param_names``), or a mapping from name to width
            for a family whose parameters are not all ``dim`` wide (its ``param_sizes(dim)``, e.g. a mixture's).
        hidden_size: the size H of the update network's output.
        dim: the latent size D.
    """

    def __init__(self, param_names: ParamNames, *, hidden_size: int, dim: int) -> None:
        super().__init__()
        self.hidden_size, self.dim = hidden_size, dim
        self.targets = _heads(param_names, hidden_size, dim)
        self.gates = _heads(param_names, hidden_size, dim)

    def forward(self, hidden: Tensor, context: StepContext, state: Any = None) -> tuple[Params, Any]:
        return {
            name: gated_update(value, self.targets[name](hidden), self.gates[name](hidden).sigmoid())
            for name, value in context.params.items()
        }, None


class ResidualUpdate(Update):
    """λ + f with one linear head per parameter of λ, initialised small so the first steps stay near λ.

    Args:
        param_names: the names of λ's parameters.
        hidden_size: the size H of the update network's output.
        dim: the latent size D.
        init_scale: the standard deviation of the heads' initial weights.
    """

    def __init__(self, param_names: ParamNames, *, hidden_size: int, dim: int, init_scale: float = 1e-3) -> None:
        super().__init__()
        self.hidden_size, self.dim = hidden_size, dim
        self.deltas = _heads(param_names, hidden_size, dim, init_scale=init_scale)

    def forward(self, hidden: Tensor, context: StepContext, state: Any = None) -> tuple[Params, Any]:
        return {name: residual_update(value, self.deltas[name](hidden)) for name, value in context.params.items()}, None


class NaturalGradientUpdate(Update):
    """λ + v with v ← β ⊙ v + η ⊙ F⁻¹∇_λ L: a learned step size η ∈ (0, η_max) and momentum β ∈ (0, 1) per
    component (see the module docstring).

    The step vanishes with the gradient (and the momentum decays), so a stationary point of the ELBO is a fixed
    point of the optimizer however many steps it runs; where q's precision matches the posterior's, η = 1 is
    Newton's step. The heads start near ``init_step`` and ``init_momentum`` for every input.

    Args:
        param_names: the names of λ's parameters.
        hidden_size: the size H of the update network's output.
        dim: the latent size D.
        max_step: η_max.
        init_step: the step size every component starts with, in (0, max_step).
        momentum: learn a momentum β (else β = 0: no state).
        init_momentum: the momentum every component starts with, in (0, 1).
        max_kl: the trust region KL_max in nats per step and example, or None for none.
    """

    def __init__(self, param_names: ParamNames, *, hidden_size: int, dim: int, max_step: float = 2.0,
                 init_step: float = 0.5, momentum: bool = False, init_momentum: float = 0.5,
                 max_kl: float | None = None) -> None:
        super().__init__()
        if not 0 < init_step < max_step:
            raise ValueError(f"need 0 < init_step < max_step, got init_step={init_step!r}, max_step={max_step!r}")
        if not 0 < init_momentum < 1:
            raise ValueError(f"need 0 < init_momentum < 1, got {init_momentum!r}")
        if max_kl is not None and not max_kl > 0:
            raise ValueError(f"max_kl must be > 0 nats (or None for no trust region), got {max_kl!r}")
        self.max_kl = None if max_kl is None else float(max_kl)
        self.hidden_size, self.dim, self.max_step = hidden_size, dim, float(max_step)
        self.steps = _heads(param_names, hidden_size, dim, init_scale=1e-3, init_bias=_logit(init_step / max_step))
        self.momenta = (_heads(param_names, hidden_size, dim, init_scale=1e-3, init_bias=_logit(init_momentum))
                        if momentum else None)

    def forward(self, hidden: Tensor, context: StepContext, state: Any = None) -> tuple[Params, Any]:
        natural = context.natural_grads
        velocity = {name: self.max_step * self.steps[name](hidden).sigmoid() * natural[name] for name in natural}
        if self.momenta is not None and state is not None:
            velocity = {name: self.momenta[name](hidden).sigmoid() * state[name] + v for name, v in velocity.items()}
        if self.max_kl is not None:
            # min(1, sqrt(2 KL_max / ‖v‖²_F)) as 1/sqrt(max(1, ‖v‖²_F / 2 KL_max)): no division by a tiny norm, whose
            # derivative would overflow (and meet the zero of the clamp as inf · 0 = NaN) for a step near zero
            squared = context.family.squared_fisher_norm(context.params, velocity)
            scale = torch.rsqrt((squared / (2 * self.max_kl)).clamp_min(1.0)).unsqueeze(-1)
            velocity = {name: scale * v for name, v in velocity.items()}
        params = {name: value + velocity[name] for name, value in context.params.items()}
        return params, velocity if self.momenta is not None else None


class StagedUpdate(Update):
    """Updates in stages: each stage's update runs for its number of steps, then hands over to the next stage,
    which starts with no state; the last stage runs for every later step:

        λ_{t+1} = u_k(h_t, λ_t)   for T_k ≤ t < T_{k+1},   T_0 = 0,   T_{k+1} = T_k + n_k.

    ``StagedUpdate(first=a, then=b)`` is the two-stage case [(a, 1), (b, every later step)]: the default pairing
    (``"gated_then_natural_gradient"``) lets the first step jump, as an amortized encoder does (the gated update of
    eq. 62 can land anywhere, however far λ_0 is), and makes every later step a natural-gradient step, which
    vanishes with the gradient, so running longer does not drift. ``stages=[(u_0, n_0), …, (u_K, None)]`` gives
    any sequence.

    Args:
        first: the update of the first step (with ``then``).
        then: the update of every later step; it must read the same hidden size and update the same λ.
        stages: instead of ``first``/``then``: ``(update, steps)`` pairs, the last one's steps None (for ever).

    Example:
        >>> from learned_inference.updates import GatedUpdate, NaturalGradientUpdate, ResidualUpdate
        >>> heads = [kind(("loc", "log_var"), hidden_size=4, dim=2)
        ...          for kind in (GatedUpdate, ResidualUpdate, NaturalGradientUpdate)]
        >>> staged = StagedUpdate(stages=[(heads[0], 1), (heads[1], 3), (heads[2], None)])
        >>> [staged.stage_at(t) for t in range(6)]
        [0, 1, 1, 1, 2, 2]
    """

    def __init__(self, *, first: Update | None = None, then: Update | None = None,
                 stages: Sequence[tuple[Update, int | None]] | None = None) -> None:
        super().__init__()
        if stages is None:
            if first is None or then is None:
                raise ValueError("StagedUpdate needs first= and then=, or stages=[(update, steps), ..., "
                                 "(update, None)]")
            named: list[tuple[str, Update, int | None]] = [("first", first, 1), ("then", then, None)]
        elif first is not None or then is not None:
            raise ValueError("give either first=/then= or stages=, not both")
        else:
            named = [(f"stage{k}", update, steps) for k, (update, steps) in enumerate(stages)]
        if not named or named[-1][2] is not None or any(
                isinstance(steps, bool) or not isinstance(steps, int) or steps < 1 for _, _, steps in named[:-1]):
            raise ValueError("stages must be (update, steps) pairs with steps an int >= 1, the last one's steps None "
                             "(it runs for every later step)")
        lead = named[0][1]
        for _, update, _ in named[1:]:
            if (update.hidden_size, update.dim) != (lead.hidden_size, lead.dim):
                raise ValueError(f"every stage must read the same hidden size and update the same latent size, got "
                                 f"(hidden_size, dim) = {(lead.hidden_size, lead.dim)} and "
                                 f"{(update.hidden_size, update.dim)}")
        for name, update, _ in named:
            self.add_module(name, update)
        self._stages = [(name, steps) for name, _, steps in named]
        self.hidden_size, self.dim = lead.hidden_size, lead.dim

    def stage_at(self, t: int) -> int:
        """The stage that takes step t."""
        end = 0
        for k, (_, steps) in enumerate(self._stages):
            if steps is None:
                return k
            end += steps
            if t < end:
                return k
        return len(self._stages) - 1

    def forward(self, hidden: Tensor, context: StepContext, state: Any = None) -> tuple[Params, Any]:
        k = self.stage_at(context.t)
        update = cast(Update, self.get_submodule(self._stages[k][0]))
        if context.t == 0 or self.stage_at(context.t - 1) != k:
            state = None  # a stage starts with no state
        proposal, state = update(hidden, context, state)
        last_step_of_stage = self._stages[k][1] is not None and self.stage_at(context.t + 1) != k
        return proposal, None if last_step_of_stage else state


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


#: the trust region (nats per step) of the named natural-gradient updates
DEFAULT_MAX_KL = 20.0
UPDATE_NAMES = ("gated", "gated_then_natural_gradient", "natural_gradient", "residual")


def make_update(update: str, param_names: ParamNames, *, hidden_size: int, dim: int) -> Update:
    """An :class:`Update` module from its name: ``"gated"``, ``"residual"``, ``"natural_gradient"`` (with momentum
    and a trust region of :data:`DEFAULT_MAX_KL` nats), or ``"gated_then_natural_gradient"`` (a
    :class:`StagedUpdate` of the two)."""
    if update == "gated":
        return GatedUpdate(param_names, hidden_size=hidden_size, dim=dim)
    if update == "residual":
        return ResidualUpdate(param_names, hidden_size=hidden_size, dim=dim)
    if update == "natural_gradient":
        return NaturalGradientUpdate(param_names, hidden_size=hidden_size, dim=dim, momentum=True,
                                     max_kl=DEFAULT_MAX_KL)
    if update == "gated_then_natural_gradient":
        return StagedUpdate(first=make_update("gated", param_names, hidden_size=hidden_size, dim=dim),
                            then=make_update("natural_gradient", param_names, hidden_size=hidden_size, dim=dim))
    raise ValueError(f"update must be one of {list(UPDATE_NAMES)}, got {update!r}")
