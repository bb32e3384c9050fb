"""``IterativeInferenceOptimizer``: a learned optimizer for the approximate posteriors of any latent model.

At every step t the optimizer evaluates the ELBO and its gradient ∇_λ L_t at the current posterior parameters λ_t
(``torch.func``), encodes them (by default [α·log(|∇λL|+ε), sign(∇λL)], the data x and λ_t), and a small network
outputs the gated update (paper eq. 5 and 62):

    λ_{t+1} = g_t ⊙ λ_t + (1 − g_t) ⊙ f_t(∇_λ L_t, λ_t, x; φ).

Training (paper App. B.3): the update network's loss is the mean over steps of −L_t; the user's model learns from
−L_T at the final step. With a feed-forward network the per-step gradients for φ are computed as the steps run
(λ and the gradient inputs are detached between steps), so training memory does not grow with ``num_steps``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.nn.parameter import is_lazy

from learned_inference.encodings import DEFAULT_ENCODING, Encoding, EncodingInputs, make_encoding
from learned_inference.families import Family, Params
from learned_inference.inference import InferenceMethod, InferenceResult, check_int, detach
from learned_inference.model import LatentModel, LatentSpace
from learned_inference.networks import UpdateNetwork, make_network
from learned_inference.objectives import PriorMoments, elbo, elbo_and_grad, prior_moments
from learned_inference.updates import make_update

__all__ = ["InferenceResult", "IterativeInferenceOptimizer", "observation_errors"]


class _GradientInjection(torch.autograd.Function):
    """Returns a zero scalar whose backward hands precomputed gradients (scaled by the incoming one) to params."""

    @staticmethod
    def forward(ctx: Any, grads: Sequence[Tensor], *params: Tensor) -> Tensor:  # type: ignore[override]
        ctx.grads = grads
        return params[0].new_zeros(())

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        return (None, *(grad_output * g for g in ctx.grads))


def observation_errors(
    model: LatentModel, family: Family, params: Params, x: Tensor, noise: Tensor, *, space: LatentSpace,
    prior: PriorMoments,
) -> tuple[Tensor, Tensor]:
    """(εx, εz) = (x − E[x | z], z − μ_p), averaged over the samples (paper Sec. 4.1; variances dropped, B.1)."""
    z = family.sample(params, noise)
    mean_x = model.likelihood_mean(space.split(z)).mean(0)  # type: ignore[attr-defined]
    return x - mean_x, (z - prior[0].to(z)).mean(0)


def _full_precision(x: Tensor) -> Any:
    """Disables autocast (so the λ-gradient and the encodings are computed in x's own precision)."""
    return torch.autocast(device_type=x.device.type, enabled=False)


class _Trace:
    """What a run collects step by step: ELBOs, gradient norms, health masks and the update network's loss."""

    def __init__(self, *, batch: int, num_steps: int, x: Tensor) -> None:
        self.batch, self.num_steps = batch, num_steps
        self.elbos: list[Tensor] = []
        self.norms: list[Tensor] = []
        self.healthy: list[Tensor] = []
        self.phi: list[Tensor] = []
        self.phi_grads: list[Tensor] | None = None
        self.surrogate = x.new_zeros(())
        self.final_values: Tensor | None = None

    def record(self, values: Tensor, grads: Params) -> Tensor:
        """Stores step t's ELBO and gradient norm; returns the per-example mask of finite ELBO and gradient."""
        values = values.detach()
        healthy = torch.isfinite(values)
        for g in grads.values():
            healthy = healthy & torch.isfinite(g.detach()).all(-1)
        self.elbos.append(values)
        self.norms.append(torch.sqrt(sum(g.detach().square().sum(-1) for g in grads.values())))
        self.healthy.append(healthy)
        return healthy

    def add_phi_grads(self, grads: list[Tensor]) -> None:
        self.phi_grads = grads if self.phi_grads is None else [a + g for a, g in zip(self.phi_grads, grads,
                                                                                     strict=True)]

    def elbo(self) -> Tensor:
        return torch.stack(self.elbos)

    def unhealthy_examples(self) -> Tensor:
        """Indices of the examples whose ELBO or gradient was not finite at some step."""
        return (~torch.stack(self.healthy).all(0)).nonzero().flatten()

    def loss(self, final_loss: Tensor | None) -> Tensor:
        """The scalar loss: value = mean over steps 1..T (or step 0) of the healthy examples' −ELBO; gradient =
        the update network's accumulated step losses + the model's final-step loss + any surrogates."""
        elbo, healthy = self.elbo(), torch.stack(self.healthy)
        if self.num_steps > 0:
            elbo, healthy = elbo[1:], healthy[1:]
        value = -torch.where(healthy, elbo, 0.0).sum() / healthy.sum().clamp(min=1)
        graph_part = self.surrogate
        if final_loss is not None:
            graph_part = graph_part + final_loss
        if self.phi_grads is not None:
            graph_part = graph_part + _GradientInjection.apply(self.phi_grads, *self.phi)
        if not graph_part.requires_grad:
            return value
        return value + (graph_part - graph_part.detach())


class IterativeInferenceOptimizer(InferenceMethod):
    """A learned optimizer that refines approximate posteriors q_λ(z | x) of a latent model.

    Implements iterative amortized inference (Marino, Yue & Mandt 2018): λ_{t+1} = g ⊙ λ_t + (1 − g) ⊙ f(enc_t)
    (eq. 62), where enc_t encodes ∇_λ L_t (App. B.1), x and λ_t. The model is used, not owned: it is not a
    submodule, so ``parameters()`` and ``state_dict()`` hold the update network only.

    Args:
        model: anything with ``log_joint(x, z)`` (see :mod:`learned_inference.model`).
        latent_dim: the size of z, or a dict of sizes for several latent variables.
        num_steps: refinement steps T used by :meth:`forward` (and by :meth:`infer` unless overridden).
        family: ``"diagonal_gaussian"`` (default), ``"delta"``, or a :class:`~learned_inference.families.Family`.
        encoding: what the network sees: names or :class:`~learned_inference.encodings.Encoding` objects
            (default ``("gradient", "data", "params")``).
        update: ``"gated"`` (eq. 62, default) or ``"residual"``.
        network: ``"highway"`` (feed-forward, default), ``"lstm"``, ``"gru"``, or an
            :class:`~learned_inference.networks.UpdateNetwork`.
        hidden_size: units per layer of the built network.
        num_layers: hidden layers of the highway network.
        num_samples: reparameterized samples S per ELBO evaluation.
        init: ``"prior"`` (λ_0 = the prior, default) or ``"encoder"`` (λ_0 = ``model.encode(x)``).
        analytic_kl: use the analytic KL when the model gives ``log_likelihood`` and a Gaussian ``prior()``.
        backprop_through_steps: keep the graph across steps (backpropagation through time). Default: False for
            feed-forward networks (constant memory), True for recurrent ones.
        second_order: feed the network gradients that stay differentiable (∇λL with its graph), so training
            differentiates through them; needs ``backprop_through_steps``.
        on_nonfinite: what to do when some examples' ELBO or λ-gradient is not finite (e.g. an overflowing
            decoder): ``"warn"`` (default: those examples keep their λ and are left out of the loss, the others are
            unaffected, and a ``RuntimeWarning`` names them) or ``"raise"`` (``FloatingPointError``).

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
        family: str | Family = "diagonal_gaussian",
        encoding: str | Encoding | Sequence[str | Encoding] = DEFAULT_ENCODING,
        update: str = "gated",
        network: str | UpdateNetwork = "highway",
        hidden_size: int = 512,
        num_layers: int = 2,
        num_samples: int = 1,
        init: str = "prior",
        analytic_kl: bool = True,
        backprop_through_steps: bool | None = None,
        second_order: bool = False,
        on_nonfinite: str = "warn",
    ) -> None:
        super().__init__(
            model, latent_dim=latent_dim, num_steps=num_steps, family=family, num_samples=num_samples,
            analytic_kl=analytic_kl,
        )
        check_int("hidden_size", hidden_size, minimum=1)
        check_int("num_layers", num_layers, minimum=1)
        self.encoding = make_encoding(encoding)
        if init not in ("prior", "encoder"):
            raise ValueError(f"init must be 'prior' or 'encoder', got {init!r}")
        if init == "encoder" and not callable(getattr(model, "encode", None)):
            raise ValueError(f"init='encoder' needs model.encode(x) -> (loc, log_var); {type(model).__name__} has none")
        self.init = init
        if self.encoding.needs_errors:
            for method in ("likelihood_mean", "prior"):
                if not callable(getattr(model, method, None)):
                    raise ValueError(
                        f"the 'errors' encoding needs model.{method}(); {type(model).__name__} has none "
                        "(DecoderModel and VAEModel provide it), or use encoding=('gradient', 'data', 'params')"
                    )
        self.network = make_network(network, hidden_size=hidden_size, num_layers=num_layers)
        self.update = make_update(
            update, self.family.param_names, hidden_size=self.network.hidden_size, dim=self.space.total_dim
        )
        self.backprop_through_steps = (
            self.network.recurrent if backprop_through_steps is None else bool(backprop_through_steps)
        )
        if second_order and not self.backprop_through_steps:
            raise ValueError("second_order=True needs backprop_through_steps=True (gradients through the steps)")
        self.second_order = second_order
        if on_nonfinite not in ("warn", "raise"):
            raise ValueError(f"on_nonfinite must be 'warn' or 'raise', got {on_nonfinite!r}")
        self.on_nonfinite = on_nonfinite

    def forward(
        self, x: Tensor, *, init_params: Params | None = None, noise: Tensor | None = None
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

    def _check_inputs(self, x: Tensor, num_steps: int, noise: Tensor | None) -> None:
        super()._check_inputs(x, num_steps, noise)
        self._materialize(x)

    def _materialize(self, x: Tensor) -> None:
        """Sizes the lazy input layer from the first batch, even when that call runs no refinement step."""
        if not any(is_lazy(p) for p in self.parameters()):
            return
        params = self.family.initial_params(x.shape[0], self.space.total_dim, dtype=x.dtype, device=x.device)
        zeros = {name: torch.zeros_like(value) for name, value in params.items()}
        errors = (torch.zeros_like(x), params[self.family.param_names[0]]) if self.encoding.needs_errors else None
        with torch.no_grad():
            self.network(self.encoding(EncodingInputs(grads=zeros, params=params, x=x, errors=errors)))

    def _initial_params(self, x: Tensor, init_params: Params | None) -> Params:
        names = self.family.param_names
        if init_params is not None:
            return self._flatten(init_params)
        if self.init == "encoder":
            loc, log_var = self.model.encode(x)  # type: ignore[attr-defined]
            encoded = {"loc": self.space.merge(loc), "log_var": self.space.merge(log_var)}
            return self.family.constrain({name: encoded[name] for name in names})
        return self.family.initial_params(x.shape[0], self.space.total_dim, dtype=x.dtype, device=x.device)

    def _run(
        self, x: Tensor, num_steps: int, *, train: bool, init_params: Params | None, noise: Tensor | None
    ) -> InferenceResult:
        self._check_inputs(x, num_steps, noise)
        model, family, space = self.model, self.family, self.space
        prior = prior_moments(model, space)
        kl_prior = prior if self.analytic_kl else None
        bptt, second_order = self.backprop_through_steps, self.second_order
        params = self._initial_params(x, init_params)
        trace = _Trace(batch=x.shape[0], num_steps=num_steps, x=x)
        state = None
        for t in range(num_steps + 1):
            eps = self._noise(noise, t, x)
            final = t == num_steps
            lam = params if second_order else detach(params)
            # The λ-gradient (and so the encodings) stay in full precision under autocast.
            with torch.set_grad_enabled(train and (final or second_order)), _full_precision(x):
                values, grads = elbo_and_grad(model, family, lam, x, eps, space=space, prior=kl_prior)
            healthy = trace.record(values, grads)
            grads = {n: torch.where(healthy[:, None], g, 0.0) for n, g in grads.items()}
            if train and any(p.requires_grad for p in params.values()):
                self._learn_from_step(trace, t, params, grads, bptt=bptt)
            if final:
                trace.final_values = values
                break
            errors = None
            if self.encoding.needs_errors:
                with torch.no_grad(), _full_precision(x):
                    errors = observation_errors(model, family, lam, x, eps, space=space, prior=prior)
                    errors = tuple(torch.where(healthy.view(-1, *[1] * (e.dim() - 1)), e, 0.0) for e in errors)
            grad_inputs = grads if second_order else detach(grads)
            with torch.set_grad_enabled(train):
                base = params if bptt else lam
                with _full_precision(x):
                    features = self.encoding(EncodingInputs(grads=grad_inputs, params=base, x=x, errors=errors))
                hidden, state = self.network(features, state)
                updated = family.constrain(self.update(hidden, base))
                # Examples whose ELBO or gradient is not finite keep their λ (and teach nothing).
                params = {n: torch.where(healthy[:, None], v.to(base[n].dtype), base[n]) for n, v in updated.items()}

        final_loss = self._final_model_loss(trace, params, x, num_steps, noise, kl_prior) if train else None
        self._report_unhealthy(trace)
        loss = trace.loss(final_loss)
        public, posterior = self._public(params)
        return InferenceResult(params=public, posterior=posterior, elbo=trace.elbo(), loss=loss,
                               grad_norm=torch.stack(trace.norms))

    def _report_unhealthy(self, trace: _Trace) -> None:
        bad = trace.unhealthy_examples()
        if bad.numel() == 0:
            return
        shown = ", ".join(map(str, bad[:10].tolist())) + (", ..." if bad.numel() > 10 else "")
        message = (
            f"{bad.numel()} of {trace.batch} examples had a non-finite ELBO or λ-gradient (examples {shown}); their "
            "λ was kept at its last finite value and they were left out of the loss. Their entries in "
            "result.elbo are not finite. Check the model for overflow (e.g. unbounded decoder outputs)."
        )
        if self.on_nonfinite == "raise":
            raise FloatingPointError(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)

    def _learn_from_step(self, trace: _Trace, t: int, params: Params, grads: Params, *, bptt: bool) -> None:
        """Adds step t's share of the update network's loss: d(−L_t)/dλ_t = −∇λL_t, as an immediate VJP
        (feed-forward: the graph of λ_t is freed now) or as a surrogate ⟨−∇λL_t, λ_t⟩ kept in the graph (BPTT,
        and a trainable encoder at t = 0)."""
        weight = 1.0 / (trace.batch * trace.num_steps) if t > 0 else 1.0 / trace.batch
        if t > 0 and not bptt:
            trace.phi = [p for p in self.parameters() if p.requires_grad]
            step_grads = torch.autograd.grad(
                [params[n] for n in grads], trace.phi, grad_outputs=[-weight * g.detach() for g in grads.values()],
                allow_unused=True,
            )
            trace.add_phi_grads([torch.zeros_like(p) if g is None else g for p, g in zip(trace.phi, step_grads,
                                                                                       strict=True)])
        else:
            trace.surrogate = trace.surrogate - weight * sum((g.detach() * params[n]).sum() for n, g in grads.items())

    def _final_model_loss(
        self, trace: _Trace, params: Params, x: Tensor, num_steps: int, noise: Tensor | None,
        prior: PriorMoments | None,
    ) -> Tensor | None:
        """−L_T averaged over the healthy examples, with the graph to the model's parameters."""
        values = trace.final_values
        if values is None or not values.requires_grad:
            return None
        healthy = trace.healthy[-1]
        if bool(healthy.all()):
            return -values.mean()
        if not bool(healthy.any()):
            return None
        # Re-evaluate on the healthy rows only: a non-finite row would turn 0 · inf into NaN in the backward pass.
        eps = self._noise(noise, num_steps, x)[:, healthy]
        with _full_precision(x):
            kept = elbo(self.model, self.family, {n: v.detach()[healthy] for n, v in params.items()}, x[healthy],
                        eps, space=self.space, prior=prior)
        return -kept.mean()

    def extra_repr(self) -> str:
        return (
            f"latent={self.space}, num_steps={self.num_steps}, family={self.family}, encoding={self.encoding}, "
            f"num_samples={self.num_samples}, init={self.init!r}, backprop_through_steps={self.backprop_through_steps}"
        )
