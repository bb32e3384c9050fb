"""The refinement engine: the one loop over inference steps that every method and integration runs on.

A method supplies an initial estimate λ_0 and a pure step (``step(context, state) -> (proposal, state)``, see
:class:`~learned_inference.context.StepContext`); :func:`refine` runs

    for t = 0, …, T:
        L_t, ∇_λ L_t  = the ELBO and its λ-gradient at λ_t with noise ε_t          (torch.func, full precision)
        healthy_t     = L_t and ∇_λ L_t finite, per example                         (the non-finite policy)
        t < T:  λ_{t+1} = constrain(step(context_t)) on healthy rows; unhealthy rows keep λ_t

records the trajectory (ELBO and gradient norm ``[T+1, B]``, health, optionally λ_t at every step), reports
unhealthy examples once (a ``RuntimeWarning`` or a ``FloatingPointError``), and builds the training loss in one
:class:`TrainingLoss`, whose docstring states the equation. :class:`Training` says how a method learns: the
weight of every step, whether a trainable λ_0 learns from L_0, and whether gradients flow through the steps. At
test time :class:`Stopping` adds per-example safeguards for every method: stop an example when its ELBO stops
improving, and return its best λ; and :class:`IterateAveraging` returns a running average of the iterates after a
given step, which removes the noise a constant-size stochastic step keeps around the optimum.

Example:
    >>> import torch
    >>> from learned_inference.families import DiagonalGaussian
    >>> from learned_inference.adapters import DecoderModel
    >>> from learned_inference.latent_space import LatentSpace
    >>> from learned_inference.objectives import Objective
    >>> model = DecoderModel(torch.nn.Linear(2, 6), likelihood="bernoulli", latent_dim=2)
    >>> objective = Objective(model, DiagonalGaussian(), LatentSpace(2))
    >>> def ascent(context, state):        # plain gradient ascent, lr 0.1
    ...     return {n: p + 0.1 * context.grads[n] for n, p in context.params.items()}, state
    >>> x = torch.bernoulli(torch.full((3, 6), 0.5))
    >>> start = objective.family.initial_params(3, 2, dtype=x.dtype, device=None)
    >>> run = refine(ascent, start, x, objective=objective, num_steps=4, noise=lambda t: torch.zeros(1, 3, 2))
    >>> run.elbo.shape, bool((run.elbo[-1] > run.elbo[0]).all())
    (torch.Size([5, 3]), True)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial, reduce
from typing import Any, Protocol, cast

import torch
from torch import Tensor, nn

from learned_inference.context import RunConstants, StepContext, full_precision
from learned_inference.families import Params, detach
from learned_inference.objectives import Objective, sample_noise

__all__ = [
    "ON_NONFINITE",
    "IterateAveraging",
    "Observer",
    "RecordIterates",
    "Step",
    "StepRecord",
    "Stopping",
    "Training",
    "TrainingLoss",
    "Trajectory",
    "final_step",
    "gradient_only",
    "mean_over_steps",
    "refine",
]

#: the accepted values of ``on_nonfinite``
ON_NONFINITE = ("warn", "raise")


class Step(Protocol):
    """A refinement step: the next λ (before the family's constraints) and the step's carried state."""

    def __call__(self, context: StepContext, state: Any) -> tuple[Params, Any]: ...


def mean_over_steps(num_steps: int, batch: int) -> list[float]:
    """w_t = 1/(B T) for t = 1..T (the paper's mean over steps of the batch-mean −L_t); w_0 = 1/B when T = 0."""
    if num_steps == 0:
        return [1.0 / batch]
    return [0.0] + [1.0 / (batch * num_steps)] * num_steps


def final_step(num_steps: int, batch: int) -> list[float]:
    """w_T = 1/B, every other w_t = 0: the batch-mean −L_T after the steps."""
    return [0.0] * num_steps + [1.0 / batch]


@dataclass(frozen=True)
class Training:
    """How a method learns from a refinement run (the terms of :class:`TrainingLoss`).

    Attributes:
        step_parameters: φ, the step's own trainable parameters (an update network; empty for hand-written steps).
        step_weights: ``(num_steps, batch) -> [w_0, …, w_T]``, the weight of Σ_b −L_t,b in the loss.
        encoder_weight: the weight of −L_0 for a trainable λ_0 (an encoder): 1, or 0 to train it only through the
            steps.
        backprop_through_steps: keep λ's graph across steps (recurrent networks, semi-amortized training) instead
            of detaching λ between steps (constant memory).
        second_order: the step sees ∇_λ L_t with its graph, so training differentiates through the gradient;
            needs ``backprop_through_steps``.
    """

    step_parameters: Sequence[nn.Parameter] = ()
    step_weights: Callable[[int, int], Sequence[float]] = mean_over_steps
    encoder_weight: float = 1.0
    backprop_through_steps: bool = False
    second_order: bool = False

    def __post_init__(self) -> None:
        if self.second_order and not self.backprop_through_steps:
            raise ValueError("second_order=True needs backprop_through_steps=True (gradients through the steps)")


def gradient_only(term: Tensor) -> Tensor:
    """``term − sg[term]``: a value of zero whose gradient is ``term``'s (how a loss carries extra gradients)."""
    return term - term.detach()


def _inner(cotangents: Params, params: Params) -> Tensor:
    """Σ_n ⟨cotangent_n, λ_n⟩ over λ's parameters (summed over the batch)."""
    return reduce(torch.add, [(g * params[n]).sum() for n, g in cotangents.items()])


class _GradientInjection(torch.autograd.Function):
    """A zero scalar whose backward hands precomputed gradients (scaled by the incoming one) to parameters."""

    @staticmethod
    def forward(ctx: Any, grads: Sequence[Tensor], *params: Tensor) -> Tensor:
        ctx.grads = grads
        return params[0].new_zeros(())

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        return (None, *(grad_output * g for g in ctx.grads))


def _inject(grads: Sequence[Tensor], parameters: Sequence[Tensor]) -> Tensor:
    """A zero scalar whose backward gives ``parameters`` the gradients ``grads`` (:class:`_GradientInjection`)."""
    apply = cast(Callable[..., Tensor], _GradientInjection.apply)  # autograd.Function.apply is untyped
    return apply(grads, *parameters)


class TrainingLoss:
    """The one training loss of a refinement run, built step by step.

    With weights w_t (:class:`Training`), healthy examples only, and sg[·] the stop-gradient, the value is
    ℒ = Σ_t w_t Σ_b −L_t,b and the gradients are::

        φ   (the step)      Σ_{t≥1} w_t Σ_b −∇_λ L_t,b · ∂λ_t,b/∂φ
        λ_0 (an encoder)    encoder_weight/B · −∇_λ L_0   (+ the terms above through the steps, when
                            backpropagating through them)
        θ   (the model)     ∇_θ of −1/B Σ_b L_T,b(sg[λ_T])

    Feed-forward steps (λ detached between steps) take the φ-term as a vector-Jacobian product at every step,
    against the −w_t ∇_λ L_t the next step needed anyway, and free that step's graph: training memory does not
    grow with T. What the steps share (:class:`~learned_inference.context.RunConstants`, e.g. the update network's
    projection of the data) stops those products; its gradients are summed over the steps and taken through its
    graph once. Backpropagation through the steps keeps Σ_t w_t ⟨−sg[∇_λ L_t], λ_t⟩ in the graph and takes one
    product at the end, into φ and λ_0 only (the model learns from L_T alone). Everything reaches the user through
    one ``loss.backward()``: the precomputed φ-gradients are injected by an autograd function of value zero.
    """

    def __init__(self, training: Training, *, batch: int, num_steps: int, initial: Params, start: Params,
                 constants: RunConstants | None = None) -> None:
        self.training, self.batch = training, batch
        self.constants = RunConstants() if constants is None else constants
        self.weights = list(training.step_weights(num_steps, batch))
        if len(self.weights) != num_steps + 1:
            raise ValueError(f"step_weights must give num_steps + 1 = {num_steps + 1} weights, got {len(self.weights)}")
        self.phi = [p for p in training.step_parameters if p.requires_grad]
        self.initial, self.start = initial, start
        self.phi_grads: list[Tensor] | None = None
        self.through_steps: Tensor | None = None
        self.graph_terms: list[Tensor] = []

    def observe(self, t: int, params: Params, grads: Params) -> None:
        """Takes step t's terms: λ_t (with its graph) and ∇_λ L_t (zero on unhealthy rows)."""
        grads = detach(grads)
        if t == 0:
            if self.training.encoder_weight and any(p.requires_grad for p in self.initial.values()):
                scale = self.training.encoder_weight / self.batch
                self.graph_terms.append(-scale * _inner(grads, self.initial))
            return
        weight = self.weights[t]
        if weight == 0 or not any(p.requires_grad for p in params.values()):
            return
        if self.training.backprop_through_steps:
            term = -weight * _inner(grads, params)
            self.through_steps = term if self.through_steps is None else self.through_steps + term
            return
        if not self.phi:
            return
        names = list(grads)
        # The shared values' graphs serve every step: kept (retain_graph) and taken once, in finish(). The product
        # is taken against the unweighted −∇_λ L_t (per example, of order one) and weighted afterwards, in the
        # parameters' precision: under float16 autocast, the small weight w_t = 1/(B T) would push the backward's
        # half-precision intermediates towards underflow (a loss scale the engine applies itself, exactly).
        with self.constants.capturing_gradients(scale=weight):
            step_grads = torch.autograd.grad([params[n] for n in names], self.phi,
                                             grad_outputs=[-grads[n] for n in names], allow_unused=True,
                                             retain_graph=bool(self.constants.gated))
        self._add_phi_grads(step_grads, scale=weight)

    def _add_phi_grads(self, grads: Sequence[Tensor | None], *, scale: float = 1.0) -> None:
        if self.phi_grads is None:
            self.phi_grads = [torch.zeros_like(p) for p in self.phi]
        for total, g in zip(self.phi_grads, grads, strict=True):
            if g is not None:  # None: a head this step did not use
                total.add_(g, alpha=scale)

    def observe_final(self, values: Tensor, healthy: Tensor, refit: Callable[[Tensor], Tensor]) -> None:
        """The model's term: −L_T over the healthy rows (``refit(rows)`` re-evaluates them alone)."""
        if not values.requires_grad or not bool(healthy.any()):
            return
        # A non-finite row would turn 0 · inf into NaN in the backward: re-evaluate the healthy rows alone.
        self.graph_terms.append(-(values if bool(healthy.all()) else refit(healthy)).mean())

    def finish(self, elbo: Tensor, healthy: Tensor) -> Tensor:
        """The scalar loss: the value ℒ with every gradient term attached."""
        weights = elbo.new_tensor(self.weights[:len(elbo)])
        per_step = -torch.where(healthy, elbo, 0.0).sum(1) * self.batch / healthy.sum(1).clamp(min=1)
        value = (weights * per_step).sum()
        self._backprop_through_steps()
        graph = list(self.graph_terms)
        constants = self.constants
        graph += [(total * value).sum() for value, total in zip(constants.gated, constants.captured, strict=True)
                  if total is not None]
        if self.phi_grads is not None:
            graph.append(_inject(self.phi_grads, self.phi))
        if not graph:
            return value
        return value + gradient_only(sum(graph[1:], graph[0]))

    @staticmethod
    def parameter_term(values: Tensor, healthy: Tensor, parameters: Sequence[Tensor]) -> Tensor:
        """A term of value zero that trains ``parameters`` only, on −(Σ of ``values`` over the healthy examples) / (the
        number of healthy examples): its backward gives each parameter that objective's gradient (scaled by the
        incoming one), and nothing to anything else ``values`` depends on (e.g. RME's component objectives, which
        train each component's encoder and not the model).

        Args:
            values: ``[..., B]`` per-example objectives (summed over the leading dimensions).
            healthy: ``[B]``, the examples that count.
            parameters: what the term trains.
        """
        trained = [p for p in parameters if p.requires_grad]
        if not trained:
            return values.new_zeros(())
        surrogate = -torch.where(healthy, values, 0.0).sum() / healthy.sum().clamp(min=1)
        grads = torch.autograd.grad(surrogate, trained, allow_unused=True)
        filled = [torch.zeros_like(p) if g is None else g for p, g in zip(trained, grads, strict=True)]
        return _inject(filled, trained)

    def _backprop_through_steps(self) -> None:
        if self.through_steps is None or not self.through_steps.requires_grad:
            return
        starts = [n for n, p in self.start.items() if p.requires_grad]
        grads = torch.autograd.grad(self.through_steps, [*self.phi, *(self.start[n] for n in starts)],
                                    allow_unused=True)
        if self.phi:
            self._add_phi_grads(grads[:len(self.phi)])
        through = [(n, g) for n, g in zip(starts, grads[len(self.phi):], strict=True) if g is not None]
        if through:
            self.graph_terms.append(_inner(dict(through), self.initial))


@dataclass(frozen=True)
class Stopping:
    """Test-time safeguards: stop each example when its ELBO stops improving; return each example's best λ.

    The decisions compare L(λ_t) estimated on common noise ε* (``samples`` draws, fixed for the whole run), so that
    comparing two steps compares λ, not the noise of single-sample estimates. Example b counts step t as an
    improvement when L*(λ_t) > best_b + tol · |best_b|; after ``patience`` steps in a row without one it stops
    (its λ is kept, its gradient is still evaluated with the batch). The run ends early when every example has
    stopped.

    Attributes:
        tol: the relative improvement a step must make (None: never stop; only ``keep_best``).
        patience: steps in a row without improvement before an example stops.
        keep_best: return, per example, the λ_t with the best L* instead of the last.
        samples: the number of common-noise samples in L*.
    """

    tol: float | None = None
    patience: int = 3
    keep_best: bool = False
    samples: int = 4

    def __post_init__(self) -> None:
        if self.tol is not None and not self.tol >= 0:
            raise ValueError(f"tol must be a float >= 0 or None, got {self.tol!r}")
        for name in ("patience", "samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")

    def watch(self, objective: Objective, x: Tensor, lam_0: Params) -> Observer:
        """The observer of one test-time run from ``lam_0`` (it draws its common noise now, from the global
        generator)."""
        return _Watch(self, objective, x, lam_0)


@dataclass(frozen=True)
class IterateAveraging:
    """Polynomial-decay averaging of the iterates (Shamir & Zhang 2013), a test-time estimate for any method.

    From step ``start`` on, the run returns the running average λ̄_T instead of the last iterate λ_T:

        λ̄_start = λ_start,   λ̄_t = (1 − ρ_t) λ̄_{t−1} + ρ_t λ_t,   ρ_t = (η + 1) / (t − start + 1 + η),

    a weighted average of λ_start, …, λ_t whose weights grow polynomially (degree η) with t, so early iterates are
    forgotten (η = 0 is the plain mean; η = 1 weights λ_s by s − start + 1). A stochastic step of constant size
    (a learned optimizer past the steps it was trained for) stops making progress and scatters λ_t around the
    optimum; the average keeps the progress and cancels the scatter. Iterates before ``start`` are not
    averaged, and runs of at most ``start`` steps return λ_T unchanged. The iterates themselves are what the steps
    see; the run's last ELBO row is evaluated at λ̄_T, the estimate it returns.

    Attributes:
        start: the first averaged step; None takes the method's ``num_steps`` (the steps a learned optimizer was
            trained for: averaging changes nothing up to there).
        eta: η ≥ 0, how fast early iterates are forgotten.

    Example:
        >>> import torch
        >>> averaging = IterateAveraging(start=1, eta=0.0)
        >>> iterates = [{"loc": torch.tensor([[v]])} for v in (9.0, 1.0, 2.0, 3.0)]
        >>> averaging.running(iterates)[-1]["loc"]   # the mean of steps 1..3; step 0 is not averaged
        tensor([[2.]])
    """

    start: int | None = None
    eta: float = 1.0

    def __post_init__(self) -> None:
        if self.start is not None and (isinstance(self.start, bool) or not isinstance(self.start, int)
                                       or self.start < 0):
            raise ValueError(f"start must be an int >= 0 (the first averaged step) or None, got {self.start!r}")
        if not (isinstance(self.eta, (int, float)) and self.eta >= 0):
            raise ValueError(f"eta must be a number >= 0, got {self.eta!r}")

    def starting_at(self, default: int) -> IterateAveraging:
        """This averaging with ``start`` set (``default`` where it is None)."""
        return self if self.start is not None else IterateAveraging(start=default, eta=self.eta)

    def watch(self) -> Observer:
        """The observer of one test-time run (``start`` must be set: :meth:`starting_at`)."""
        if self.start is None:
            raise ValueError("averaging is a test-time estimate with a start step: pass IterateAveraging(start=...), "
                             "or starting_at(num_steps), to a test-time run (train=False)")
        return _Averager(self)

    def update(self, average: Params | None, params: Params, t: int) -> Params | None:
        """λ̄_t from λ̄_{t−1} (``average``) and λ_t (``params``, detached); None before ``start``."""
        if self.start is None:
            raise ValueError("this IterateAveraging has no start step: set start=, or use starting_at(num_steps)")
        start = self.start
        if t < start:
            return None
        if average is None or t == start:
            return dict(params)
        rho = (self.eta + 1) / (t - start + 1 + self.eta)
        return {n: torch.lerp(average[n], p, rho) for n, p in params.items()}

    def running(self, iterates: Sequence[Params]) -> list[Params]:
        """The estimate a run would return after each step: λ_t before ``start``, λ̄_t from then on."""
        average: Params | None = None
        out = []
        for t, params in enumerate(iterates):
            average = self.update(average, params, t)
            out.append(params if average is None else average)
        return out


class Observer:
    """Watches a refinement run (:func:`refine`); the base class does nothing.

    At every step t the loop asks each observer, in order, whether it replaces the estimate the run would return
    after the step (:meth:`estimate`; λ_t when none does), evaluates L_t and ∇_λ L_t (at the estimate on the last
    step), and hands the :class:`StepRecord` to :meth:`observe`; at the end :meth:`finish` may replace the returned
    estimate.
    """

    #: a test-time observer, refused in a training run
    test_time_only = False

    def estimate(self, t: int, lam_t: Params) -> Params | None:
        """The estimate after step t given λ_t (detached), or None to leave it to λ_t (or to other observers)."""
        return None

    def observe(self, record: StepRecord) -> Tensor | None:
        """Takes step t's record; returns which examples may still move (None: no opinion)."""
        return None

    def finish(self, estimate: Params) -> Params:
        """The run's estimate, given the last one."""
        return estimate


@dataclass(frozen=True)
class StepRecord:
    """What the loop hands its observers at step t.

    Attributes:
        t: the step.
        lam_t: λ_t, detached.
        estimate: the estimate the run would return after this step (λ_t, or an average of the iterates).
        elbo: L_t ``[B]`` at the λ evaluated (λ_t; the estimate at the last step).
        grads: ∇_λ L_t, zero on unhealthy rows.
        healthy: ``[B]``, whether L_t and ∇_λ L_t are finite.
    """

    t: int
    lam_t: Params
    estimate: Params
    elbo: Tensor
    grads: Params
    healthy: Tensor


class RecordIterates(Observer):
    """Keeps λ_0, …, λ_T (detached) in :attr:`iterates`."""

    def __init__(self) -> None:
        self.iterates: list[Params] = []

    def observe(self, record: StepRecord) -> None:
        self.iterates.append(record.lam_t)
        return None


class _Averager(Observer):
    """:class:`IterateAveraging` over one run: the estimate is the running average from its start step on."""

    test_time_only = True

    def __init__(self, averaging: IterateAveraging) -> None:
        self.averaging = averaging
        self.average: Params | None = None

    def estimate(self, t: int, lam_t: Params) -> Params | None:
        self.average = self.averaging.update(self.average, lam_t, t)
        return self.average


class _Watch(Observer):
    """:class:`Stopping` over one run: scores each estimate on common noise, stops examples, keeps the best."""

    test_time_only = True

    def __init__(self, stopping: Stopping, objective: Objective, x: Tensor, lam_0: Params) -> None:
        self.stopping, self.objective, self.x = stopping, objective, x
        batch, dim = x.shape[0], objective.space.total_dim
        samples = stopping.samples if objective.family.stochastic else 1
        self.noise = (sample_noise(samples, batch, dim, dtype=x.dtype, device=x.device) if objective.family.stochastic
                      else x.new_zeros(1, batch, dim))
        self.best_value = x.new_full((batch,), -torch.inf)
        self.best_lam = detach(lam_0)
        self.waiting = torch.zeros(batch, dtype=torch.long, device=x.device)
        self.active = torch.ones(batch, dtype=torch.bool, device=x.device)

    @torch.no_grad()
    def observe(self, record: StepRecord) -> Tensor:
        """Scores the estimate on the common noise; returns which examples still move."""
        with full_precision(self.x):
            value = self.objective.elbo(record.estimate, self.x, self.noise)
        tol = self.stopping.tol or 0.0
        better = torch.isfinite(value) & (value > self.best_value + tol * self.best_value.abs().nan_to_num(posinf=0))
        self.best_value = torch.where(better, value, self.best_value)
        self.best_lam = {n: torch.where(better[:, None], p, self.best_lam[n]) for n, p in record.estimate.items()}
        self.waiting = torch.where(better, 0, self.waiting + 1)
        if self.stopping.tol is not None:
            self.active = self.active & (self.waiting < self.stopping.patience)
        return self.active

    def finish(self, estimate: Params) -> Params:
        return self.best_lam if self.stopping.keep_best else estimate


@dataclass(frozen=True)
class Trajectory:
    """What a refinement run returns.

    Attributes:
        params: the estimate: λ_T (keeping its graph to the step's parameters when a training run left it one), or
            what the observers made of it (the average of the iterates, the best λ seen).
        elbo: ``[T + 1, B]`` ELBOs L_0, …, L_T (``[T, B]`` without the final evaluation; fewer rows when every
            example stopped early).
        grad_norm: per-example ‖∇_λ L_t‖ at every evaluated step, like ``elbo``.
        healthy: whether each example's ELBO and gradient were finite at each step, like ``elbo``.
        loss: the training loss (:class:`TrainingLoss`); its value alone, without a graph, at test time.
        steps: ``[B]``, the updates applied to each example (fewer than T where an observer stopped it).
    """

    params: Params
    elbo: Tensor
    grad_norm: Tensor
    healthy: Tensor
    loss: Tensor
    steps: Tensor


def _detached(state: Any) -> Any:
    """``state`` (tensors in nested tuples, lists and dicts) with every tensor that has a graph detached."""
    if isinstance(state, Tensor):
        return state.detach() if state.requires_grad else state
    if isinstance(state, dict):
        return {key: _detached(value) for key, value in state.items()}
    if isinstance(state, (tuple, list)):
        return type(state)(_detached(value) for value in state)
    return state


@dataclass(frozen=True)
class _Mode:
    """How one run evaluates and steps: whether it trains, backpropagates through the steps, to second order."""

    train: bool
    through_steps: bool
    second_order: bool


@dataclass(frozen=True)
class _Evaluation:
    """L_t, ∇_λ L_t (zero on unhealthy rows), their health and the per-example gradient norm (before masking)."""

    values: Tensor
    grads: Params
    healthy: Tensor
    norm: Tensor


def _evaluate(objective: Objective, lam: Params, x: Tensor, noise: Tensor, *, mode: _Mode, last: bool) -> _Evaluation:
    """The ELBO and its λ-gradient at ``lam`` (full precision; with a graph where the run trains from it)."""
    with torch.set_grad_enabled(mode.train and (last or mode.second_order)), full_precision(x):
        # L_T of a training run trains the model: evaluated as its own forward (running statistics move once)
        values, grads = objective.elbo_and_grad(lam, x, noise, update_statistics=mode.train and last)
        healthy = reduce(torch.logical_and, [torch.isfinite(g.detach()).all(-1) for g in grads.values()],
                         torch.isfinite(values.detach()))
        if mode.second_order and not last and not bool(healthy.all()):
            # Differentiating through the gradient, a non-finite row's derivatives would turn the zero it is masked
            # with into NaN: evaluate again with that row's λ cut from the graph.
            cut = {n: torch.where(healthy[:, None], p, p.detach()) for n, p in lam.items()}
            values, grads = objective.elbo_and_grad(cut, x, noise)
    norm = torch.sqrt(reduce(torch.add, [g.detach().square().sum(-1) for g in grads.values()]))
    return _Evaluation(values, {n: torch.where(healthy[:, None], g, 0.0) for n, g in grads.items()}, healthy, norm)


def _advance(step: Step, context: StepContext, state: Any, moving: Tensor, *,
             mode: _Mode) -> tuple[Params, Any, Tensor]:
    """λ_{t+1}: the step's proposal, constrained, on the healthy rows that still move (the others keep λ_t); the
    carried state (detached between steps unless training through them); which rows moved."""
    with torch.set_grad_enabled(mode.train):
        proposal, state = step(context, state)
        if not mode.through_steps:  # constant memory: no graph is carried from step to step
            state = _detached(state)
        proposal = context.objective.family.constrain(proposal)
        update = context.healthy & moving
        lam_next = {n: torch.where(update[:, None], proposal[n].to(v.dtype), v) for n, v in context.params.items()}
    return lam_next, state, update


def _refit(objective: Objective, lam: Params, x: Tensor, noise: Tensor, rows: Tensor) -> Tensor:
    """L_T of the rows ``rows`` alone (the model's term when other rows are not finite)."""
    with full_precision(x):
        return objective.elbo({n: v[rows] for n, v in lam.items()}, x[rows], noise[:, rows])


def _check_run(on_nonfinite: str, train: bool, observers: Sequence[Observer]) -> None:
    if on_nonfinite not in ON_NONFINITE:
        raise ValueError(f"on_nonfinite must be one of {ON_NONFINITE}, got {on_nonfinite!r}")
    refused = [type(o).__name__ for o in observers if o.test_time_only]
    if train and refused:
        raise ValueError(f"{refused} are test-time observers (stopping, keep-best, iterate averaging): use them with "
                         "infer() or a run with train=False, not in training")


def _estimate(observers: Sequence[Observer], t: int, lam_t: Params) -> Params | None:
    """The estimate the observers make of step t (None: λ_t itself)."""
    replaced = [e for e in (o.estimate(t, detach(lam_t)) for o in observers) if e is not None]
    return replaced[-1] if replaced else None


def refine(
    step: Step,
    lam_0: Params,
    x: Tensor,
    *,
    objective: Objective,
    num_steps: int,
    noise: Callable[[int], Tensor],
    training: Training | None = None,
    train: bool = False,
    on_nonfinite: str = "warn",
    observers: Sequence[Observer] = (),
    evaluate_last: bool = True,
) -> Trajectory:
    """Runs ``num_steps`` refinement steps from ``lam_0`` (see the module docstring).

    Args:
        step: the method's step.
        lam_0: λ_0, a dict of ``[B, D]`` tensors; it keeps its graph to a trainable encoder.
        x: the data ``[B, *event]``.
        objective: the model, family and latent layout whose ELBO is ascended.
        num_steps: T.
        noise: ``t -> ε_t`` ``[S, B, D]``, called once per evaluated step, in order.
        training: how the method learns (default: :class:`Training`'s defaults); its step weights also give the
            loss value at test time.
        train: build the training loss (else: test time, no graph).
        on_nonfinite: ``"warn"`` or ``"raise"`` when some examples' ELBO or gradient is not finite.
        observers: what watches the run (:class:`Observer`): :class:`RecordIterates`, and the test-time
            :meth:`Stopping.watch` and :meth:`IterateAveraging.watch` (refused with ``train``).
        evaluate_last: evaluate L_T (False when the caller scores λ_T itself, as a Pyro ELBO does).

    Returns:
        The :class:`Trajectory`.
    """
    _check_run(on_nonfinite, train, observers)
    training = Training() if training is None else training
    mode = _Mode(train, train and training.backprop_through_steps, train and training.second_order)
    trains_lam_0 = mode.through_steps and any(p.requires_grad for p in lam_0.values())
    lam_t = {n: p.detach().requires_grad_(trains_lam_0) for n, p in lam_0.items()}
    constants = RunConstants(capture=train and not mode.through_steps)
    loss = TrainingLoss(training, batch=x.shape[0], num_steps=num_steps, initial=lam_0, start=lam_t,
                        constants=constants)
    evaluations: list[_Evaluation] = []
    moving = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    steps = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    state: Any = None
    for t in range(num_steps + 1):
        last, estimate = t == num_steps, _estimate(observers, t, lam_t)
        if last and not evaluate_last:
            break
        # λ_t as the ELBO sees it: with its graph only to differentiate through the gradient; the estimate at the end
        lam = lam_t if mode.second_order and not last else detach(lam_t) if estimate is None or not last else estimate
        noise_t = noise(t)
        evaluated = _evaluate(objective, lam, x, noise_t, mode=mode, last=last)
        evaluations.append(evaluated)
        record = StepRecord(t, detach(lam_t), detach(lam) if estimate is None else estimate, evaluated.values,
                            evaluated.grads, evaluated.healthy)
        masks = [m for m in (o.observe(record) for o in observers) if m is not None]
        moving = reduce(torch.logical_and, masks, moving)
        if masks and not bool(moving.any()):
            break
        if train:
            loss.observe(t, lam_t, evaluated.grads)
        if last:
            if train:
                loss.observe_final(evaluated.values, evaluated.healthy, partial(_refit, objective, lam, x, noise_t))
            break
        lam_t = lam_t if mode.through_steps else lam  # feed-forward: λ_t's graph has served its product
        grads = evaluated.grads if mode.second_order else detach(evaluated.grads)
        context = StepContext(x=x, params=lam_t, grads=grads, elbo=evaluated.values, healthy=evaluated.healthy, t=t,
                              noise=noise_t, objective=objective, constants=constants)
        lam_t, state, update = _advance(step, context, state, moving, mode=mode)
        steps = steps + update
    return _finish(evaluations, loss, lam_t if estimate is None else estimate, observers, steps, x, on_nonfinite)


def _finish(evaluations: list[_Evaluation], loss: TrainingLoss, estimate: Params, observers: Sequence[Observer],
            steps: Tensor, x: Tensor, on_nonfinite: str) -> Trajectory:
    """The trajectory of a run: its rows stacked, unhealthy examples reported, the loss built, the estimate."""
    batch = x.shape[0]
    elbo = _stack([e.values.detach() for e in evaluations], batch, x)
    healthy = _stack([e.healthy for e in evaluations], batch, x).bool()
    _report_unhealthy(healthy, on_nonfinite)
    for observer in observers:
        estimate = observer.finish(estimate)
    return Trajectory(params=estimate, elbo=elbo, grad_norm=_stack([e.norm for e in evaluations], batch, x),
                      healthy=healthy, loss=loss.finish(elbo, healthy), steps=steps)


def _stack(values: list[Tensor], batch: int, like: Tensor) -> Tensor:
    return torch.stack(values) if values else like.new_zeros(0, batch)


def _report_unhealthy(healthy: Tensor, on_nonfinite: str) -> None:
    bad = (~healthy.all(0)).nonzero().flatten() if len(healthy) else healthy.new_zeros(0)
    if bad.numel() == 0:
        return
    shown = ", ".join(map(str, bad[:10].tolist())) + (", ..." if bad.numel() > 10 else "")
    at_start = int((~healthy[0, bad]).sum())
    message = (
        f"{bad.numel()} of {healthy.shape[1]} examples had a non-finite ELBO or λ-gradient (examples {shown}); their "
        "λ was kept at its last finite value and they were left out of the loss. Their entries in result.elbo are "
        f"not finite. {at_start} of them were not finite from the start (λ_0): that points at the data (extreme "
        "values, or values the model's log-density does not accept: check x at those examples); the others became "
        "non-finite during refinement: that points at the model (decoder outputs or a learned variance that "
        "overflow at the λ the steps reached) or at too large steps."
    )
    if on_nonfinite == "raise":
        raise FloatingPointError(message)
    warnings.warn(message, RuntimeWarning, stacklevel=6)
