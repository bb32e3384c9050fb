"""The model contract: what a user's model must (and may) provide, and the checks that enforce it.

A latent model is anything with ``log_joint(x, z)`` returning log p(x, z) per example: shape ``[B]`` for ``z`` of
shape ``[B, D]`` and ``[S, B]`` for ``z`` of shape ``[S, B, D]``. With several latent variables ``z`` is a
``dict[str, Tensor]``. The model must not couple examples (no mean over the batch), so the gradient of the summed
ELBO is exactly the per-example gradient. One coupling is allowed because users train that way: batch norm in
training mode while the model trains jointly with inference (:mod:`learned_inference.train_mode`).

Optional methods, used when present:

* ``encode(x)`` → ``(loc, log_var)``: an initial guess for the posterior (and the standard-encoder baseline).
* ``log_likelihood(x, z)`` and ``prior()`` (a ``torch.distributions.Distribution`` over z with event shape
  ``[D]``): enable the analytic KL term of the ELBO.
* ``likelihood_mean(z)`` → E[x | z] and ``prior()``: enable the error encodings εx, εz.
* ``check_support(x)``: raise a ``ValueError`` when ``x`` is outside the data's support (:class:`DecoderModel` and
  :class:`VAEModel` ask their likelihood; see :meth:`~learned_inference.likelihoods.Likelihood.check_support`).

The first call of every inference method checks the contract with :func:`check_log_joint` (output shape and
dtype, differentiability in z, no coupling between examples) and every call checks the data's support with
:func:`check_support`, so a model or data that break it fail with an error naming the cause, never with a
plausible-looking number.

The adapters in :mod:`learned_inference.adapters` (:class:`~learned_inference.adapters.DecoderModel`,
:class:`~learned_inference.adapters.VAEModel`) build such a model from a decoder or a VAE in a line.

Example:
    >>> import torch
    >>> from learned_inference.adapters import DecoderModel
    >>> model = DecoderModel(torch.nn.Linear(2, 5), likelihood="bernoulli", latent_dim=2)
    >>> isinstance(model, LatentModel), isinstance(model, WithPrior)
    (True, True)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

from learned_inference.latent_space import LatentSpace
from learned_inference.train_mode import ModelModes, batch_norm_error

__all__ = [
    "LatentModel",
    "WithEncoder",
    "WithLogLikelihood",
    "WithPrior",
    "check_log_joint",
    "check_model",
    "check_support",
]

#: how many examples the first-call contract checks use (at most)
_CHECK_EXAMPLES = 8
@runtime_checkable
class LatentModel(Protocol):
    """Anything with ``log_joint(x, z)`` returning one log p(x, z) per example.

    ``z`` is a tensor for a single latent variable and a dict of tensors (``Latents``) for several; which one
    is set by ``latent_dim`` at run time, so ``z`` is typed ``Any`` here: a model typed ``z: Tensor``,
    ``z: dict[str, Tensor]`` or ``z: Latents`` is a ``LatentModel`` alike.
    """

    def log_joint(self, x: Tensor, z: Any) -> Tensor: ...


@runtime_checkable
class WithEncoder(Protocol):
    """A model with the optional ``encode(x)``: an initial guess of λ (``(loc, log_var)`` or an output object)."""

    def encode(self, x: Tensor, /) -> Any: ...


@runtime_checkable
class WithPrior(Protocol):
    """A model with the optional ``prior()``: a distribution over z (a dict of them for several variables)."""

    def prior(self) -> Any: ...


@runtime_checkable
class WithLogLikelihood(Protocol):
    """A model with the optional ``log_likelihood(x, z)``: log p(x | z) per example (for the analytic KL)."""

    def log_likelihood(self, x: Tensor, z: Any, /) -> Tensor: ...


def check_model(model: object) -> None:
    """Raises ``TypeError`` unless ``model`` has a callable ``log_joint``."""
    if not callable(getattr(model, "log_joint", None)):
        raise TypeError(
            f"model must have a log_joint(x, z) method returning log p(x, z) per example; "
            f"{type(model).__name__} has none. Wrap a decoder with DecoderModel(decoder, likelihood=..., "
            "latent_dim=...) or a VAE with encode/decode methods with VAEModel(vae, likelihood=..., latent_dim=...)."
        )


def check_support(model: object, x: Tensor) -> None:
    """Runs ``model.check_support(x)`` when the model has it (a ``ValueError`` for data outside the support).

    :class:`DecoderModel`, :class:`VAEModel` and the reference models of :mod:`learned_inference.zoo` have it; a
    model that only has ``log_joint`` is responsible for its own data.
    """
    check = getattr(model, "check_support", None)
    if callable(check):
        check(x)


def _named_modules(model: object) -> list[tuple[str, nn.Module]]:
    """Every module reachable from ``model`` (itself, or the modules among its attributes), named ``model.…``."""
    if isinstance(model, nn.Module):
        return [(f"model.{name}" if name else "model", m) for name, m in model.named_modules()]
    attributes = vars(model) if hasattr(model, "__dict__") else {}
    return [(f"model.{attr}.{name}" if name else f"model.{attr}", m)
            for attr, value in attributes.items() if isinstance(value, nn.Module)
            for name, m in value.named_modules()]


class _BatchStatisticsError(Exception):
    """Raised by a forward pre-hook: log_joint reached a batch norm without running statistics; nothing was mutated
    yet."""

    def __init__(self, name: str, module: nn.Module) -> None:
        super().__init__(name)
        self.error = batch_norm_error(name, module, cause="no_running_stats")


class _ModuleWatch:
    """Which batch norms and dropouts log_joint uses."""

    def __init__(self) -> None:
        self.batch_norms: list[tuple[str, nn.Module]] = []
        self.dropouts: list[tuple[str, nn.Module]] = []


@contextmanager
def _watch_modules(model: object) -> Iterator[_ModuleWatch]:
    """Inside: the batch norms and dropouts log_joint uses are recorded; those in training mode are in eval mode (a
    batch norm applies its running statistics, the same map to every example, so the checks find any other
    coupling and move no statistics; a dropout draws no random numbers from the global generator); a batch norm
    without running statistics raises :class:`_BatchStatisticsError` before it runs. All is restored on exit."""
    watch = _ModuleWatch()
    handles, switched = [], []

    def record(found: list[tuple[str, nn.Module]], name: str, module: nn.Module) -> None:
        if all(m is not module for _, m in found):
            found.append((name, module))

    for name, module in _named_modules(model):
        if isinstance(module, _BatchNorm):
            def batch_norm_hook(module: nn.Module, _inputs: Any, name: str = name) -> None:
                if not getattr(module, "track_running_stats", True):  # batch statistics in every mode
                    raise _BatchStatisticsError(name, module)
                record(watch.batch_norms, name, module)
            handles.append(module.register_forward_pre_hook(batch_norm_hook))
        elif isinstance(module, _DropoutNd):
            def dropout_hook(module: nn.Module, _inputs: Any, name: str = name) -> None:
                record(watch.dropouts, name, module)
            handles.append(module.register_forward_pre_hook(dropout_hook))
        else:
            continue
        if module.training:
            module.training = False
            switched.append(module)
    try:
        yield watch
    finally:
        for handle in handles:
            handle.remove()
        for module in switched:
            module.training = True


def _declared_latent_dim(model: object) -> int | dict[str, int] | None:
    """The latent size the model itself declares (an adapter's ``latent_space``, or a ``latent_dim``), if any."""
    space = getattr(model, "latent_space", None)
    if isinstance(space, LatentSpace):
        return space.total_dim if space.names is None else dict(space.sizes)
    try:
        declared = getattr(model, "latent_dim", None)
    except Exception:  # a property that fails is no declaration
        return None
    if isinstance(declared, int) and not isinstance(declared, bool):
        return declared
    if isinstance(declared, Mapping) and all(isinstance(v, int) for v in declared.values()):
        return dict(declared)
    return None


def _failure_hint(model: object, space: LatentSpace) -> str:
    """What a log_joint failure most likely means: latent_dim only when the model declares another one."""
    declared = _declared_latent_dim(model)
    given = space.latent_dim
    if declared is not None and declared != given:
        return (f" The model declares latent_dim={declared} but the inference method was given latent_dim={given}: "
                "pass the same latent_dim to both (a dict of sizes for several latent variables).")
    if declared is not None:
        return " latent_dim matches the model's, so check x: log_joint must accept x as [B, *event] in its layout."
    return (f" Check that log_joint accepts x as [B, *event] in the layout the model expects, and z with last "
            f"dimension latent_dim={given} (a dict of sizes for several latent variables).")


def _latents(space: LatentSpace, shape: tuple[int, ...], x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Flat latents ``[*shape, D]`` in x's dtype and device: zeros, or N(0, I) draws from ``generator``."""
    size = (*shape, space.total_dim)
    if generator is None:
        return torch.zeros(size, dtype=x.dtype, device=x.device)
    return torch.randn(size, dtype=x.dtype, device=x.device, generator=generator)


def _leading(num_samples: int, batch: int) -> tuple[int, ...]:
    return (num_samples, batch) if num_samples > 1 else (batch,)


def _check_output(model: LatentModel, x: Tensor, space: LatentSpace, num_samples: int) -> None:
    """log_joint runs on the whole batch and returns a floating-point value per example (and per sample)."""
    shape = _leading(num_samples, x.shape[0])
    z = space.split(_latents(space, shape, x, None))
    z_desc = [*shape, space.total_dim] if space.names is None else {k: [*shape, v] for k, v in space.sizes.items()}
    try:
        with torch.no_grad():
            out = model.log_joint(x, z)
    except _BatchStatisticsError as found:
        raise found.error from None
    except Exception as error:
        raise ValueError(
            f"model.log_joint(x, z) failed for x of shape {list(x.shape)} and z of shape {z_desc}: "
            f"{type(error).__name__}: {error}.{_failure_hint(model, space)}"
        ) from error
    if not isinstance(out, Tensor):
        raise TypeError(f"model.log_joint(x, z) must return a Tensor, got {type(out).__name__}")
    if not out.is_floating_point():
        raise TypeError(
            f"model.log_joint(x, z) returned dtype {out.dtype}; it must return log p(x, z) as a floating-point tensor. "
            "An integer result has no gradient with respect to z, so inference would silently ignore the model: "
            "remove the rounding or integer cast."
        )
    if tuple(out.shape) != shape:
        hint = ""
        if out.dim() > len(shape):
            hint = " It looks unreduced: sum log p(x | z) over the data dimensions."
        elif out.dim() < len(shape):
            hint = " It looks reduced over the batch: return one value per example (no mean or sum over the batch)."
        raise ValueError(
            f"model.log_joint(x, z) must return shape {list(shape)} for x of shape {list(x.shape)} and z of "
            f"shape {[*shape, space.total_dim]}, got {list(out.shape)}.{hint}"
        )


class _NotDifferentiableError(Exception):
    """Raised inside the gradient transform: this method's output does not depend on z through autograd."""


def _check_differentiable(model: LatentModel, x: Tensor, space: LatentSpace, num_samples: int) -> None:
    """The λ-gradient's own computation, once: torch.func.grad of log_joint (and log_likelihood) in z."""
    x = x[:_CHECK_EXAMPLES]
    generator = torch.Generator(device=x.device).manual_seed(0)
    flat = _latents(space, _leading(num_samples, x.shape[0]), x, generator)
    methods = ["log_joint"] + (["log_likelihood"] if callable(getattr(model, "log_likelihood", None)) else [])

    def total(flat: Tensor) -> Tensor:
        z = space.split(flat)
        values = []
        for method in methods:
            value = getattr(model, method)(x, z)
            if not value.requires_grad:
                raise _NotDifferentiableError(method)
            values.append(value.sum())
        return torch.stack(values).sum()

    try:
        torch.func.grad(total)(flat)
    except _NotDifferentiableError as found:
        raise ValueError(
            f"model.{found}(x, z) does not depend differentiably on z: its result has no autograd graph to z, so "
            "the ELBO's λ-gradient would silently miss that term. Something inside cuts the graph: .detach(), "
            ".item(), .numpy(), .tolist(), torch.no_grad(), or an integer cast. Compute it with differentiable "
            "torch operations."
        ) from None
    except RuntimeError as error:
        if "cudnn RNN backward can only be called in training mode" in str(error):
            raise ValueError(
                "model.log_joint(x, z) runs a cuDNN recurrent layer (nn.LSTM, nn.GRU, nn.RNN) in eval mode, and "
                "cuDNN differentiates those only in training mode, which the λ-gradient needs at every step. Put "
                "the recurrent layers (only them) in training mode: an RNN without dropout computes the same in "
                "both modes, e.g. model.eval(); model.decoder.rnn.train(). Or evaluate without cuDNN: "
                f"torch.backends.cudnn.flags(enabled=False) around inference (slower). ({error})"
            ) from error
        if "mutate a captured Tensor" in str(error):
            raise ValueError(
                "model.log_joint(x, z) modifies a tensor in place that it did not create (e.g. a buffer or running "
                "statistic updated in forward, as batch norm or a running mean in training mode does); the "
                "λ-gradient (torch.func.grad) cannot differentiate through that. Call model.eval() if a module "
                f"updates statistics in training mode, or move the update out of log_joint. ({error})"
            ) from error
        raise ValueError(
            f"model.log_joint(x, z) runs, but its gradient with respect to z (torch.func.grad, as inference takes "
            f"it) fails: {error}"
        ) from error


def _check_independent(model: LatentModel, x: Tensor, space: LatentSpace, num_samples: int) -> None:
    """Each example's log p(x, z) is the same whatever the other examples of the batch are.

    Two calls on batches of the same shape (so the same kernels run): the first k examples with their z, followed
    by the same examples again, or by copies of the first example with other z. With no coupling the first k values
    agree, and each agrees with its copy in the second half of the first call.
    """
    head = x[:_CHECK_EXAMPLES]
    k = head.shape[0]
    others = head[:1].expand_as(head)  # other data in the support: the batch's statistics change (for k > 1)
    generator = torch.Generator(device=x.device).manual_seed(1)
    z = _latents(space, _leading(num_samples, k), x, generator)
    z_others = _latents(space, _leading(num_samples, k), x, generator)
    with torch.no_grad():
        same = model.log_joint(torch.cat([head, head]), space.split(torch.cat([z, z], dim=-2)))
        changed = model.log_joint(torch.cat([head, others]), space.split(torch.cat([z, z_others], dim=-2)))
    tol = max(1e-4, 100 * torch.finfo(same.dtype).eps)
    for name, first, second in (("the other examples", same[..., :k], changed[..., :k]),
                                ("its position", same[..., :k], same[..., k:])):
        moved = ~torch.isclose(first, second, rtol=tol, atol=tol, equal_nan=True)
        if bool(moved.any()):
            index = tuple(int(i) for i in moved.nonzero()[0])
            raise ValueError(
                f"model.log_joint couples the examples of a batch: the log p(x, z) of one example (x[{index[-1]}] "
                f"with a fixed z) changed from {first[index].item():.6g} to {second[index].item():.6g} when only "
                f"{name} in the batch changed. Inference needs each example's value to depend on that example alone "
                "(its λ-gradients are taken from the batch sum). Common causes: a mean, sum or normalisation over "
                "the batch inside log_joint or the decoder (batch norm is allowed: it is checked in eval mode), or "
                "random numbers drawn inside log_joint (F.dropout, torch.randn: make it deterministic)."
            )


def check_log_joint(model: LatentModel, x: Tensor, space: LatentSpace, *, num_samples: int) -> ModelModes:
    """Checks the model contract on the first batch; raises an error that names the cause and the fix.

    1. ``log_joint(x, z)`` runs on the whole batch and returns one floating-point value per example (and sample).
       A batch norm without running statistics (``track_running_stats=False``) that log_joint reaches is an error
       (before it runs).
    2. It (and ``log_likelihood``, when present) is differentiable in z under ``torch.func.grad``, as the
       λ-gradient takes it: no cut graph, no in-place update of captured tensors.
    3. It does not couple examples: on up to 8 examples with z ~ N(0, I) (a private generator: the global one
       is not used), each value stays the same when the other examples of the batch, or its position, change.

    Batch norms and dropouts in training mode are in eval mode during the checks (the coupling train-mode batch
    norm brings is the user's, allowed while the model trains: :mod:`learned_inference.train_mode`); nothing in the
    model is changed, and no running statistic moves.

    Args:
        model: the user's model.
        x: the first batch, ``[B, *event]``.
        space: the latent layout the inference method was given.
        num_samples: the samples S per ELBO evaluation (z is ``[S, B, D]`` when S > 1).

    Returns:
        The batch norms and dropouts log_joint uses (:class:`~learned_inference.train_mode.ModelModes`), whose modes
        each later call checks.

    Raises:
        ValueError: log_joint fails, has the wrong shape, is not differentiable in z, or couples examples.
        TypeError: log_joint returns something other than a floating-point tensor.
    """
    with _watch_modules(model) as watch, torch.autocast(device_type=x.device.type, enabled=False):
        _check_output(model, x, space, num_samples)
        _check_differentiable(model, x, space, num_samples)
        _check_independent(model, x, space, num_samples)
    return ModelModes(batch_norms=tuple(watch.batch_norms), dropouts=tuple(watch.dropouts),
                      modules=[m for _, m in _named_modules(model)])
