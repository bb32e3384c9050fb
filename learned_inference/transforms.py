"""Gradient transforms for hand-written E-steps: pure ``(init, update)`` pairs, composed as in optax.

An E-step ascends each example's ELBO: at step t it turns the ascent direction g_t = ∇_λ L_t (per example, a dict
like λ) and its state into an update Δ_t, and λ_{t+1} = λ_t + Δ_t (:func:`apply_updates`). A
:class:`GradientTransform` is that map as two pure functions, ``init(λ_0) -> state`` and
``update(g, state, λ) -> (Δ, state)``, written with out-of-place tensor operations, so a run can be
differentiated through (semi-amortized training). :func:`chain` composes transforms left to right:

    chain(clip_by_example_norm(5), trace(0.5), scale(0.1))      # SemiAmortized's step
    chain(scale_by_adam(0.9, 0.999, 1e-8), scale(0.05))          # adam(0.05), torch.optim.Adam's rule

Every transform acts on each example's rows alone (the norm of :func:`clip_by_example_norm` is per example), so
no example's update depends on another's.

Example:
    >>> import torch
    >>> step = sgd(0.5, momentum=0.9)
    >>> params, grads = {"loc": torch.zeros(1, 2)}, {"loc": torch.ones(1, 2)}
    >>> state = step.init(params)
    >>> for _ in range(2):
    ...     updates, state = step.update(grads, state, params)
    ...     params = apply_updates(params, updates)
    >>> params["loc"]                                  # 0.5 · 1, then 0.5 · (0.9 · 1 + 1)
    tensor([[1.4500, 1.4500]])
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import reduce
from typing import Any

import torch
from torch import Tensor

from learned_inference.families import Params

__all__ = [
    "GradientTransform",
    "adam",
    "apply_updates",
    "chain",
    "clip_by_example_norm",
    "rmsprop",
    "scale",
    "scale_by_adam",
    "scale_by_rms",
    "sgd",
    "torch_optimizer",
    "trace",
]


@dataclass(frozen=True)
class GradientTransform:
    """A pure gradient transform.

    Attributes:
        init: λ_0 → the initial state.
        update: (g, state, λ) → (Δ, new state); g and Δ are dicts like λ.
    """

    init: Callable[[Params], Any]
    update: Callable[[Params, Any, Params], tuple[Params, Any]]


def apply_updates(params: Params, updates: Params) -> Params:
    """λ + Δ."""
    return {name: params[name] + updates[name] for name in params}


def chain(*transforms: GradientTransform) -> GradientTransform:
    """The transforms applied in order, each to the previous one's output (the states kept as a tuple)."""

    def init(params: Params) -> tuple[Any, ...]:
        return tuple(t.init(params) for t in transforms)

    def update(grads: Params, state: tuple[Any, ...], params: Params) -> tuple[Params, tuple[Any, ...]]:
        states = []
        for transform, inner in zip(transforms, state, strict=True):
            grads, inner = transform.update(grads, inner, params)
            states.append(inner)
        return grads, tuple(states)

    return GradientTransform(init, update)


def _stateless(fn: Callable[[Params], Params]) -> GradientTransform:
    return GradientTransform(lambda params: None, lambda grads, state, params: (fn(grads), state))


def scale(factor: float) -> GradientTransform:
    """Δ = factor · g (a step size)."""
    return _stateless(lambda grads: {name: factor * g for name, g in grads.items()})


def clip_by_example_norm(max_norm: float) -> GradientTransform:
    """Scales each example's g (all of λ's parts together) to norm at most ``max_norm``:
    g_b ← g_b · min(1, max_norm / (‖g_b‖ + 1e-6)), ``torch.nn.utils.clip_grad_norm_``'s rule per example."""
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm!r}")

    def clip(grads: Params) -> Params:
        norm = torch.sqrt(reduce(torch.add, [g.square().sum(-1) for g in grads.values()]))
        factor = (max_norm / (norm + 1e-6)).clamp(max=1.0).unsqueeze(-1)
        return {name: g * factor for name, g in grads.items()}

    return _stateless(clip)


def trace(momentum: float) -> GradientTransform:
    """Momentum: v_t = μ v_{t−1} + g_t (v_1 = g_1), Δ = v_t (``torch.optim.SGD``'s buffer, dampening 0)."""
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")

    def update(grads: Params, velocity: Params | None, params: Params) -> tuple[Params, Params]:
        velocity = dict(grads) if velocity is None else {n: momentum * velocity[n] + g for n, g in grads.items()}
        return velocity, velocity

    return GradientTransform(lambda params: None, update)


def scale_by_adam(beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8) -> GradientTransform:
    """Adam's direction, ``torch.optim.Adam``'s arithmetic: m_t = lerp(m_{t−1}, g_t, 1 − β₁),
    v_t = β₂ v_{t−1} + (1 − β₂) g_t², Δ = m_t / (1 − β₁ᵗ) / (√v_t / √(1 − β₂ᵗ) + ε)."""

    def init(params: Params) -> tuple[int, Params, Params]:
        zeros = {name: torch.zeros_like(p) for name, p in params.items()}
        return 0, zeros, dict(zeros)

    def update(grads: Params, state: tuple[int, Params, Params], params: Params) -> tuple[Params, Any]:
        step, first, second = state
        step += 1
        first = {n: torch.lerp(first[n], g, 1 - beta1) for n, g in grads.items()}
        second = {n: second[n] * beta2 + (1 - beta2) * g * g for n, g in grads.items()}
        correction1, correction2 = 1 - beta1**step, (1 - beta2**step) ** 0.5
        updates = {n: first[n] / (second[n].sqrt() / correction2 + eps) / correction1 for n in grads}
        return updates, (step, first, second)

    return GradientTransform(init, update)


def scale_by_rms(alpha: float = 0.99, eps: float = 1e-8) -> GradientTransform:
    """RMSProp's direction, ``torch.optim.RMSprop``'s arithmetic: s_t = α s_{t−1} + (1 − α) g_t²,
    Δ = g_t / (√s_t + ε)."""

    def init(params: Params) -> Params:
        return {name: torch.zeros_like(p) for name, p in params.items()}

    def update(grads: Params, square: Params, params: Params) -> tuple[Params, Params]:
        square = {n: square[n] * alpha + (1 - alpha) * g * g for n, g in grads.items()}
        return {n: g / (square[n].sqrt() + eps) for n, g in grads.items()}, square

    return GradientTransform(init, update)


def sgd(lr: float, *, momentum: float = 0.0) -> GradientTransform:
    """Gradient ascent with step ``lr`` (and momentum)."""
    return chain(trace(momentum), scale(lr)) if momentum else scale(lr)


def adam(lr: float, *, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> GradientTransform:
    """Adam ascent with step ``lr``."""
    return chain(scale_by_adam(*betas, eps), scale(lr))


def rmsprop(lr: float, *, alpha: float = 0.99, eps: float = 1e-8) -> GradientTransform:
    """RMSProp ascent with step ``lr``."""
    return chain(scale_by_rms(alpha, eps), scale(lr))


def torch_optimizer(optimizer: Callable[..., torch.optim.Optimizer], *, lr: float,
                    options: dict[str, Any]) -> GradientTransform:
    """Any element-wise ``torch.optim`` optimizer as a transform (its state is the optimizer, so this one is not
    pure): it minimises −L on leaves that hold λ, and Δ is the change it makes."""

    def init(params: Params) -> tuple[dict[str, Tensor], torch.optim.Optimizer]:
        leaves = {name: value.detach().clone() for name, value in params.items()}
        return leaves, optimizer(list(leaves.values()), lr=lr, **options)

    def update(grads: Params, state: Any, params: Params) -> tuple[Params, Any]:
        leaves, inner = state
        with torch.no_grad():
            for name, leaf in leaves.items():
                leaf.copy_(params[name])  # λ_t as the engine kept it (constrained; unhealthy rows unchanged)
                leaf.grad = -grads[name].detach()
        inner.step()
        return {name: leaf.clone() - params[name] for name, leaf in leaves.items()}, state

    return GradientTransform(init, update)
