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
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributions import Distribution
from torch.nn.parameter import is_lazy

from learned_inference.block_family import BlockFamily
from learned_inference.encodings import DEFAULT_ENCODING, Encoding, EncodingInputs, make_encoding
from learned_inference.families import Family, Params
from learned_inference.hierarchical import OBSERVED, check_hierarchical_model, precision_weighted_errors
from learned_inference.inference import InferenceMethod, InferenceResult, check_int, detach
from learned_inference.model import LatentModel, LatentSpace
from learned_inference.networks import State, UpdateNetwork, make_network
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


def _mask_rows(healthy: Tensor, value: Tensor) -> Tensor:
    """``value`` with the rows of unhealthy examples set to zero."""
    return torch.where(healthy.view(-1, *[1] * (value.dim() - 1)), value, 0.0)


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
        self.final_noise: Tensor | None = None

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
        latent_dim: the size of z, or a dict of sizes for several latent variables (listed bottom-up for a
            hierarchy: ``{"z1": 64, "z2": 32}``, z1 next to the data).
        num_steps: refinement steps T used by :meth:`forward` (and by :meth:`infer` unless overridden).
        family: ``"diagonal_gaussian"`` (default), ``"delta"``, a :class:`~learned_inference.families.Family`,
            or for several latent variables a dict of them, one per variable (a
            :class:`~learned_inference.block_family.BlockFamily`; the families must share their parameter names).
        encoding: what the network sees: names or :class:`~learned_inference.encodings.Encoding` objects
            (default ``("gradient", "data", "params")``; ``"hierarchical_errors"`` adds the bottom-up and
            top-down errors of a model with ``conditionals(z)``, see :mod:`learned_inference.hierarchical`).
        update: ``"gated"`` (eq. 62, default) or ``"residual"``.
        network: ``"highway"`` (feed-forward, default), ``"lstm"``, ``"gru"``, or an
            :class:`~learned_inference.networks.UpdateNetwork` (with ``per_variable_networks``: a name, or a dict
            of them keyed by variable).
        per_variable_networks: one update network (and update heads) per latent variable instead of one over all
            of λ. Variable v's network sees the encoding of its own gradient and λ block, the data, and for
            ``"hierarchical_errors"`` its bottom-up and top-down errors; it updates only v's block.
        hidden_size: units per layer of the built network (with ``per_variable_networks``: an int, or a dict
            of them keyed by variable).
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
        network: str | UpdateNetwork | Mapping[str, str | UpdateNetwork] = "highway",
        per_variable_networks: bool = False,
        hidden_size: int | Mapping[str, int] = 512,
        num_layers: int = 2,
        num_samples: int = 1,
        init: str = "prior",
        analytic_kl: bool = True,
        backprop_through_steps: bool | None = None,
        second_order: bool = False,
        on_nonfinite: str = "warn",
    ) -> None:
        if isinstance(family, Mapping):
            family = BlockFamily(family, space=LatentSpace(latent_dim))
        super().__init__(
            model, latent_dim=latent_dim, num_steps=num_steps, family=family, num_samples=num_samples,
            analytic_kl=analytic_kl,
        )
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
        if self.encoding.needs_level_errors:
            check_hierarchical_model(model, self.space)
        self.per_variable_networks = bool(per_variable_networks)
        self.network, self.update, recurrent = self._build_networks(
            network, update, hidden_size=hidden_size, num_layers=num_layers
        )
        self.backprop_through_steps = recurrent if backprop_through_steps is None else bool(backprop_through_steps)
        if second_order and not self.backprop_through_steps:
            raise ValueError("second_order=True needs backprop_through_steps=True (gradients through the steps)")
        self.second_order = second_order
        if on_nonfinite not in ("warn", "raise"):
            raise ValueError(f"on_nonfinite must be 'warn' or 'raise', got {on_nonfinite!r}")
        self.on_nonfinite = on_nonfinite

    def _build_networks(
        self, network: str | UpdateNetwork | Mapping[str, str | UpdateNetwork], update: str, *,
        hidden_size: int | Mapping[str, int], num_layers: int,
    ) -> tuple[nn.Module, nn.Module, bool]:
        """(network, update heads, recurrent): one of each over all of λ, or ``nn.ModuleDict`` s per variable."""
        names = self.family.param_names
        if not self.per_variable_networks:
            if isinstance(hidden_size, Mapping) or isinstance(network, Mapping):
                raise ValueError("hidden_size and network may be dicts only with per_variable_networks=True")
            net = make_network(network, hidden_size=check_int("hidden_size", hidden_size, minimum=1),
                               num_layers=num_layers)
            heads = make_update(update, names, hidden_size=net.hidden_size, dim=self.space.total_dim)
            return net, heads, net.recurrent
        variables = self.space.names
        if variables is None:
            raise ValueError("per_variable_networks=True needs latent_dim as a dict of sizes (several variables)")
        if isinstance(network, UpdateNetwork):
            raise ValueError("with per_variable_networks=True, network must be a name or a dict of UpdateNetwork "
                             "instances keyed by variable (one instance cannot serve several variables)")
        per_var = {"hidden_size": hidden_size, "network": network}
        for option, value in per_var.items():
            if isinstance(value, Mapping) and set(value) != set(variables):
                raise ValueError(f"{option} must have one entry per latent variable {list(variables)}, got "
                                 f"{sorted(value)}")
            per_var[option] = value if isinstance(value, Mapping) else dict.fromkeys(variables, value)
        nets = nn.ModuleDict({
            v: make_network(per_var["network"][v],
                            hidden_size=check_int(f"hidden_size[{v!r}]", per_var["hidden_size"][v], minimum=1),
                            num_layers=num_layers)
            for v in variables
        })
        heads = nn.ModuleDict({
            v: make_update(update, names, hidden_size=nets[v].hidden_size, dim=self.space.sizes[v]) for v in variables
        })
        return nets, heads, any(net.recurrent for net in nets.values())

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
        level_errors = None
        if self.encoding.needs_level_errors:
            level_errors = {OBSERVED: x.flatten(1), **self.space.split(zeros[self.family.param_names[0]])}
        with torch.no_grad():
            self._propose(EncodingInputs(grads=zeros, params=params, x=x, errors=errors, level_errors=level_errors),
                          None)

    def _propose(self, inputs: EncodingInputs, state: Any) -> tuple[Params, Any]:
        """The update network(s)' next λ from the encoded inputs (before the family's constraints)."""
        if not self.per_variable_networks:
            with _full_precision(inputs.x):
                features = self.encoding(inputs)
            hidden, state = self.network(features, state)
            return self.update(hidden, inputs.params), state
        space = self.space
        grads = {n: space.split(g) for n, g in inputs.grads.items()}
        params = {n: space.split(p) for n, p in inputs.params.items()}
        states: dict[str, State] = dict(state or {})
        blocks: dict[str, Params] = {}
        for v in self.network:
            errors = None if inputs.errors is None else (inputs.errors[0], space.split(inputs.errors[1])[v])
            block = {n: params[n][v] for n in params}
            restricted = EncodingInputs(grads={n: grads[n][v] for n in grads}, params=block, x=inputs.x,
                                        errors=errors, level_errors=inputs.level_errors, variable=v)
            with _full_precision(inputs.x):
                features = self.encoding(restricted)
            hidden, states[v] = self.network[v](features, states.get(v))
            blocks[v] = self.update[v](hidden, block)
        return {n: torch.cat([blocks[v][n] for v in self.network], -1) for n in inputs.params}, states

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
                trace.final_values, trace.final_noise = values, eps
                break
            errors = level_errors = None
            with torch.no_grad(), _full_precision(x):
                if self.encoding.needs_errors:
                    errors = observation_errors(model, family, lam, x, eps, space=space, prior=prior)
                    errors = tuple(_mask_rows(healthy, e) for e in errors)
                if self.encoding.needs_level_errors:
                    z = space.split(family.sample(lam, eps))
                    level_errors = {k: _mask_rows(healthy, e) for k, e in
                                    precision_weighted_errors(model, x, z).items()}  # type: ignore[arg-type]
            grad_inputs = grads if second_order else detach(grads)
            with torch.set_grad_enabled(train):
                base = params if bptt else lam
                inputs = EncodingInputs(grads=grad_inputs, params=base, x=x, errors=errors, level_errors=level_errors)
                proposed, state = self._propose(inputs, state)
                updated = family.constrain(proposed)
                # Examples whose ELBO or gradient is not finite keep their λ (and teach nothing).
                params = {n: torch.where(healthy[:, None], v.to(base[n].dtype), base[n]) for n, v in updated.items()}

        final_loss = self._final_model_loss(trace, params, x, kl_prior) if train else None
        self._report_unhealthy(trace)
        loss = trace.loss(final_loss)
        public, posterior = self._public(params)
        return InferenceResult(params=public, posterior=posterior, elbo=trace.elbo(), loss=loss,
                               grad_norm=torch.stack(trace.norms))

    def _public(self, params: Params) -> tuple[dict[str, Any], Distribution | dict[str, Distribution]]:
        if not isinstance(self.family, BlockFamily):
            return super()._public(params)
        params = detach(params)
        return self.family.blocks(params), self.family.distributions(params)

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
            if not trace.phi:
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
        self, trace: _Trace, params: Params, x: Tensor, prior: PriorMoments | None
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
        # Re-evaluate on the healthy rows only (same noise): a non-finite row would turn 0 · inf into NaN backward.
        eps = trace.final_noise[:, healthy]
        with _full_precision(x):
            kept = elbo(self.model, self.family, {n: v.detach()[healthy] for n, v in params.items()}, x[healthy],
                        eps, space=self.space, prior=prior)
        return -kept.mean()

    def extra_repr(self) -> str:
        return (
            f"latent={self.space}, num_steps={self.num_steps}, family={self.family}, encoding={self.encoding}, "
            f"num_samples={self.num_samples}, init={self.init!r}, backprop_through_steps={self.backprop_through_steps},"
            f" per_variable_networks={self.per_variable_networks}"
        )
