"""The interface every inference method shares: ``forward(x)`` trains, ``infer(x, num_steps=...)`` evaluates.

:class:`InferenceMethod` holds what the learned optimizer and the baselines have in common: the user's model (a
plain reference, not a submodule), the latent layout, the posterior family, input validation, the conversion
between the public form of λ (per latent variable) and the flat form inference works on, and the
reparameterization noise. Subclasses implement ``_run``. All return an :class:`InferenceResult`, so a benchmark
swaps methods with one argument.

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

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributions import Distribution

from learned_inference.families import Family, Params, make_family
from learned_inference.model import LatentModel, LatentSpace, check_log_joint, check_model
from learned_inference.objectives import sample_noise

__all__ = ["InferenceMethod", "InferenceResult", "check_int", "detach"]


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
    """

    params: dict[str, Any]
    posterior: Distribution | dict[str, Distribution]
    elbo: Tensor
    loss: Tensor
    grad_norm: Tensor


def check_int(name: str, value: object, *, minimum: int) -> int:
    """Returns ``value`` if it is an int >= ``minimum``, else raises a ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def detach(params: Params) -> Params:
    """λ with every tensor detached from the graph."""
    return {name: value.detach() for name, value in params.items()}


class InferenceMethod(nn.Module):
    """Base class of inference methods over a user's latent model.

    Args:
        model: anything with ``log_joint(x, z)`` (see :mod:`learned_inference.model`).
        latent_dim: the size of z, or a dict of sizes for several latent variables.
        num_steps: steps T used by :meth:`forward` (and by :meth:`infer` unless overridden).
        family: ``"diagonal_gaussian"``, ``"delta"``, or a :class:`~learned_inference.families.Family`.
        num_samples: reparameterized samples S per ELBO evaluation.
        analytic_kl: use the analytic KL when the model gives ``log_likelihood`` and a Gaussian ``prior()``.
    """

    def __init__(
        self,
        model: LatentModel,
        *,
        latent_dim: int | dict[str, int],
        num_steps: int,
        family: str | Family,
        num_samples: int,
        analytic_kl: bool,
    ) -> None:
        super().__init__()
        check_model(model)
        # The model is the user's: keep a plain reference, not a submodule.
        object.__setattr__(self, "_model", model)
        self.space = LatentSpace(latent_dim)
        self.num_steps = check_int("num_steps", num_steps, minimum=0)
        self.num_samples = check_int("num_samples", num_samples, minimum=1)
        self.family = make_family(family)
        self.analytic_kl = analytic_kl
        self._model_checked = False

    @property
    def model(self) -> LatentModel:
        """The user's model (not a submodule)."""
        return self._model  # type: ignore[no-any-return]

    def forward(
        self, x: Tensor, *, init_params: Params | None = None, noise: Tensor | None = None
    ) -> InferenceResult:
        """Runs ``num_steps`` steps and returns a result whose ``loss`` trains.

        Args:
            x: a batch ``[B, *event]`` of floating-point data.
            init_params: an explicit λ_0 (a dict like ``result.params``) instead of the method's own start.
            noise: the reparameterization noise, as in :meth:`infer`.
        """
        return self._run(x, self.num_steps, train=torch.is_grad_enabled(), init_params=init_params, noise=noise)

    @torch.no_grad()
    def infer(
        self,
        x: Tensor,
        *,
        num_steps: int | None = None,
        init_params: Params | None = None,
        noise: Tensor | None = None,
    ) -> InferenceResult:
        """Test-time inference: any number of steps, no training graph.

        Args:
            x: a batch ``[B, *event]``.
            num_steps: steps T (default: ``num_steps`` given at construction).
            init_params: an explicit λ_0 (a dict like ``result.params``) instead of the method's own start.
            noise: the reparameterization noise for every step, ``[num_steps + 1, S, B, D]`` (common random
                numbers for comparisons); drawn from the global generator when omitted.
        """
        steps = self.num_steps if num_steps is None else check_int("num_steps", num_steps, minimum=0)
        return self._run(x, steps, train=False, init_params=init_params, noise=noise)

    def _run(
        self, x: Tensor, num_steps: int, *, train: bool, init_params: Params | None, noise: Tensor | None
    ) -> InferenceResult:
        raise NotImplementedError

    def _check_inputs(self, x: Tensor, num_steps: int, noise: Tensor | None) -> None:
        """Validates x and noise, and on the first call the shape of ``model.log_joint``'s output."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}; convert it with x.float()")
        if x.dim() < 2 or x.shape[0] == 0:
            raise ValueError(f"x must be a non-empty batch of shape [B, *event] with B >= 1, got {list(x.shape)}")
        if not bool(torch.isfinite(x).all()):
            bad = (~torch.isfinite(x)).flatten(1).any(1).nonzero().flatten()
            raise ValueError(
                f"x contains NaN or infinite values in {bad.numel()} example(s) (first: {bad[:5].tolist()}); "
                "clean or drop them before inference"
            )
        self._check_placement(x)
        if noise is not None:
            shape = [num_steps + 1, self.num_samples, x.shape[0], self.space.total_dim]
            if list(noise.shape) != shape:
                raise ValueError(f"noise must have shape {shape} ([num_steps + 1, S, B, D]), got {list(noise.shape)}")
        if not self._model_checked:
            check_log_joint(self.model, x, self.space, num_samples=self.num_samples)
            self._model_checked = True

    def _check_placement(self, x: Tensor) -> None:
        """x, the model and this method's parameters share device and dtype (nothing is moved silently)."""
        for owner, module in (("the model", self.model), ("the inference method", self)):
            parameters = module.parameters() if isinstance(module, nn.Module) else ()
            first = next((p for p in parameters if p.is_floating_point()), None)
            if first is None:
                continue
            if first.device != x.device:
                raise ValueError(f"x is on {x.device} but {owner}'s parameters are on {first.device}; move one of "
                                 f"them (e.g. x.to({str(first.device)!r}))")
            if first.dtype != x.dtype:
                what = "model" if owner == "the model" else "inference"
                raise ValueError(f"x has dtype {x.dtype} but {owner}'s parameters are {first.dtype}; convert one "
                                 f"of them (e.g. {what}.to({x.dtype}) or x.to({first.dtype}))")

    def _flatten(self, params: dict[str, Any]) -> Params:
        """The public form of λ (per variable for several latents) → the flat internal form, validated."""
        names, space = self.family.param_names, self.space
        if space.names is not None:
            params = {p: space.merge({v: params[v][p] for v in space.names}) for p in names}
        if set(params) != set(names):
            raise ValueError(f"init_params must have entries {list(names)}, got {sorted(params)}")
        return {name: params[name] for name in names}

    def _public(self, params: Params) -> tuple[dict[str, Any], Distribution | dict[str, Distribution]]:
        """The flat internal λ → (public params, posterior), detached."""
        params = detach(params)
        if self.space.names is None:
            return params, self.family.distribution(params)
        pieces = {p: self.space.split(value) for p, value in params.items()}
        per_var = {v: {p: pieces[p][v] for p in params} for v in self.space.names}  # type: ignore[index]
        return per_var, {v: self.family.distribution(per_var[v]) for v in self.space.names}

    def _noise(self, noise: Tensor | None, t: int, x: Tensor) -> Tensor:
        """The noise ε of step t, ``[S, B, D]`` (``[1, B, D]`` zeros for point-estimate families)."""
        if noise is not None:
            return noise[t]
        if not self.family.stochastic:
            return x.new_zeros(1, x.shape[0], self.space.total_dim)
        return sample_noise(self.num_samples, x.shape[0], self.space.total_dim, dtype=x.dtype, device=x.device)
