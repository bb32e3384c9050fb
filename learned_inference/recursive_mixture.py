"""Recursive mixture estimation (RME; Kim & Pavlovic, "Recursive Inference for Variational Autoencoders", 2020).

An amortized mixture posterior built one component at a time. Component m comes from its own encoder,
q_m(z | x) = N(μ_m(x), diag σ²_m(x)), and a network gives the mixing weights ε_m(x) = sigmoid(a_m(x)):

    Q_1 = q_1,    Q_m = (1 − ε_m) Q_{m−1} + ε_m q_m,    so    Q_M = Σ_m α_m q_m,
    α_m = ε_m Π_{i>m} (1 − ε_i)   (ε_1 = 1)                                         (:func:`recursive_log_weights`).

The derivative of the ELBO in the direction of a new component at ε_m = 0 is
E_{q_m}[log p(x, z) − log Q_{m−1}(z)] = ELBO(q_m) + KL(q_m ‖ Q_{m−1}): a useful component must raise the bound
*and* differ from the mixture so far. RME trains component m on that, with the KL capped at a barrier C,

    J_m = ELBO(q_m) + min(KL(q_m ‖ sg[Q_{m−1}]), C)    (J_1 = ELBO(q_1); KL estimated from q_m's samples)
                                                                                 (:func:`component_objectives`),

every component at every step (earlier ones keep training), while the mixing network and the model learn from
the mixture's own ELBO, L(Q_M) with the components held fixed (the stratified estimator of
:class:`~learned_inference.mixture.GaussianMixture`). At test time all components come from one pass over the
M encoders (no sequential refinement), so the cost is M encoder evaluations.

Choosing C. Beyond the cap the KL term has no gradient, so C decides where component m settles. Below the KL it
takes to leave the basin of a mode Q_{m−1} already covers, q_m parks beside it at KL = C (and narrows, which
raises the KL); far above the KL between modes, the reward pushes q_m past the next mode. On a 1-D posterior with
modes at ±1.6 (variance 0.2; those KLs are ≈ 6 and ≈ 26 nats) RME reached log p(x) within 0.03 nats on 4 of 4
seeds with C = 20, 2 of 4 with C = 1, 3 of 4 with C = 5, 0 of 4 with C = 50 (``benchmarks/rme_barrier.py``):
tune C.

What the recursion cannot do: q_1 is trained on its own ELBO, i.e. it is a standard VAE encoder, so where the
dominant mode changes with x, q_1 (and q_2, the complement) must switch modes there; a smooth encoder switches over
a band of x in which the mixture is poor. A non-recursive mixture encoder keeps each component on one mode and
moves only the weights.

Example:
    >>> import torch
    >>> from learned_inference import DecoderModel
    >>> model = DecoderModel(torch.nn.Linear(2, 10), likelihood="bernoulli", latent_dim=2)
    >>> rme = RecursiveMixtureEncoder(model, latent_dim=2, num_components=3, hidden_size=16)
    >>> optim = torch.optim.Adam([*model.parameters(), *rme.parameters()], lr=1e-3)
    >>> x = torch.bernoulli(torch.full((4, 10), 0.5))
    >>> rme(x).loss.backward(); optim.step()
    >>> result = rme.infer(x)
    >>> result.params["logits"].shape, type(result.posterior).__name__
    (torch.Size([4, 3]), 'MixtureSameFamily')
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from learned_inference.context import StepContext
from learned_inference.engine import Observer, StepRecord, Training, TrainingLoss, final_step
from learned_inference.families import DiagonalGaussian, Params
from learned_inference.family_encoder import FamilyEncoder
from learned_inference.inference import InferenceMethod, InferenceResult
from learned_inference.latent_space import LatentSpace
from learned_inference.mixture import GaussianMixture, component_view
from learned_inference.model import LatentModel
from learned_inference.networks import HighwayEncoder
from learned_inference.objectives import PriorMoments, elbo, prior_moments, sample_noise
from learned_inference.validation import check_int

__all__ = ["RecursiveMixtureEncoder", "component_objectives", "recursive_log_weights"]

#: the pre-sigmoid mixing value of a component that has not joined yet (its weight is ≈ 0)
_INACTIVE = -1e4


def recursive_log_weights(mixing: Tensor) -> Tensor:
    """log α ``[B, M]`` of Q_M from the pre-sigmoid mixing values a ``[B, M − 1]`` of components 2..M.

    log α_m = log ε_m + Σ_{i>m} log(1 − ε_i), with log ε = logsigmoid(a), log(1 − ε) = logsigmoid(−a), ε_1 = 1;
    Σ_m α_m = 1.

    Example:
        >>> recursive_log_weights(torch.zeros(1, 2)).exp()     # ε_2 = ε_3 = ½: (¼, ¼, ½)
        tensor([[0.2500, 0.2500, 0.5000]])
    """
    zeros = mixing.new_zeros(mixing.shape[0], 1)
    log_keep = nn.functional.logsigmoid(-mixing)
    kept_after = torch.flip(torch.cumsum(torch.flip(log_keep, [-1]), -1), [-1])  # Σ_{i ≥ m+1} log(1 − ε_i)
    return torch.cat([zeros, nn.functional.logsigmoid(mixing)], -1) + torch.cat([kept_after, zeros], -1)


def component_objectives(
    model: LatentModel,
    params: Params,
    x: Tensor,
    noise: Tensor,
    *,
    num_components: int,
    space: LatentSpace,
    barrier: float,
    prior: PriorMoments | None = None,
) -> Tensor:
    """J_m = ELBO(q_m) + min(KL(q_m ‖ sg[Q_{m−1}]), C) for every component, ``[M, B]`` (J_1 = ELBO(q_1)).

    ELBO(q_m) is :func:`~learned_inference.objectives.elbo` of the diagonal Gaussian q_m (analytic KL to the prior
    with ``prior``, else the analytic entropy), one model evaluation for all M components; the KL is
    1/S Σ_s [log q_m(z_s) − log Q_{m−1}(z_s)] at q_m's samples z_s = μ_m + σ_m ε_s, with Q_{m−1} (components
    1..m−1, their weights renormalized) held fixed, so J_m trains component m only.

    Args:
        model: anything with ``log_joint(x, z)``.
        params: the mixture's λ (``GaussianMixture`` layout) with its graph to the component encoders.
        x: the data ``[B, *event]``.
        noise: ``[S, B, D]``, shared by the components.
        num_components: M.
        space: the latent layout (one vector).
        barrier: C, in nats.
        prior: the prior's moments for the components' analytic KL
            (:func:`~learned_inference.objectives.prior_moments`).
    """
    loc, log_var, log_pi = component_view(params, num_components)
    batch, m, dim = loc.shape
    stacked = {"loc": loc.transpose(0, 1).reshape(m * batch, dim),
               "log_var": log_var.transpose(0, 1).reshape(m * batch, dim)}
    tiled_x = x.unsqueeze(0).expand(m, *x.shape).reshape(m * batch, *x.shape[1:])
    tiled_noise = noise.repeat(1, m, 1)
    gaussian = DiagonalGaussian()
    elbos = elbo(model, gaussian, stacked, tiled_x, tiled_noise, space=space, prior=prior).reshape(m, batch)
    if m == 1:
        return elbos
    z = gaussian.sample(stacked, tiled_noise).reshape(-1, m, batch, dim)                        # [S, M, B, D]
    own = gaussian.log_prob(stacked, z.reshape(-1, m * batch, dim)).reshape(-1, m, batch)
    terms = [elbos[0]]
    for k in range(1, m):
        # Q_k: the first k components, their weights renormalized (Q_M's weights of components ≤ k share the
        # factor Π_{i>k} (1 − ε_i)), held fixed
        partial = {"loc": loc[:, :k].detach().flatten(1), "log_var": log_var[:, :k].detach().flatten(1),
                   "logits": log_pi[:, :k].detach()}
        kl = (own[:, k] - GaussianMixture(k).log_prob(partial, z[:, k])).mean(0)
        terms.append(elbos[k] + torch.clamp(kl, max=barrier))
    return torch.stack(terms)


class _ComponentTerms(Observer):
    """RME's component objectives in a training run (the engine's refinement path): λ_0 is the encoders' mixture
    with the components held fixed (:meth:`start`), and at the run's evaluation each component's −J_m trains its
    own encoder (:attr:`term`, a :meth:`~learned_inference.engine.TrainingLoss.parameter_term`)."""

    def __init__(self, method: RecursiveMixtureEncoder, x: Tensor) -> None:
        self.method, self.x = method, x
        self.params: Params | None = None
        self.term = x.new_zeros(())

    def start(self, x: Tensor) -> Params:
        """λ_0 with the components detached (the mixing weights keep their graph); keeps the full λ."""
        self.params = params = self.method.init(x)
        return {"loc": params["loc"].detach(), "log_var": params["log_var"].detach(), "logits": params["logits"]}

    def observe(self, record: StepRecord) -> None:
        method, x, params = self.method, self.x, self.params
        assert params is not None  # set by start() before the run's first evaluation
        active = method.active()
        prior = prior_moments(method.model, method.space) if method.analytic_kl else None
        noise = sample_noise(method.num_samples, x.shape[0], method.space.total_dim, dtype=x.dtype, device=x.device)
        objectives = component_objectives(method.model, params, x, noise, num_components=method.num_components,
                                          space=method.space, barrier=method.barrier, prior=prior)[:active]
        healthy = torch.isfinite(objectives.detach()).all(0)
        weights = [p for encoder in method.encoders[:active] for p in encoder.parameters()]
        self.term = TrainingLoss.parameter_term(objectives, healthy, weights)
        return None


class RecursiveMixtureEncoder(InferenceMethod):
    """Recursive mixture estimation (RME): an amortized Gaussian-mixture posterior (see the module docstring).

    ``forward(x).loss`` trains: component m's encoder on −J_m (:func:`component_objectives`), the mixing network
    and the model on the mixture's −ELBO with the components held fixed; its value is the batch-mean −L(Q_M).
    ``infer(x)`` evaluates all components in one pass; ``infer(x, num_steps=T)`` keeps λ (like
    :class:`~learned_inference.baselines.StandardEncoder`). The result's λ is a
    :class:`~learned_inference.mixture.GaussianMixture`'s, so a learned optimizer over that family refines it:
    ``IterativeInferenceOptimizer(model, latent_dim=D, family=GaussianMixture(M)).infer(x,
    init_params=rme.infer(x).params)``. Its components are diagonal Gaussians and it takes no ``family=``: for
    correlated components it would need a mixture of :class:`~learned_inference.low_rank.LowRankGaussian`, which is
    not a family of this library.

    Args:
        model: anything with ``log_joint(x, z)``.
        latent_dim: the size of z (one latent vector).
        num_components: M, one encoder each.
        barrier: C, the cap on KL(q_m ‖ Q_{m−1}) in J_m, in nats (0: every component trains on its own ELBO).
            Too small a C leaves q_m on a mode Q_{m−1} covers; see "Choosing C" in the module docstring.
        schedule: the training calls after which components 2, 3, … join (a non-decreasing sequence of M − 1
            ints; before that a component has weight ≈ 0 and does not train); None: all from the start.
        hidden_size: units per layer of the encoders and the mixing network.
        num_layers: hidden layers of each.
        num_samples: samples S per ELBO evaluation (the mixture's costs M·S model evaluations).
        analytic_kl: the components' ELBOs use the analytic KL when the model gives a Gaussian ``prior()``.
        on_nonfinite: ``"warn"`` (default) or ``"raise"`` for examples whose ELBO or λ-gradient is not finite.

    Example:
        >>> import torch
        >>> from learned_inference import DecoderModel
        >>> model = DecoderModel(torch.nn.Linear(2, 10), likelihood="bernoulli", latent_dim=2)
        >>> rme = RecursiveMixtureEncoder(model, latent_dim=2, num_components=2, schedule=(100,), hidden_size=8)
        >>> weights = rme.infer(torch.ones(3, 10)).params["logits"].exp()
        >>> bool((weights[:, 1] < 1e-3).all())             # component 2 joins after 100 training calls
        True
    """

    trained_steps: Tensor  # a buffer

    def __init__(
        self,
        model: LatentModel,
        *,
        latent_dim: int,
        num_components: int = 2,
        barrier: float = 1.0,
        schedule: Sequence[int] | None = None,
        hidden_size: int = 512,
        num_layers: int = 2,
        num_samples: int = 1,
        analytic_kl: bool = True,
        on_nonfinite: str = "warn",
    ) -> None:
        if not isinstance(latent_dim, int):
            raise ValueError(f"latent_dim must be an int (RME builds one mixture over one latent vector), got "
                             f"{latent_dim!r}")
        num_components = check_int("num_components", num_components, minimum=1)
        super().__init__(model, latent_dim=latent_dim, num_steps=0, family=GaussianMixture(num_components),
                         num_samples=num_samples, analytic_kl=analytic_kl, on_nonfinite=on_nonfinite)
        if not barrier >= 0:
            raise ValueError(f"barrier must be >= 0 nats, got {barrier!r}")
        self.num_components, self.barrier = num_components, float(barrier)
        if schedule is not None:
            schedule = [check_int("schedule entries", int(s), minimum=0) for s in schedule]
            if len(schedule) != num_components - 1 or schedule != sorted(schedule):
                raise ValueError(f"schedule must give, in non-decreasing order, the training call after which each of "
                                 f"components 2..{num_components} joins ({num_components - 1} ints), got {schedule!r}")
        self.schedule = None if schedule is None else tuple(schedule)
        self.encoders = nn.ModuleList(HighwayEncoder(latent_dim, hidden_size=hidden_size, num_layers=num_layers)
                                      for _ in range(num_components))
        self.mixing = (FamilyEncoder({"mixing": num_components - 1}, hidden_size=hidden_size, num_layers=num_layers)
                       if num_components > 1 else None)
        self.register_buffer("trained_steps", torch.zeros((), dtype=torch.long))

    def active(self) -> int:
        """The number of components in the mixture now (all of them without a schedule)."""
        if self.schedule is None:
            return self.num_components
        return 1 + sum(int(self.trained_steps) >= s for s in self.schedule)

    def init(self, x: Tensor) -> Params:
        """λ of Q_M from one pass over the M encoders and the mixing network (with their graphs)."""
        pairs = [encoder(x) for encoder in self.encoders]
        batch = x.shape[0]
        if self.mixing is None:
            logits = x.new_zeros(batch, 1)
        else:
            mixing = self.mixing(x)["mixing"]
            joined = torch.arange(2, self.num_components + 1, device=x.device) <= self.active()
            logits = recursive_log_weights(torch.where(joined, mixing, _INACTIVE))
        params = {"loc": torch.cat([loc for loc, _ in pairs], -1), "log_var": torch.cat([lv for _, lv in pairs], -1),
                  "logits": logits}
        return self.family.constrain(params)

    def step(self, context: StepContext, state: Any) -> tuple[Params, Any]:
        """No refinement: λ_{t+1} = λ_t."""
        return context.params, state

    def training_rule(self) -> Training:
        """The mixing network from −L_0 (the mixture's ELBO), the model from −L_T = −L_0."""
        return Training(step_weights=final_step, encoder_weight=1.0)

    def forward(
        self, x: Tensor, *, init_params: dict[str, Any] | None = None, noise: Tensor | None = None
    ) -> InferenceResult:
        """One amortized pass; with gradients enabled, ``result.loss`` trains as in the class docstring.

        Args:
            x: a batch ``[B, *event]``.
            init_params: an explicit λ (then nothing trains but the model, as for any method given λ_0).
            noise: the reparameterization noise of the mixture's ELBO, as in :meth:`infer`.
        """
        if not torch.is_grad_enabled() or init_params is not None:
            return super().forward(x, init_params=init_params, noise=noise)
        components = _ComponentTerms(self, x)
        # the mixing network and the model: the mixture's ELBO with the components held fixed (λ_0 = held)
        result = self._refine(x, 0, train=True, init_params=None, noise=noise, start=components.start,
                              observers=[components])
        self.trained_steps += 1
        return dataclasses.replace(result, loss=result.loss + components.term)

    def extra_repr(self) -> str:
        return (f"latent={self.space}, num_components={self.num_components}, barrier={self.barrier}, "
                f"schedule={self.schedule}, num_samples={self.num_samples}")
