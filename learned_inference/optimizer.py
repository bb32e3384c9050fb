"""``IterativeInferenceOptimizer``: a learned optimizer for the approximate posteriors of any latent model.

At every step t the engine (:mod:`learned_inference.engine`) evaluates the ELBO L_t and its gradient ∇_λ L_t at
the posterior parameters λ_t (``torch.func``); the optimizer encodes them (by default [α·log(|∇λL|+ε), sign(∇λL)],
the data x and λ_t), a small network reads the encoding, and its update heads give the step, which the family
then constrains. By default the first step is the paper's gated step (eqs. 5, 62) and every later one a learned
natural-gradient step inside a trust region (:mod:`learned_inference.updates`):

    λ_1 = constrain(g_0 ⊙ λ_0 + (1 − g_0) ⊙ f_0),     (g_0, f_0) = heads(network(encoding(∇_λ L_0, x, λ_0); φ)),
    λ_{t+1} = constrain(λ_t + v_{t+1}),   v_{t+1} = c_t · (β_t ⊙ v_t + η_t ⊙ F(λ_t)⁻¹ ∇_λ L_t)   (t ≥ 1).

Training (paper App. B.3, :class:`~learned_inference.engine.TrainingLoss`): the update network's loss is the mean
over steps of −L_t; the user's model learns from −L_T; an encoder giving λ_0 learns from −L_0. With a feed-forward
network λ is detached between steps, so training memory does not grow with ``num_steps``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

from torch import Tensor

from learned_inference.block_family import BlockFamily
from learned_inference.context import StepContext
from learned_inference.encodings import DEFAULT_ENCODING, Encoding, FeatureShapes, make_encoding
from learned_inference.engine import IterateAveraging, Training, mean_over_steps
from learned_inference.families import Family, Params
from learned_inference.inference import InferenceMethod, InferenceResult
from learned_inference.latent_space import LatentSpace
from learned_inference.learned_step import learned_step
from learned_inference.model import LatentModel
from learned_inference.networks import PerVariableNetwork, UpdateNetwork, make_network
from learned_inference.train_mode import TrainModeRun
from learned_inference.updates import PerVariableUpdate, Update, make_update
from learned_inference.validation import check_int

#: the default test-time estimate beyond the trained steps: the polynomial-decay average from step ``num_steps`` on
DEFAULT_AVERAGING = IterateAveraging()

__all__ = ["DEFAULT_AVERAGING", "IterativeInferenceOptimizer"]


def _build_network(
    network: str | UpdateNetwork | Mapping[str, str | UpdateNetwork], space: LatentSpace, *,
    hidden_size: int | None, num_layers: int | None,
) -> UpdateNetwork:
    """The update network from a name, an instance, or a dict of them per latent variable."""
    if isinstance(network, UpdateNetwork) and (hidden_size is not None or num_layers is not None):
        raise ValueError("hidden_size and num_layers size a network built from a name; this network is already "
                         "built: leave them out")
    size = check_int("hidden_size", 512 if hidden_size is None else hidden_size, minimum=1)
    layers = check_int("num_layers", 2 if num_layers is None else num_layers, minimum=1)
    if isinstance(network, Mapping):
        network = PerVariableNetwork({v: make_network(spec, hidden_size=size, num_layers=layers)
                                      for v, spec in network.items()})
    built = make_network(network, hidden_size=size, num_layers=layers)
    variables = [v for v in built.parts() if v is not None]
    if variables and (space.names is None or set(variables) != set(space.names)):
        expected = list(space.names) if space.names is not None else "(latent_dim as a dict)"
        raise ValueError(f"a per-variable network needs one network per latent variable {expected}, got "
                         f"{sorted(variables)}")
    return built


def _part_sizes(family: Family, space: LatentSpace, variable: str | None) -> dict[str, int]:
    """The widths of λ's parameters in one part of the network: all of λ (``variable`` None) or one variable's
    block (its own family's widths, from the :class:`~learned_inference.block_family.BlockFamily`)."""
    if variable is None:
        return family.param_sizes(space.total_dim)
    return cast(BlockFamily, family).block_sizes()[variable]


def _build_update(update: str | Update, network: UpdateNetwork, family: Family, space: LatentSpace) -> Update:
    """The update heads for every part of the network."""
    parts = network.parts()
    if isinstance(update, Update):
        if None not in parts:
            raise ValueError("update must be a name (e.g. 'gated_then_natural_gradient') for a per-variable network: "
                             "pass a name to build heads for every variable")
        expected = (parts[None].hidden_size, space.total_dim)
        if (update.hidden_size, update.dim) != expected:
            raise ValueError(f"update must read the network's {expected[0]} outputs and update {expected[1]} latent "
                             f"dimensions, got hidden_size={update.hidden_size}, dim={update.dim}; pass a name "
                             "(e.g. 'gated_then_natural_gradient') to build matching heads")
        return update
    sizes = {v: space.total_dim if v is None else space.sizes[v] for v in parts}
    heads = {v: make_update(update, _part_sizes(family, space, v), hidden_size=net.hidden_size, dim=sizes[v])
             for v, net in parts.items()}
    if None in heads:
        return heads[None]
    return PerVariableUpdate({v: head for v, head in heads.items() if v is not None})


class IterativeInferenceOptimizer(InferenceMethod):
    """A learned optimizer that refines approximate posteriors q_λ(z | x) of a latent model.

    Implements iterative amortized inference (Marino, Yue & Mandt 2018): λ_{t+1} = g ⊙ λ_t + (1 − g) ⊙ f(enc_t)
    (eq. 62), where enc_t encodes ∇_λ L_t (App. B.1), x and λ_t. The model is used, not owned: it is not a
    submodule, so ``parameters()`` and ``state_dict()`` hold the update network and heads only. Components are
    passed in (names are shortcuts): ``encoding``, ``network``, ``update``.

    Args:
        model: anything with ``log_joint(x, z)`` (see :mod:`learned_inference.model`).
        latent_dim: the size of z, or a dict of sizes for several latent variables (listed bottom-up for a
            hierarchy: ``{"z1": 64, "z2": 32}``, z1 next to the data).
        num_steps: refinement steps T used by :meth:`forward` (and by :meth:`infer` unless overridden).
        family: ``"diagonal_gaussian"`` (default), ``"delta"``, ``"low_rank"`` (a
            :class:`~learned_inference.low_rank.LowRankGaussian` of rank 2), a
            :class:`~learned_inference.families.Family`, or a dict of them per latent variable.
        encoding: what the network sees: names or :class:`~learned_inference.encodings.Encoding` objects
            (default ``("gradient", "data", "params")``; ``"hierarchical_errors"`` adds the bottom-up and
            top-down errors of a model with ``conditionals(z)``, see :mod:`learned_inference.hierarchical`).
        network: ``"highway"`` (feed-forward, default), ``"lstm"``, ``"gru"``, an
            :class:`~learned_inference.networks.UpdateNetwork`, or one per latent variable (a
            :class:`~learned_inference.networks.PerVariableNetwork`, or a dict of names/networks).
        update: ``"gated_then_natural_gradient"`` (default: the first step is the paper's gated update, eq. 62,
            which can jump from the prior as an encoder does; every later step is a learned step size and
            momentum on F⁻¹∇_λ L inside a trust region of 20 nats, which vanishes with the gradient, so more
            steps do not drift; measured in ``benchmarks/results/frozen_refinement.md``), ``"gated"`` (eq. 62 at
            every step, the paper's model), ``"natural_gradient"`` (every step), ``"residual"``, or an
            :class:`~learned_inference.updates.Update` (e.g. a :class:`~learned_inference.updates.StagedUpdate`).
        hidden_size: units per layer of a network built from a name (default 512).
        num_layers: hidden layers of a highway network built from a name (default 2).
        num_samples: reparameterized samples S per ELBO evaluation (default 2, an antithetic pair).
        antithetic: draw them in antithetic pairs (ε, −ε): the λ-gradient's noise term linear in ε cancels, which
            lets the learned steps be large without chasing noise. Default (None): pairs when S is even.
        init: λ_0 (:mod:`learned_inference.initial`): ``"prior"`` (default), ``"encoder"`` (``model.encode(x)``'s
            diagonal Gaussian, in the family's parameters: :meth:`~learned_inference.families.Family.from_diagonal`),
            ``"highway"`` (a built encoder, trained with the update network), or a callable x → (loc, log_var).
        analytic_kl: use the analytic KL when the model gives ``log_likelihood`` and a Gaussian ``prior()``.
        backprop_through_steps: keep the graph across steps (backpropagation through time). Default: False for
            feed-forward networks (constant memory), True for recurrent ones.
        second_order: feed the network gradients that keep their graph, so training differentiates through them;
            needs ``backprop_through_steps``.
        on_nonfinite: ``"warn"`` (default) or ``"raise"`` for examples whose ELBO or λ-gradient is not finite.
        data_shape: the event shape of x (e.g. ``(784,)``), to size the network now rather than on the first call.
        averaging: what a test-time run longer than ``num_steps`` returns: by default (``DEFAULT_AVERAGING``,
            ``IterateAveraging()``) the polynomial-decay average of the iterates from step ``num_steps`` on, which
            cancels the scatter of the learned steps around the optimum once they stop making progress (on the
            frozen-VAE benchmark: 0.2 nats at 50 steps); None returns the last iterate. Runs of at most
            ``num_steps`` steps, and training, are not affected.

    Example:
        >>> import torch
        >>> from learned_inference import DecoderModel, IterativeInferenceOptimizer
        >>> model = DecoderModel(torch.nn.Linear(4, 20), likelihood="bernoulli", latent_dim=4)
        >>> inference = IterativeInferenceOptimizer(model, latent_dim=4, num_steps=3, hidden_size=32)
        >>> optim = torch.optim.Adam([*model.parameters(), *inference.parameters()], lr=1e-3)
        >>> x = torch.bernoulli(torch.full((8, 20), 0.3))
        >>> result = inference(x)
        >>> result.loss.backward(); optim.step()
        >>> inference.infer(x, num_steps=10).elbo.shape
        torch.Size([11, 8])
    """

    def __init__(
        self,
        model: LatentModel,
        *,
        latent_dim: int | dict[str, int],
        num_steps: int = 5,
        family: str | Family | Mapping[str, str | Family] = "diagonal_gaussian",
        encoding: str | Encoding | Sequence[str | Encoding] = DEFAULT_ENCODING,
        network: str | UpdateNetwork | Mapping[str, str | UpdateNetwork] = "highway",
        update: str | Update = "gated_then_natural_gradient",
        hidden_size: int | None = None,
        num_layers: int | None = None,
        num_samples: int = 2,
        antithetic: bool | None = None,
        init: str | Callable[[Tensor], Any] = "prior",
        analytic_kl: bool = True,
        backprop_through_steps: bool | None = None,
        second_order: bool = False,
        on_nonfinite: str = "warn",
        data_shape: Sequence[int] | None = None,
        averaging: IterateAveraging | None = DEFAULT_AVERAGING,
    ) -> None:
        super().__init__(model, latent_dim=latent_dim, num_steps=num_steps, family=family, num_samples=num_samples,
                         analytic_kl=analytic_kl, antithetic=num_samples % 2 == 0 if antithetic is None else antithetic,
                         on_nonfinite=on_nonfinite, averaging=averaging)
        self._use_initial(init, allow_prior=True, hidden_size=hidden_size or 512, num_layers=num_layers or 2)
        self.encoding = make_encoding(encoding)
        self.encoding.check(model, self.space)
        self.network = _build_network(network, self.space, hidden_size=hidden_size, num_layers=num_layers)
        self.update = _build_update(update, self.network, self.family, self.space)
        self.backprop_through_steps = (self.network.recurrent if backprop_through_steps is None
                                       else bool(backprop_through_steps))
        self.second_order = bool(second_order)
        Training(backprop_through_steps=self.backprop_through_steps, second_order=self.second_order)  # validates
        if data_shape is not None:
            self.materialize(data_shape)

    def materialize(self, data_shape: Sequence[int]) -> None:
        """Sizes the network's input layer(s) for data of event shape ``data_shape`` (weights drawn now)."""
        data = math.prod(check_int("data_shape entries", int(d), minimum=1) for d in data_shape)
        for variable, part in self.network.parts().items():
            shapes = FeatureShapes.of(data=data, param_names=_part_sizes(self.family, self.space, variable),
                                      space=self.space, variable=variable)
            part.materialize(self.encoding.num_features(shapes))

    def step(self, context: StepContext, state: Any) -> tuple[Params, Any]:
        """The learned step (:func:`learned_step`); the engine then constrains it to the family's range."""
        return learned_step(self.encoding, self.network, self.update, context, state)

    def training_rule(self) -> Training:
        """Update network: mean over steps of −L_t; encoder: −L_0; through the steps for recurrent networks."""
        return Training(step_parameters=tuple(self.parameters()), step_weights=mean_over_steps,
                        backprop_through_steps=self.backprop_through_steps, second_order=self.second_order)

    def forward(
        self, x: Tensor, *, init_params: dict[str, Any] | None = None, noise: Tensor | None = None
    ) -> InferenceResult:
        """Runs ``num_steps`` refinement steps and returns a result whose ``loss`` trains.

        ``result.loss.backward()`` gives the update network the gradient of the mean over steps t = 1..T of the
        batch-mean −L_t, the user's model the gradient of the batch-mean −L_T at the (detached) final λ, and a
        trainable encoder (``init="encoder"``) the gradient of −L_0. Models whose parameters are frozen, or are
        not in the optimizer, simply get refined posteriors. Examples with a non-finite ELBO or gradient are left
        out (see ``on_nonfinite``).

        Args:
            x: a batch ``[B, *event]`` of floating-point data.
            init_params: an explicit λ_0 (a dict like ``result.params``) instead of the prior or encoder.
            noise: the reparameterization noise, as in :meth:`infer`.
        """
        return super().forward(x, init_params=init_params, noise=noise)

    def _check_inputs(self, x: Tensor, num_steps: int, noise: Tensor | None, *, train: bool) -> TrainModeRun | None:
        run = super()._check_inputs(x, num_steps, noise, train=train)
        self.materialize(x.shape[1:])
        return run

    def extra_repr(self) -> str:
        return (f"latent={self.space}, num_steps={self.num_steps}, family={self.family}, encoding={self.encoding}, "
                f"num_samples={self.num_samples}, init={self.initial.label!r}, "
                f"backprop_through_steps={self.backprop_through_steps}, averaging={self.averaging}")

