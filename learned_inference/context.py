"""``StepContext``: everything a refinement step may look at, and the inputs encodings compute from it.

At step t the engine (:mod:`learned_inference.engine`) has evaluated the ELBO L_t and its gradient ∇_λ L_t at the
current λ_t with the noise ε_t; a method's step, and the encodings of a learned step, read them from one
``StepContext``. Inputs that cost a model evaluation (the observation errors, a hierarchy's precision-weighted
errors, :mod:`learned_inference.errors`) are computed on first use, once per step, without a graph, in the
data's own precision, and zero on the rows of unhealthy examples. :meth:`StepContext.restrict` gives the view of
one latent variable (for one update network per variable); views share those cached inputs.

Example:
    >>> import torch
    >>> from learned_inference.families import DiagonalGaussian
    >>> from learned_inference.adapters import DecoderModel
    >>> from learned_inference.latent_space import LatentSpace
    >>> from learned_inference.objectives import Objective
    >>> model = DecoderModel(torch.nn.Linear(3, 5), likelihood="bernoulli", latent_dim=3)
    >>> objective = Objective(model, DiagonalGaussian(), LatentSpace(3))
    >>> params = DiagonalGaussian().initial_params(2, 3, dtype=torch.float32, device=None)
    >>> x, noise = torch.ones(2, 5), torch.zeros(1, 2, 3)
    >>> elbo, grads = objective.elbo_and_grad(params, x, noise)
    >>> context = StepContext(x=x, params=params, grads=grads, elbo=elbo, healthy=torch.ones(2, dtype=torch.bool),
    ...                       t=0, noise=noise, objective=objective)
    >>> [e.shape for e in context.observation_errors]
    [torch.Size([2, 5]), torch.Size([2, 3])]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import reduce
from typing import Any

import torch
from torch import Tensor

from learned_inference.block_family import BlockFamily
from learned_inference.errors import observation_errors, precision_weighted_errors
from learned_inference.families import Family, Params
from learned_inference.hierarchical import HierarchicalModel
from learned_inference.objectives import Objective, prior_moments

__all__ = ["RunConstants", "StepContext", "full_precision"]


def full_precision(x: Tensor) -> Any:
    """Disables autocast, so the λ-gradient and the encodings are computed in x's own precision."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def _mask_rows(healthy: Tensor, value: Tensor) -> Tensor:
    """``value`` with the rows of unhealthy examples set to zero."""
    return torch.where(healthy.view(-1, *[1] * (value.dim() - 1)), value, 0.0)


class RunConstants:
    """What the steps of one refinement run compute once and share: values that depend on the data, not on λ.

    The learned step's update network, for example, reads the data at every step through the same weights: its
    share P = W_x x + b of the input layer is computed at the first step and reused (:meth:`get`). At test time and
    with backpropagation through the steps the shared value is used as it is. In feed-forward training the engine
    takes a vector-Jacobian product into the update network at every step (λ detached between steps, memory flat
    in T); there (``capture``) the steps see P through a gate that, during those products, stops the gradient at P
    and adds it up instead; the engine back-propagates the sum through P's graph once, at the end of the run:

        Σ_t (∂ℓ_t/∂P) (∂P/∂φ) = (Σ_t ∂ℓ_t/∂P) (∂P/∂φ),

    the same gradient for one product with the data instead of one per step. Outside those products (a loss the
    caller builds on the returned λ_T) the gate passes gradients through.

    Args:
        capture: gate shared values that have a graph (see above).
    """

    def __init__(self, *, capture: bool = False) -> None:
        self.capture = capture
        self.capturing = False
        self.capture_scale = 1.0
        self._values: dict[str, Tensor] = {}
        #: the gated values (with their graphs) and the gradient captured for each so far (None: none yet)
        self.gated: list[Tensor] = []
        self.captured: list[Tensor | None] = []

    def get(self, key: str, compute: Callable[[], Tensor]) -> Tensor:
        """The value stored under ``key``, computed by ``compute()`` on the first call of the run."""
        if key not in self._values:
            value = compute()
            if self.capture and value.requires_grad:
                self.gated.append(value)
                self.captured.append(None)
                value = _Gate.apply(value, self, len(self.gated) - 1)
            self._values[key] = value
        return self._values[key]

    @contextmanager
    def capturing_gradients(self, scale: float = 1.0) -> Iterator[None]:
        """Within: gradients that reach a gated value are added to ``captured``, times ``scale``, and go no further."""
        self.capturing, self.capture_scale = True, scale
        try:
            yield
        finally:
            self.capturing, self.capture_scale = False, 1.0


class _Gate(torch.autograd.Function):
    """Identity; its backward captures the gradient (:meth:`RunConstants.capturing_gradients`) or passes it on."""

    @staticmethod
    def forward(ctx: Any, value: Tensor, constants: RunConstants, index: int) -> Tensor:
        ctx.constants, ctx.index = constants, index
        return value.view_as(value)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None]:
        constants: RunConstants = ctx.constants
        if not constants.capturing:
            return grad, None, None
        grad = grad * constants.capture_scale if constants.capture_scale != 1.0 else grad
        total = constants.captured[ctx.index]
        constants.captured[ctx.index] = grad if total is None else total + grad
        return None, None, None


@dataclass(frozen=True)
class StepContext:
    """The state of refinement at step t, as a step and the encodings see it.

    Attributes:
        x: the data ``[B, *event]``.
        params: λ_t, a dict of ``[B, D]`` tensors (restricted to ``variable`` in a per-variable view).
        grads: ∇_λ L_t keyed like ``params``, zero on the rows of unhealthy examples.
        elbo: L_t ``[B]``.
        healthy: ``[B]``, whether example b's ELBO and gradient are finite at this step.
        t: the step index (0 at the initial estimate).
        noise: the reparameterization noise ε_t ``[S, B, D]`` the ELBO was estimated with.
        objective: the model, family and latent layout.
        variable: the latent variable this view is restricted to, or None for all of λ.
        constants: what the steps of this run compute once and share (:class:`RunConstants`).
    """

    x: Tensor
    params: Params
    grads: Params
    elbo: Tensor
    healthy: Tensor
    t: int
    noise: Tensor
    objective: Objective
    variable: str | None = None
    constants: RunConstants = field(default_factory=RunConstants, repr=False, compare=False)
    _full: StepContext | None = field(default=None, repr=False, compare=False)
    _cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def grad_norm(self) -> Tensor:
        """Per-example norm ‖∇_λ L_t‖ over all of ``grads``, ``[B]`` (differentiable when ``grads`` are)."""
        return torch.sqrt(reduce(torch.add, [g.square().sum(-1) for g in self.grads.values()]))

    def restrict(self, variable: str) -> StepContext:
        """The view of one latent variable: ``params`` and ``grads`` restricted to its block of λ."""
        params, grads = self._variable_block(self.params, variable), self._variable_block(self.grads, variable)
        return replace(self, params=params, grads=grads, variable=variable, _full=self._root(), _cache={})

    @property
    def natural_grads(self) -> Params:
        """F⁻¹ ∇_λ L_t, the gradient preconditioned by the family's inverse Fisher information
        (:meth:`~learned_inference.families.Family.natural_gradient`), restricted to ``variable`` in a view."""
        root = self._root()
        if "natural" not in root._cache:
            root._cache["natural"] = root.objective.family.natural_gradient(root.params, root.grads)
        natural: Params = root._cache["natural"]
        if self.variable is None:
            return natural
        return self._variable_block(natural, self.variable)

    @property
    def family(self) -> Family:
        """The posterior family of this view (one variable's family in a per-variable view)."""
        family = self.objective.family
        if self.variable is None:
            return family
        if not isinstance(family, BlockFamily):
            raise TypeError(f"a per-variable view needs a family per latent variable (a BlockFamily), got {family!r}")
        return family.families[self.variable]

    def _variable_block(self, params: Params, variable: str) -> Params:
        """``params`` restricted to ``variable``'s columns: as its family lays them out in a
        :class:`~learned_inference.block_family.BlockFamily` (D_v·r for a rank-r factor), else D_v per parameter."""
        family, space = self.objective.family, self.objective.space
        if isinstance(family, BlockFamily):
            return family.blocks(params)[variable]
        return {n: space.block(p, variable) for n, p in params.items()}

    def _root(self) -> StepContext:
        return self if self._full is None else self._full

    def _samples(self) -> Tensor:
        """z_s = sample(λ_t, ε_t) at the detached λ, ``[S, B, D]``."""
        root = self._root()
        params = {n: p.detach() for n, p in root.params.items()}
        return root.objective.family.sample(params, root.noise)

    @property
    def observation_errors(self) -> tuple[Tensor, Tensor]:
        """(ε_x, ε_z) averaged over the samples (:func:`~learned_inference.errors.observation_errors`); ε_z is
        restricted to ``variable`` in a per-variable view."""
        root = self._root()
        if "observation" not in root._cache:
            objective = root.objective
            prior = prior_moments(objective.model, objective.space)
            if prior is None:
                raise ValueError("the observation errors need model.prior() returning a diagonal Gaussian")
            with torch.no_grad(), full_precision(root.x):
                z = self._samples()
                errors = observation_errors(objective.model, root.x, z, objective.space.split(z), prior[0])
            root._cache["observation"] = tuple(_mask_rows(root.healthy, e) for e in errors)
        error_x, error_z = root._cache["observation"]
        if self.variable is not None:
            error_z = self.objective.space.block(error_z, self.variable)
        return error_x, error_z

    @property
    def level_errors(self) -> dict[str, Tensor]:
        """The precision-weighted error of every level, bottom-up (``{"x": …, "z1": …, …}``, see
        :func:`~learned_inference.errors.precision_weighted_errors`); the same in every per-variable view."""
        root = self._root()
        if "levels" not in root._cache:
            objective = root.objective
            with torch.no_grad(), full_precision(root.x):
                z = objective.space.split(self._samples())
                model = objective.model
                if not isinstance(z, dict) or not isinstance(model, HierarchicalModel):
                    raise ValueError("the hierarchical errors need a model with conditionals(z) and latent_dim as a "
                                     "dict of sizes, listed bottom-up (see learned_inference.hierarchical)")
                errors = precision_weighted_errors(model, root.x, z)
            root._cache["levels"] = {k: _mask_rows(root.healthy, e) for k, e in errors.items()}
        levels: dict[str, Tensor] = root._cache["levels"]
        return levels

