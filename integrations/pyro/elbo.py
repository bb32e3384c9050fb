"""ELBOs that train the update network of :class:`AutoIterativeNormal` on every refinement step.

With a plain ``Trace_ELBO`` the update network learns only from the ELBO at the final posterior λ_T, the one the
guide samples from. The paper trains it on every step (App. B.3): its loss is Σ_t −L_t. The guide computes, as it
refines, the exact λ-gradients ∇_λ L_t of the per-datapoint ELBOs, so the gradient of −Σ_{t=1}^{T−1} L_t with
respect to the network's parameters φ is that of the surrogate

    R = −s · Σ_{t=1}^{T−1} Σ_i ⟨stop_grad(∇_λ L_t(λ_{t,i})), λ_{t,i}(φ)⟩,

with s the subsampling factor of the amortized plate (the scale Pyro gives the per-datapoint terms). The guide
reports R through a Pyro effect (:func:`record_refinement_loss`); the ELBOs below collect it while tracing the
guide and add R − stop_grad(R) to the surrogate loss. Its value is zero: the reported loss stays the ELBO, and
only the network's gradient changes (the step-T term comes, as with any ELBO, through λ_T). Other Pyro ELBOs
ignore the effect.

Usage::

    guide = AutoIterativeNormal(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), IterativeTrace_ELBO())

Example:
    >>> import torch, pyro, pyro.distributions as dist
    >>> from pyro.infer import SVI
    >>> from learned_inference.integrations.pyro import AutoIterativeNormal
    >>> def model(x):
    ...     with pyro.plate("data", len(x)):
    ...         z = pyro.sample("z", dist.Normal(0.0, 1.0))
    ...         pyro.sample("x", dist.Normal(z, 0.5), obs=x)
    >>> pyro.clear_param_store()
    >>> guide = AutoIterativeNormal(model, num_steps=3, hidden_size=16)
    >>> svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), IterativeTrace_ELBO())
    >>> bool(torch.isfinite(torch.tensor(svi.step(torch.randn(8)))))
    True
"""

from __future__ import annotations

from typing import Any, cast

import torch
from pyro.infer import Trace_ELBO, TraceEnum_ELBO, TraceMeanField_ELBO
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import Message, effectful
from pyro.poutine.trace_struct import Trace
from torch import Tensor

from learned_inference.engine import gradient_only

__all__ = [
    "REFINEMENT_LOSS",
    "IterativeTraceEnum_ELBO",
    "IterativeTraceMeanField_ELBO",
    "IterativeTrace_ELBO",
    "RefinementLossMixin",
    "record_refinement_loss",
]

#: the effect type (and the guide-trace node name) that carries the refinement surrogate R
REFINEMENT_LOSS = "refinement_loss"


@effectful(type=REFINEMENT_LOSS)
def _refinement_loss(loss: Tensor) -> None:
    return None


def record_refinement_loss(loss: Tensor, *, name: str) -> None:
    """Reports a guide's refinement surrogate R to an enclosing :class:`RefinementLossMixin` ELBO (else a no-op).

    Args:
        loss: the scalar surrogate R (only its gradient matters).
        name: a name for the message (the reporting guide's).
    """
    _refinement_loss(loss, name=name)


class _Collector(Messenger):
    """Collects the refinement surrogates reported while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.losses: list[Tensor] = []

    def _pyro_refinement_loss(self, msg: Message) -> None:
        self.losses.append(msg["args"][0])


class RefinementLossMixin:
    """Adds R − stop_grad(R) (see the module docstring) to the surrogate loss of a ``Trace_ELBO``-like ELBO."""

    def _get_trace(self, model: Any, guide: Any, args: tuple, kwargs: dict) -> tuple[Trace, Trace]:
        with _Collector() as collector:
            # a mixin: super() is the Pyro ELBO it is mixed into, unknown to the type checker
            model_trace, guide_trace = cast(Any, super())._get_trace(model, guide, args, kwargs)
        if collector.losses:
            guide_trace.add_node(REFINEMENT_LOSS, name=REFINEMENT_LOSS, type=REFINEMENT_LOSS,
                                 value=torch.stack(collector.losses).sum())
        return model_trace, guide_trace

    def _differentiable_loss_particle(self, model_trace: Trace, guide_trace: Trace) -> tuple[Any, Any]:
        # a mixin, as above
        loss, surrogate = cast(Any, super())._differentiable_loss_particle(model_trace, guide_trace)
        if REFINEMENT_LOSS in guide_trace.nodes:
            extra = guide_trace.nodes[REFINEMENT_LOSS]["value"]
            assert extra is not None  # a tensor: _get_trace adds the node with value R
            surrogate = surrogate + gradient_only(extra)
        return loss, surrogate


class IterativeTrace_ELBO(RefinementLossMixin, Trace_ELBO):  # noqa: N801 (Pyro's naming)
    """``Trace_ELBO`` that also trains :class:`AutoIterativeNormal`'s update network on steps 1..T−1.

    Takes the same arguments as :class:`pyro.infer.Trace_ELBO` (``num_particles``, ``vectorize_particles``, ...).
    """


class IterativeTraceMeanField_ELBO(RefinementLossMixin, TraceMeanField_ELBO):  # noqa: N801 (Pyro's naming)
    """``TraceMeanField_ELBO`` that also trains :class:`AutoIterativeNormal`'s update network on steps 1..T−1."""


class IterativeTraceEnum_ELBO(RefinementLossMixin, TraceEnum_ELBO):  # noqa: N801 (Pyro's naming)
    """``TraceEnum_ELBO`` (the model's enumerated sites summed out) that also trains :class:`AutoIterativeNormal`'s
    update network on steps 1..T−1: the surrogates R the guide reports, one per particle, are averaged and added as
    R − stop_grad(R) to the differentiable loss (``TraceEnum_ELBO`` has no per-particle surrogate to add them to).

    Takes the same arguments as :class:`pyro.infer.TraceEnum_ELBO` (``max_plate_nesting``, ``num_particles``, ...).
    """

    #: the surrogates R reported during a differentiable_loss call (None outside one: loss() ignores them)
    _refinement_terms: list[Tensor] | None = None

    def _get_trace(self, model: Any, guide: Any, args: tuple, kwargs: dict) -> tuple[Trace, Trace]:
        model_trace, guide_trace = super()._get_trace(model, guide, args, kwargs)
        if self._refinement_terms is not None and REFINEMENT_LOSS in guide_trace.nodes:
            self._refinement_terms.append(cast(Tensor, guide_trace.nodes[REFINEMENT_LOSS]["value"]))
        return model_trace, guide_trace

    def differentiable_loss(self, model: Any, guide: Any, *args: Any, **kwargs: Any) -> Tensor:
        """The ELBO's differentiable loss, with the refinement surrogates' gradients attached (value unchanged)."""
        terms: list[Tensor] = []
        self._refinement_terms = terms
        try:
            loss = super().differentiable_loss(model, guide, *args, **kwargs)
        finally:
            self._refinement_terms = None
        if terms:
            loss = loss + gradient_only(torch.stack(terms).sum() / self.num_particles)
        return cast(Tensor, loss)

    def loss_and_grads(self, model: Any, guide: Any, *args: Any, **kwargs: Any) -> float:
        """As ``TraceEnum_ELBO.loss_and_grads``: the loss's value, after its backward."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        return loss.item()
