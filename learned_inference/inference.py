"""The interface every inference method shares: ``forward(x)`` trains, ``infer(x, num_steps=...)`` evaluates.

:class:`InferenceMethod` holds what the learned optimizer and the baselines have in common: the user's model (a
plain reference, not a submodule), the latent layout, the posterior family, input validation, the conversion
between the public form of λ (per latent variable) and the flat form inference works on, and the
reparameterization noise. A subclass supplies the method itself: ``init(x)`` (λ_0), a pure
``step(context, state)`` and its :class:`~learned_inference.engine.Training`; the loop over steps is the engine's
(:func:`~learned_inference.engine.refine`). All return an :class:`InferenceResult`, so a benchmark swaps methods
with one argument.

Example:
    >>> import torch
    >>> from learned_inference import DecoderModel, GradientEStep, IterativeInferenceOptimizer
    >>> model = DecoderModel(torch.nn.Linear(2, 6), likelihood="bernoulli", latent_dim=2)
    >>> x = torch.bernoulli(torch.full((3, 6), 0.5))
    >>> methods = [IterativeInferenceOptimizer(model, latent_dim=2, hidden_size=8), GradientEStep(model, latent_dim=2)]
    >>> for method in methods:
    ...     print(type(method).__name__, method.infer(x, num_steps=4).elbo.shape)
    IterativeInferenceOptimizer torch.Size([5, 3])
    GradientEStep torch.Size([5, 3])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributions import Distribution

from learned_inference.block_family import BlockFamily
from learned_inference.context import StepContext
from learned_inference.engine import (
    ON_NONFINITE,
    IterateAveraging,
    Observer,
    RecordIterates,
    Stopping,
    Training,
    Trajectory,
    refine,
)
from learned_inference.families import Family, Params, detach, make_family
from learned_inference.initial import InitialEstimate, make_initial
from learned_inference.latent_space import LatentSpace
from learned_inference.model import LatentModel, check_log_joint, check_model, check_support
from learned_inference.objectives import Objective, prior_moments, sample_noise
from learned_inference.train_mode import ModelModes, TrainModeRun
from learned_inference.validation import check_data, check_int, check_placement, check_tensor

__all__ = ["InferenceMethod", "InferenceResult"]


@dataclass(frozen=True)
class InferenceResult:
    """What a run of inference returns.

    Attributes:
        params: the final λ, detached: a dict of ``[B, D]`` tensors (``{"loc", "log_var"}`` for a Gaussian), or
            for several latent variables a dict of such dicts keyed by variable name.
        posterior: q_λ as a ``torch.distributions.Distribution`` with batch shape ``[B]`` (a dict of them for
            several latent variables).
        elbo: ``[num_steps + 1, B]`` per-example ELBO estimates at λ_0 (the initial estimate), ..., λ_T.
        loss: a scalar whose ``backward()`` trains (each method documents its gradient).
        grad_norm: ``[num_steps + 1, B]`` per-example norms of ∇_λ L at every step.
        healthy: ``[num_steps + 1, B]``, whether each example's ELBO and gradient were finite at each step.
        steps: ``[B]``, the refinement steps applied to each example (fewer where ``infer(..., tol=...)`` stopped it
            early, or where it was not finite).
        trajectory: the iterates λ_0, …, λ_T in the form of ``params`` when ``infer(..., record_params=True)``,
            else None. With iterate averaging, ``params`` is the average after the last step;
            ``method.estimates(trajectory)`` gives the estimate after every step.
    """

    params: dict[str, Any]
    posterior: Distribution | dict[str, Distribution]
    elbo: Tensor
    loss: Tensor
    grad_norm: Tensor
    healthy: Tensor
    steps: Tensor
    trajectory: list[dict[str, Any]] | None = None


class InferenceMethod(nn.Module):
    """Base class of inference methods over a user's latent model.

    Args:
        model: anything with ``log_joint(x, z)`` (see :mod:`learned_inference.model`).
        latent_dim: the size of z, or a dict of sizes for several latent variables.
        num_steps: steps T used by :meth:`forward` (and by :meth:`infer` unless overridden).
        family: ``"diagonal_gaussian"``, ``"delta"``, ``"low_rank"``, a :class:`~learned_inference.families.Family`,
            or for several latent variables a dict of them, one per variable (a
            :class:`~learned_inference.block_family.BlockFamily`).
        num_samples: reparameterized samples S per ELBO evaluation.
        analytic_kl: use the analytic KL when the model gives ``log_likelihood`` and a Gaussian ``prior()``.
        antithetic: draw the samples in antithetic pairs (ε, −ε) (``num_samples`` even), which cancels the noise
            term linear in ε in every λ-gradient.
        on_nonfinite: when some examples' ELBO or λ-gradient is not finite (e.g. an overflowing decoder):
            ``"warn"`` (those examples keep their λ and are left out of the loss, the others are unaffected, and a
            ``RuntimeWarning`` names them) or ``"raise"`` (``FloatingPointError``).
        averaging: at test time, return the running average of the iterates from a given step on
            (:class:`~learned_inference.engine.IterateAveraging`; ``start=None`` means from ``num_steps``) instead
            of the last iterate; None (default) returns the last. Kept as the attribute ``averaging``, which may be
            set to None later to see the last iterates.
    """

    def __init__(
        self,
        model: LatentModel,
        *,
        latent_dim: int | dict[str, int],
        num_steps: int,
        family: str | Family | Mapping[str, str | Family],
        num_samples: int,
        analytic_kl: bool,
        antithetic: bool = False,
        on_nonfinite: str = "warn",
        averaging: IterateAveraging | None = None,
    ) -> None:
        super().__init__()
        check_model(model)
        # The model is the user's: keep a plain reference, not a submodule.
        object.__setattr__(self, "_model", model)
        self.space = LatentSpace(latent_dim)
        self.num_steps = check_int("num_steps", num_steps, minimum=0)
        self.num_samples = check_int("num_samples", num_samples, minimum=1)
        if antithetic and num_samples % 2:
            raise ValueError(f"antithetic=True needs an even num_samples (pairs ε and -ε), got {num_samples}")
        self.antithetic = bool(antithetic)
        self.family = self._make_family(family)
        self.analytic_kl = analytic_kl
        if on_nonfinite not in ON_NONFINITE:
            raise ValueError(f"on_nonfinite must be one of {ON_NONFINITE}, got {on_nonfinite!r}")
        self.on_nonfinite = on_nonfinite
        if averaging is not None and not isinstance(averaging, IterateAveraging):
            raise TypeError(f"averaging must be an IterateAveraging or None, got {type(averaging).__name__}")
        self.averaging = averaging
        self._modes: ModelModes | None = None
        self.initial = InitialEstimate()

    def _make_family(self, family: str | Family | Mapping[str, str | Family]) -> Family:
        """One representation of several latent variables: a :class:`BlockFamily` (one family per variable)."""
        names = self.space.names
        if isinstance(family, Mapping):
            return BlockFamily(family, space=self.space)
        if names is None or isinstance(family, BlockFamily):
            return make_family(family)
        return BlockFamily(dict.fromkeys(names, make_family(family)), space=self.space)

    @property
    def model(self) -> LatentModel:
        """The user's model (not a submodule)."""
        return self.__dict__["_model"]

    # -- the method: λ_0, one step, and how it learns ------------------------------------------------------------

    def init(self, x: Tensor) -> Params:
        """λ_0 for the batch ``x`` (flat: a dict of ``[B, D_total]`` tensors), with its graph to any encoder: the
        method's λ₀ strategy (:class:`~learned_inference.initial.InitialEstimate`, set by ``init=``)."""
        return self.initial(x, family=self.family, space=self.space, flatten=self._flatten)

    def _use_initial(self, init: str | Callable[[Tensor], Any], *, allow_prior: bool, hidden_size: int,
                     num_layers: int) -> None:
        """Sets the λ₀ strategy named by ``init`` (:func:`~learned_inference.initial.make_initial`); an encoder it
        builds, or one passed as a module, is registered as ``self.encoder`` (it trains and saves with the method)."""
        self.initial, module = make_initial(init, model=self.model, family=self.family, space=self.space,
                                            allow_prior=allow_prior, hidden_size=hidden_size, num_layers=num_layers)
        self.encoder = module if module is not None else self.initial.encoder

    def step(self, context: StepContext, state: Any) -> tuple[Params, Any]:
        """λ_{t+1} (before the family's constraints) and the carried state (None at t = 0)."""
        raise NotImplementedError

    def training_rule(self) -> Training:
        """How :meth:`forward`'s loss trains this method (:class:`~learned_inference.engine.Training`)."""
        raise NotImplementedError

    # -- running it -----------------------------------------------------------------------------------------------

    def compile(self, *args: Any, **kwargs: Any) -> None:
        """``nn.Module.compile`` (``torch.compile`` of :meth:`forward`, arguments passed on), with AOTAutograd's
        donated buffers turned off process-wide (``torch._functorch.config.donated_buffer = False``).

        The training loss takes one vector-Jacobian product per step and keeps the graph of what the steps share
        for the next (``retain_graph``), which a compiled backward with donated buffers refuses ("requires
        create_graph=False and retain_graph=False"). ``torch.compile(method)`` called directly needs the same
        setting.
        """
        torch._functorch.config.donated_buffer = False
        super().compile(*args, **kwargs)

    def forward(
        self, x: Tensor, *, init_params: dict[str, Any] | None = None, noise: Tensor | None = None
    ) -> InferenceResult:
        """Runs ``num_steps`` steps and returns a result whose ``loss`` trains.

        Args:
            x: a batch ``[B, *event]`` of floating-point data.
            init_params: an explicit λ_0 (a dict like ``result.params``) instead of the method's own start.
            noise: the reparameterization noise, as in :meth:`infer`.
        """
        return self._refine(x, self.num_steps, train=torch.is_grad_enabled(), init_params=init_params, noise=noise)

    @torch.no_grad()
    def infer(
        self,
        x: Tensor,
        *,
        num_steps: int | None = None,
        init_params: dict[str, Any] | None = None,
        noise: Tensor | None = None,
        record_params: bool = False,
        tol: float | None = None,
        patience: int = 3,
        keep_best: bool = False,
    ) -> InferenceResult:
        """Test-time inference: any number of steps, no training graph, optional per-example safeguards.

        Args:
            x: a batch ``[B, *event]``.
            num_steps: steps T (default: ``num_steps`` given at construction).
            init_params: an explicit λ_0 (a dict like ``result.params``) instead of the method's own start.
            noise: the reparameterization noise for every step, ``[num_steps + 1, S, B, D]`` (common random
                numbers for comparisons); drawn from the global generator when omitted.
            record_params: keep λ at every step in ``result.trajectory``.
            tol: stop each example once its ELBO has improved by less than ``tol`` (relative) for ``patience`` steps
                in a row (:class:`~learned_inference.engine.Stopping`; decisions on common noise); ``result.steps``
                reports the steps each example used, and ``result.elbo`` ends when every example has stopped.
            patience: steps in a row without improvement before an example stops.
            keep_best: return, per example, the λ with the best ELBO seen (on common noise) instead of the last.
        """
        steps = self.num_steps if num_steps is None else check_int("num_steps", num_steps, minimum=0)
        stopping = None if tol is None and not keep_best else Stopping(tol=tol, patience=patience, keep_best=keep_best)
        return self._refine(x, steps, train=False, init_params=init_params, noise=noise, record_params=record_params,
                            stopping=stopping)

    def estimates(self, trajectory: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The estimate this method returns after each step of a recorded run (``result.trajectory`` from
        ``infer(..., record_params=True)``): the iterate λ_t, or with :attr:`averaging` the running average of the
        iterates from its start on (:meth:`~learned_inference.engine.IterateAveraging.running`)."""
        if self.averaging is None:
            return list(trajectory)
        return self.averaging.starting_at(self.num_steps).running(trajectory)

    def _refine(
        self, x: Tensor, num_steps: int, *, train: bool, init_params: dict[str, Any] | None, noise: Tensor | None,
        record_params: bool = False, stopping: Stopping | None = None, start: Callable[[Tensor], Params] | None = None,
        observers: Sequence[Observer] = (),
    ) -> InferenceResult:
        """The one refinement path of every method: checks, λ_0 (``init_params``, else ``start(x)``, else
        :meth:`init`), the test-time observers asked for and the method's own ``observers``, then the engine."""
        run = self._check_inputs(x, num_steps, noise, train=train)
        prior = prior_moments(self.model, self.space) if self.analytic_kl else None
        objective = Objective(self.model, self.family, self.space, prior, run)
        lam_0 = self._flatten(init_params, x) if init_params is not None else (start or self.init)(x)
        observers = list(observers)
        if not train and self.averaging is not None:
            observers.append(self.averaging.starting_at(self.num_steps).watch())
        if stopping is not None:
            observers.append(stopping.watch(objective, x, lam_0))
        recorder = RecordIterates() if record_params else None
        with nullcontext() if run is None else run:
            trajectory = refine(
                self.step, lam_0, x, objective=objective, num_steps=num_steps,
                noise=lambda t: self._noise(noise, t, x), training=self.training_rule(), train=train,
                on_nonfinite=self.on_nonfinite, observers=[*observers, *([recorder] if recorder else [])],
            )
        return self._result(trajectory, None if recorder is None else recorder.iterates)

    def _result(self, trajectory: Trajectory, history: list[Params] | None = None) -> InferenceResult:
        params, posterior = self._public(trajectory.params)
        return InferenceResult(
            params=params, posterior=posterior, elbo=trajectory.elbo, loss=trajectory.loss,
            grad_norm=trajectory.grad_norm, healthy=trajectory.healthy, steps=trajectory.steps,
            trajectory=None if history is None else [self._public(p)[0] for p in history],
        )

    def _check_inputs(self, x: Tensor, num_steps: int, noise: Tensor | None, *, train: bool) -> TrainModeRun | None:
        """Validates x (placement, the likelihood's support) and noise; on the first call the model contract
        (:func:`~learned_inference.model.check_log_joint`); on every call the modes of the batch norms and dropouts
        log_joint uses. Returns the run's context for those in training mode
        (:meth:`~learned_inference.train_mode.ModelModes.run`: an error for batch norm in training mode at test
        time or in a frozen model), or None."""
        check_data(x)
        check_placement(x, {"the model": self.model, "the inference method": self})
        check_support(self.model, x)
        if noise is not None:
            shape = [num_steps + 1, self.num_samples, x.shape[0], self.space.total_dim]
            # non-finite noise is allowed: the examples it reaches are reported by the engine's non-finite policy
            check_tensor("noise", noise, shape=shape, like=x, layout="[num_steps + 1, S, B, D]", finite=False)
        if self._modes is None:
            self._modes = check_log_joint(self.model, x, self.space, num_samples=self.num_samples)
        return self._modes.run(train=train)

    def _flatten(self, params: dict[str, Any], x: Tensor) -> Params:
        """The public form of λ (per variable for several latents) → the flat internal form, validated: every
        entry a finite ``[B, D]`` tensor in x's dtype and device, named ``init_params[...]`` in errors."""
        names, space = self.family.param_names, self.space
        batch, like = x.shape[0], x.new_empty(0)

        def entries(value: object, keys: tuple[str, ...], label: str) -> Mapping[str, Any]:
            if not isinstance(value, Mapping) or set(value) != set(keys):
                got = sorted(value) if isinstance(value, Mapping) else type(value).__name__
                raise ValueError(f"{label} must have entries {list(keys)} (a dict like result.params), got {got}")
            return value

        def entry(label: str, value: Any, size: int, dim: int) -> Tensor:
            return check_tensor(label, value, shape=[batch, size], like=like,
                                layout="[B, D]" if size == dim else f"[B, {size}]")

        given = entries(params, names if space.names is None else space.names, "init_params")
        if space.names is None:
            sizes = self.family.param_sizes(space.total_dim)
            return {p: entry(f"init_params[{p!r}]", given[p], sizes[p], space.total_dim) for p in names}
        assert isinstance(self.family, BlockFamily)  # several variables (_make_family)
        widths = self.family.block_sizes()
        blocks = {v: entries(given[v], names, f"init_params[{v!r}]") for v in space.names}
        return {p: space.merge({v: entry(f"init_params[{v!r}][{p!r}]", blocks[v][p], widths[v][p], space.sizes[v])
                                for v in space.names}) for p in names}

    def _public(self, params: Params) -> tuple[dict[str, Any], Distribution | dict[str, Distribution]]:
        """The flat internal λ → (public params, posterior), detached."""
        params = detach(params)
        if isinstance(self.family, BlockFamily):
            return self.family.blocks(params), self.family.distributions(params)
        return params, self.family.distribution(params)

    def _noise(self, noise: Tensor | None, t: int, x: Tensor) -> Tensor:
        """The noise ε of step t, ``[S, B, D]`` (``[1, B, D]`` zeros for point-estimate families)."""
        if noise is not None:
            return noise[t]
        if not self.family.stochastic:
            return x.new_zeros(1, x.shape[0], self.space.total_dim)
        return sample_noise(self.num_samples, x.shape[0], self.space.total_dim, dtype=x.dtype, device=x.device,
                            antithetic=self.antithetic)
