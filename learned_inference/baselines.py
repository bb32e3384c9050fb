"""Baselines on the interface of :class:`~learned_inference.IterativeInferenceOptimizer`.

Every method here is "an initial estimate λ_0, then T gradient steps on the per-example ELBO":

* :class:`StandardEncoder` — the plain VAE: λ_0 = encoder(x) and no refinement (λ_t = λ_0 for every t).
* :class:`GradientEStep` — the expectation step of variational EM: any element-wise ``torch.optim`` optimizer
  (SGD, SGD with momentum, RMSprop, Adam, ...) ascends L over each example's λ, from the prior or an encoder.
* :class:`SemiAmortized` — an encoder's guess refined by K steps of momentum SGD with gradient clipping
  (Kim et al. 2018); the encoder learns either through the unrolled steps (Kim et al.) or from its own
  ELBO with the refined λ stop-gradient (Krishnan et al. 2018).

All return an :class:`~learned_inference.InferenceResult` from ``infer(x, num_steps=...)`` (``elbo[0]`` the
estimate at λ_0) and train through ``forward(x).loss``:

    loss = −1/B Σ_b L(sg[λ_T,b]; x_b)  −  1/B Σ_b λ̄_b · λ_0,b,      λ̄ = ∇_{λ_0} L(λ_0)  or  dL(λ_T)/dλ_0,

so the user's model learns from the final λ_T (the M-step) and an encoder from λ̄ (its own ELBO with
stop-gradient refinement, or the ELBO after the steps when differentiating through them). The λ-gradients are
per example (:func:`~learned_inference.objectives.elbo_and_grad` of the summed ELBO) and gradient clipping is
per example, so no example's result depends on another's.

Example:
    >>> import torch
    >>> from learned_inference import DecoderModel, GradientEStep
    >>> model = DecoderModel(torch.nn.Linear(3, 12), likelihood="bernoulli", latent_dim=3)
    >>> e_step = GradientEStep(model, latent_dim=3, optimizer=torch.optim.Adam, lr=0.1, num_steps=50)
    >>> result = e_step.infer(torch.bernoulli(torch.full((5, 12), 0.5)))
    >>> result.elbo.shape, result.params["loc"].shape
    (torch.Size([51, 5]), torch.Size([5, 3]))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, cast

import torch
from torch import Tensor

from learned_inference.context import StepContext
from learned_inference.engine import Training, final_step
from learned_inference.families import Family, Params
from learned_inference.inference import InferenceMethod, InferenceResult
from learned_inference.model import LatentModel
from learned_inference.transforms import (
    GradientTransform,
    adam,
    apply_updates,
    chain,
    clip_by_example_norm,
    rmsprop,
    scale,
    sgd,
    torch_optimizer,
)

#: torch.optim classes run as pure transforms, with the options those take (others go through torch.optim)
_PURE_OPTIMIZERS: dict[Any, tuple[Callable[..., GradientTransform], set[str]]] = {
    torch.optim.SGD: (sgd, {"momentum"}),
    torch.optim.Adam: (adam, {"betas", "eps"}),
    torch.optim.RMSprop: (rmsprop, {"alpha", "eps"}),
}

__all__ = ["GradientEStep", "SemiAmortized", "StandardEncoder"]

Encoder = Callable[[Tensor], tuple[Any, Any]]


class _GradientRefinement(InferenceMethod):
    """The shared machinery: λ_0 (prior, or an encoder), then a gradient transform of ∇_λ L_t
    (:mod:`learned_inference.transforms`; clipped per example first when ``max_grad_norm`` is set)."""

    #: whether :meth:`forward` backpropagates through the steps (needs a differentiable ``_ascend``)
    backprop_through_steps: bool = False

    def __init__(
        self,
        model: LatentModel,
        *,
        latent_dim: int | dict[str, int],
        num_steps: int,
        init: str | Encoder,
        allow_prior: bool,
        family: str | Family | Mapping[str, str | Family],
        num_samples: int,
        analytic_kl: bool,
        max_grad_norm: float | None,
        hidden_size: int,
        num_layers: int,
        on_nonfinite: str,
    ) -> None:
        super().__init__(
            model, latent_dim=latent_dim, num_steps=num_steps, family=family, num_samples=num_samples,
            analytic_kl=analytic_kl, on_nonfinite=on_nonfinite,
        )
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be a positive float or None, got {max_grad_norm!r}")
        self.max_grad_norm = max_grad_norm
        self._use_initial(init, allow_prior=allow_prior, hidden_size=hidden_size, num_layers=num_layers)

    def forward(
        self, x: Tensor, *, init_params: dict[str, Any] | None = None, noise: Tensor | None = None
    ) -> InferenceResult:
        """Runs ``num_steps`` steps and returns a result whose ``loss`` trains the model and the encoder.

        ``result.loss`` has the value of the batch-mean −L at λ_T; its gradient reaches the user's model
        through L(sg[λ_T]) and the encoder (if any) through λ̄ · λ_0 (see the module docstring).

        Args:
            x: a batch ``[B, *event]`` of floating-point data.
            init_params: an explicit λ_0 (a dict like ``result.params``) instead of the prior or encoder.
            noise: the reparameterization noise, as in :meth:`infer`.
        """
        return super().forward(x, init_params=init_params, noise=noise)

    def transform(self) -> GradientTransform:
        """The step's gradient transform (the subclass's ascent, after per-example clipping when set)."""
        ascent = self._ascent()
        return ascent if self.max_grad_norm is None else chain(clip_by_example_norm(self.max_grad_norm), ascent)

    def _ascent(self) -> GradientTransform:
        raise NotImplementedError

    def step(self, context: StepContext, state: Any) -> tuple[Params, Any]:
        """λ_{t+1} = λ_t + Δ_t, Δ_t the transform of ∇_λ L_t; ``state`` starts as None."""
        transform = self.transform()
        if state is None:
            state = transform.init(context.params)
        updates, state = transform.update(context.grads, state, context.params)
        return apply_updates(context.params, updates), state

    def training_rule(self) -> Training:
        """The model from −L_T; an encoder from −L_0, or from −L_T through the steps."""
        through = self.backprop_through_steps
        return Training(step_weights=final_step, encoder_weight=0.0 if through else 1.0,
                        backprop_through_steps=through, second_order=through)

    def extra_repr(self) -> str:
        return (
            f"latent={self.space}, num_steps={self.num_steps}, family={self.family}, "
            f"num_samples={self.num_samples}, init={self.initial.label!r}, max_grad_norm={self.max_grad_norm}"
        )


class StandardEncoder(_GradientRefinement):
    """The standard (plain VAE) inference model: one amortized pass λ = encoder(x), no refinement.

    ``infer(x, num_steps=T)`` keeps λ_t = λ_0, so ``result.elbo`` is ``[T + 1, B]`` like every other method's
    (row t evaluated with ``noise[t]``): a flat line on an ELBO-versus-steps plot. ``forward(x).loss`` is the
    VAE loss, the batch-mean −L(λ_0), and trains the encoder and the model.

    Args:
        model: anything with ``log_joint(x, z)``.
        latent_dim: the size of z, or a dict of sizes for several latent variables.
        init: the encoder: ``"encoder"`` (``model.encode``, default), ``"highway"`` (a built
            :class:`~learned_inference.networks.HighwayEncoder`, a submodule), or any callable/module
            x → (loc, log_var).
        family: ``"diagonal_gaussian"`` (default), ``"delta"``, ``"low_rank"``, or a
            :class:`~learned_inference.families.Family`.
        num_samples: reparameterized samples S per ELBO evaluation.
        analytic_kl: use the analytic KL when the model gives ``log_likelihood`` and a Gaussian ``prior()``.
        hidden_size: units per layer of a built highway encoder.
        num_layers: hidden layers of a built highway encoder.
        on_nonfinite: ``"warn"`` (default) or ``"raise"`` for examples whose ELBO or λ-gradient is not finite.

    Example:
        >>> import torch
        >>> from learned_inference import DecoderModel, StandardEncoder
        >>> model = DecoderModel(torch.nn.Linear(2, 10), likelihood="bernoulli", latent_dim=2)
        >>> vae = StandardEncoder(model, latent_dim=2, init="highway", hidden_size=16)
        >>> optim = torch.optim.Adam([*model.parameters(), *vae.parameters()], lr=1e-3)
        >>> x = torch.bernoulli(torch.full((4, 10), 0.5))
        >>> vae(x).loss.backward(); optim.step()
        >>> vae.infer(x, num_steps=3).elbo.shape
        torch.Size([4, 4])
    """

    def __init__(
        self,
        model: LatentModel,
        *,
        latent_dim: int | dict[str, int],
        init: str | Encoder = "encoder",
        family: str | Family = "diagonal_gaussian",
        num_samples: int = 1,
        analytic_kl: bool = True,
        hidden_size: int = 512,
        num_layers: int = 2,
        on_nonfinite: str = "warn",
    ) -> None:
        super().__init__(
            model, latent_dim=latent_dim, num_steps=0, init=init, allow_prior=False, family=family,
            num_samples=num_samples, analytic_kl=analytic_kl, max_grad_norm=None, hidden_size=hidden_size,
            num_layers=num_layers, on_nonfinite=on_nonfinite,
        )

    def _ascent(self) -> GradientTransform:
        """No refinement: Δ = 0 at every step (the encoder's λ is the answer)."""
        return scale(0.0)


class GradientEStep(_GradientRefinement):
    """Variational EM's expectation step: a ``torch.optim`` optimizer ascends each example's ELBO over λ.

    At step t the optimizer gets the gradient −∇_λ L_t of every example's own ELBO (optionally clipped per
    example) on the ``[B, D]`` tensors of λ, then λ is kept in the family's safe range. Use element-wise
    optimizers (SGD, SGD with ``momentum``, RMSprop, Adam, Adagrad, ...): their update of one example's λ
    depends only on that example's gradients. ``forward(x).loss`` trains the model on λ_T (the M-step) and,
    with an encoder for λ_0, the encoder on its own ELBO L(λ_0) (Krishnan et al. 2018).

    Args:
        model: anything with ``log_joint(x, z)``.
        latent_dim: the size of z, or a dict of sizes for several latent variables.
        optimizer: a ``torch.optim.Optimizer`` class (default ``torch.optim.Adam``), or a
            :class:`~learned_inference.transforms.GradientTransform` (which carries its own step size: ``lr`` and
            ``optimizer_options`` are then not used).
        lr: its learning rate.
        num_steps: steps T (default for :meth:`forward` and :meth:`infer`).
        optimizer_options: further keyword arguments for ``optimizer`` (e.g. ``{"momentum": 0.9}``).
        init: λ_0: ``"prior"`` (default), ``"encoder"`` (``model.encode``), ``"highway"`` (a built
            :class:`~learned_inference.networks.HighwayEncoder`), or a callable x → (loc, log_var).
        max_grad_norm: clip each example's λ-gradient to this norm (None: no clipping).
        family: ``"diagonal_gaussian"`` (default), ``"delta"``, ``"low_rank"``, or a
            :class:`~learned_inference.families.Family`.
        num_samples: reparameterized samples S per ELBO evaluation.
        analytic_kl: use the analytic KL when the model gives ``log_likelihood`` and a Gaussian ``prior()``.
        hidden_size: units per layer of a built highway encoder.
        num_layers: hidden layers of a built highway encoder.
        on_nonfinite: ``"warn"`` (default) or ``"raise"`` for examples whose ELBO or λ-gradient is not finite.

    Example:
        >>> import torch
        >>> from learned_inference import GradientEStep
        >>> from learned_inference.zoo import ProbabilisticPCA
        >>> _ = torch.manual_seed(0)
        >>> model = ProbabilisticPCA.random(data_dim=5, latent_dim=2)
        >>> e_step = GradientEStep(model, latent_dim=2, optimizer=torch.optim.SGD, lr=0.01, num_steps=300,
        ...                        optimizer_options={"momentum": 0.5})
        >>> x = model.sample(3)
        >>> result = e_step.infer(x)
        >>> gap_before = model.log_marginal(x) - model.exact_elbo(x, torch.zeros(3, 2), torch.zeros(3, 2))
        >>> gap_after = model.log_marginal(x) - model.exact_elbo(x, *result.params.values())
        >>> bool((gap_after < 0.1 * gap_before).all())
        True
    """

    def __init__(
        self,
        model: LatentModel,
        *,
        latent_dim: int | dict[str, int],
        optimizer: type[torch.optim.Optimizer] | GradientTransform = torch.optim.Adam,
        lr: float = 0.1,
        num_steps: int = 100,
        optimizer_options: Mapping[str, Any] | None = None,
        init: str | Encoder = "prior",
        max_grad_norm: float | None = None,
        family: str | Family = "diagonal_gaussian",
        num_samples: int = 1,
        analytic_kl: bool = True,
        hidden_size: int = 512,
        num_layers: int = 2,
        on_nonfinite: str = "warn",
    ) -> None:
        super().__init__(
            model, latent_dim=latent_dim, num_steps=num_steps, init=init, allow_prior=True, family=family,
            num_samples=num_samples, analytic_kl=analytic_kl, max_grad_norm=max_grad_norm,
            hidden_size=hidden_size, num_layers=num_layers, on_nonfinite=on_nonfinite,
        )
        self.optimizer = optimizer
        self.lr = lr
        self.optimizer_options = dict(optimizer_options or {})
        if isinstance(optimizer, GradientTransform):
            return
        if not (isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer)):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer class or a GradientTransform (e.g. "
                            f"learned_inference.transforms.adam(0.1)), got {optimizer!r}")
        if issubclass(optimizer, torch.optim.LBFGS):
            raise ValueError("optimizer must update element-wise, without a closure; LBFGS couples examples")
        try:  # validate lr and the options now rather than at the first step
            self._build_optimizer([torch.zeros(1, requires_grad=True)])
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"lr={lr!r} and optimizer_options={self.optimizer_options!r} are not valid for "
                f"{optimizer.__name__}: {error}"
            ) from error

    def _build_optimizer(self, tensors: list[Tensor]) -> torch.optim.Optimizer:
        # torch.optim.Optimizer's own signature has no lr; its subclasses take it
        return self._optimizer_class()(tensors, lr=self.lr, **self.optimizer_options)

    def _optimizer_class(self) -> Callable[..., torch.optim.Optimizer]:
        return cast(Callable[..., torch.optim.Optimizer], self.optimizer)

    def _ascent(self) -> GradientTransform:
        """SGD (with momentum), Adam and RMSprop as pure transforms with torch.optim's arithmetic; any other
        element-wise torch.optim optimizer (or those with options the pure ones lack) through its own step."""
        if isinstance(self.optimizer, GradientTransform):
            return self.optimizer
        pure = _PURE_OPTIMIZERS.get(self.optimizer)
        if pure is not None:
            build, accepted = pure
            if set(self.optimizer_options) <= accepted:
                return build(self.lr, **self.optimizer_options)
        return torch_optimizer(self._optimizer_class(), lr=self.lr, options=self.optimizer_options)

    def extra_repr(self) -> str:
        name = "GradientTransform" if isinstance(self.optimizer, GradientTransform) else self.optimizer.__name__
        return f"optimizer={name}, lr={self.lr}, {super().extra_repr()}"


class SemiAmortized(_GradientRefinement):
    """Semi-amortized inference: an encoder's guess refined by K steps of momentum SGD with clipping.

    λ_0 = encoder(x), then K steps of momentum SGD (:func:`~learned_inference.transforms.sgd`) on per-example
    clipped gradients (Kim et al. 2018, "Semi-Amortized Variational Autoencoders"): the transform
    ``chain(clip_by_example_norm(max_grad_norm), sgd(lr, momentum=momentum))``. Training, ``forward(x).loss``:
    the model learns from the refined λ_K (stop-gradient); the encoder learns

    * with ``backprop_through_steps=True`` (Kim et al., default) from dL(λ_K)/dλ_0, differentiating through
      the K steps (second-order: Hessian-vector products of the ELBO; memory grows with K);
    * with ``backprop_through_steps=False`` (Krishnan et al. 2018) from its own ELBO L(λ_0).

    Args:
        model: anything with ``log_joint(x, z)``.
        latent_dim: the size of z, or a dict of sizes for several latent variables.
        num_steps: refinement steps K.
        lr: the step size η.
        momentum: the momentum μ.
        max_grad_norm: clip each example's λ-gradient to this norm (None: no clipping).
        backprop_through_steps: train the encoder through the steps (see above).
        init: the encoder: ``"encoder"`` (``model.encode``, default), ``"highway"`` (a built
            :class:`~learned_inference.networks.HighwayEncoder`), or a callable x → (loc, log_var).
        family: ``"diagonal_gaussian"`` (default), ``"delta"``, ``"low_rank"``, or a
            :class:`~learned_inference.families.Family`.
        num_samples: reparameterized samples S per ELBO evaluation.
        analytic_kl: use the analytic KL when the model gives ``log_likelihood`` and a Gaussian ``prior()``.
        hidden_size: units per layer of a built highway encoder.
        num_layers: hidden layers of a built highway encoder.
        on_nonfinite: ``"warn"`` (default) or ``"raise"`` for examples whose ELBO or λ-gradient is not finite.

    Example:
        >>> import torch
        >>> from learned_inference import DecoderModel, SemiAmortized
        >>> model = DecoderModel(torch.nn.Linear(2, 10), likelihood="bernoulli", latent_dim=2)
        >>> sa = SemiAmortized(model, latent_dim=2, init="highway", num_steps=3, hidden_size=16)
        >>> result = sa(torch.bernoulli(torch.full((4, 10), 0.5)))
        >>> result.loss.backward()
        >>> result.elbo.shape, sa.encoder.loc.weight.grad is not None
        (torch.Size([4, 4]), True)
    """

    def __init__(
        self,
        model: LatentModel,
        *,
        latent_dim: int | dict[str, int],
        num_steps: int = 10,
        lr: float = 0.1,
        momentum: float = 0.5,
        max_grad_norm: float | None = 5.0,
        backprop_through_steps: bool = True,
        init: str | Encoder = "encoder",
        family: str | Family = "diagonal_gaussian",
        num_samples: int = 1,
        analytic_kl: bool = True,
        hidden_size: int = 512,
        num_layers: int = 2,
        on_nonfinite: str = "warn",
    ) -> None:
        super().__init__(
            model, latent_dim=latent_dim, num_steps=num_steps, init=init, allow_prior=False, family=family,
            num_samples=num_samples, analytic_kl=analytic_kl, max_grad_norm=max_grad_norm,
            hidden_size=hidden_size, num_layers=num_layers, on_nonfinite=on_nonfinite,
        )
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        self.lr, self.momentum = float(lr), float(momentum)
        self.backprop_through_steps = bool(backprop_through_steps)

    def _ascent(self) -> GradientTransform:
        """Momentum gradient ascent (differentiable: training may backpropagate through the steps)."""
        return sgd(self.lr, momentum=self.momentum)

    def extra_repr(self) -> str:
        return (
            f"lr={self.lr}, momentum={self.momentum}, backprop_through_steps={self.backprop_through_steps}, "
            f"{super().extra_repr()}"
        )
