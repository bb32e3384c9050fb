"""The model contract and adapters that turn a user's VAE into a :class:`LatentModel`.

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

:class:`VAEModel` wraps VAEs from other code as they are: ``encode``/``decode`` may return tuples, dicts or output
objects (fields named as in :data:`ENCODER_FIELDS` and :data:`DECODER_FIELDS` are found), or be replaced by
``encode=``/``decode=`` callables. Recipes for two common collections are in the docs' quickstart.

Example:
    >>> import torch
    >>> from learned_inference.model import DecoderModel
    >>> model = DecoderModel(torch.nn.Linear(2, 5), likelihood="bernoulli", latent_dim=2)
    >>> model.log_joint(torch.ones(3, 5), torch.zeros(3, 2)).shape
    torch.Size([3])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Protocol, cast, runtime_checkable

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, Independent, Normal
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

from learned_inference.likelihoods import Likelihood, make_likelihood
from learned_inference.train_mode import ModelModes, batch_norm_error

__all__ = [
    "DECODER_FIELDS",
    "ENCODER_FIELDS",
    "DecoderModel",
    "EncoderDecoder",
    "LatentModel",
    "LatentSpace",
    "Latents",
    "VAEModel",
    "WithEncoder",
    "WithLogLikelihood",
    "WithPrior",
    "check_log_joint",
    "check_model",
    "check_support",
    "encoder_output",
]

Latents = Tensor | dict[str, Tensor]

#: log 2π, a Python float: no tensor is created per call (on the CPU, or on the device)
_LOG_2PI = math.log(2 * math.pi)

#: field names read from an encoder's output when it is a mapping or an object (e.g. pythae's ``ModelOutput``):
#: the posterior mean, then the log-variance; exactly one name of each must be present
ENCODER_FIELDS: tuple[tuple[str, ...], tuple[str, ...]] = (
    ("loc", "mu", "mean", "embedding", "z_mean"),
    ("log_var", "logvar", "log_covariance", "z_log_var"),
)

#: field names read from a decoder's output when it is a mapping or an object; exactly one must be present
DECODER_FIELDS: tuple[str, ...] = ("reconstruction", "recon_x", "logits")

#: options of the inference methods that users pass to the model adapters by mistake
_METHOD_OPTIONS = frozenset({
    "analytic_kl", "encoding", "family", "hidden_size", "init", "network", "num_layers", "num_samples", "num_steps",
    "on_nonfinite", "update",
})

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


class EncoderDecoder(Protocol):
    """A VAE as :class:`VAEModel` takes it by default: ``encode(x)`` and ``decode(z)`` methods (usually an
    ``nn.Module``), returning tensors, tuples or output objects (see :class:`VAEModel`)."""

    def encode(self, x: Tensor, /) -> Any: ...

    def decode(self, z: Tensor, /) -> Any: ...


class LatentSpace:
    """The layout of the latent variables: one vector of size ``D`` or several named ones.

    Inference works on one flat vector per example (``[..., D_total]``, the variables concatenated in the
    order given); :meth:`split` turns it back into what the user's ``log_joint`` expects.

    Args:
        latent_dim: the size of the single latent vector, or a mapping from variable name to size.

    Example:
        >>> space = LatentSpace({"z1": 3, "z2": 2})
        >>> space.total_dim, sorted(space.split(torch.zeros(4, 5)))
        (5, ['z1', 'z2'])
    """

    def __init__(self, latent_dim: int | Mapping[str, int]) -> None:
        if isinstance(latent_dim, Mapping):
            if not latent_dim:
                raise ValueError("latent_dim must name at least one latent variable, got an empty mapping")
            sizes = dict(latent_dim)
            self.names: tuple[str, ...] | None = tuple(sizes)
        else:
            sizes = {"z": latent_dim}
            self.names = None
        for name, size in sizes.items():
            if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
                label = "latent_dim" if self.names is None else f"latent_dim[{name!r}]"
                raise ValueError(f"{label} must be a positive int, got {size!r}")
        self.sizes: dict[str, int] = sizes
        self.total_dim = sum(sizes.values())

    def split(self, flat: Tensor) -> Latents:
        """``[..., D_total]`` → a tensor (single variable) or a dict of ``[..., D_name]`` tensors."""
        if self.names is None:
            return flat
        return dict(zip(self.names, flat.split(list(self.sizes.values()), dim=-1), strict=True))

    def block(self, flat: Tensor, name: str) -> Tensor:
        """The ``[..., D_name]`` block of variable ``name`` in ``[..., D_total]``."""
        blocks = self.split(flat)
        if not isinstance(blocks, dict):
            raise ValueError(f"this latent space is one vector of size {self.total_dim}: it has no variable {name!r}")
        return blocks[name]

    def merge(self, latents: Latents) -> Tensor:
        """The inverse of :meth:`split`."""
        if self.names is None:
            if not isinstance(latents, Tensor):
                raise TypeError("this model has a single latent variable: expected a tensor, got a dict")
            return latents
        if not isinstance(latents, Mapping) or set(latents) != set(self.names):
            got = sorted(latents) if isinstance(latents, Mapping) else type(latents).__name__
            raise ValueError(f"expected latents named {list(self.names)}, got {got}")
        return torch.cat([latents[name] for name in self.names], dim=-1)

    def __repr__(self) -> str:
        return f"LatentSpace({self.sizes if self.names is not None else self.total_dim})"


def _fields(out: object) -> dict[str, Any]:
    """The named fields of a mapping or an output object (its public attributes); empty for anything else."""
    if isinstance(out, Mapping):
        return {str(k): v for k, v in out.items()}
    if isinstance(out, Tensor | list | tuple) or not hasattr(out, "__dict__"):
        return {}
    return {k: v for k, v in vars(out).items() if not k.startswith("_")}


def _kind(out: object) -> str:
    """How an unexpected output looks, for error messages."""
    if isinstance(out, Tensor):
        return f"one tensor of shape {list(out.shape)}"
    if isinstance(out, list | tuple):
        return f"a {type(out).__name__} of {len(out)}"
    fields = _fields(out)
    if fields:
        return f"a {type(out).__name__} with fields {sorted(fields)}"
    return f"a {type(out).__name__}"


def _pick(fields: Mapping[str, Any], names: Sequence[str]) -> Any:
    """The value of the one field among ``names`` that ``fields`` has, or None when none or several are there."""
    found = [name for name in names if name in fields]
    return fields[found[0]] if len(found) == 1 else None


def _decoder_tensor(out: object) -> Tensor:
    """The likelihood's parameters from what a decoder returned: the tensor itself, or a field of an output object.

    A mapping or an object (e.g. ``{"reconstruction": ...}`` or pythae's ``ModelOutput``) must have exactly one of
    the fields in :data:`DECODER_FIELDS`.

    Raises:
        TypeError: for anything else, naming what the decoder returned and the fix.
    """
    if isinstance(out, Tensor):
        return out
    value = _pick(_fields(out), DECODER_FIELDS)
    if isinstance(value, Tensor):
        return value
    raise TypeError(
        f"the decoder returned {_kind(out)}, not a tensor of the likelihood's parameters, and exactly one field named "
        f"{list(DECODER_FIELDS)} was not found. Give a decoder that returns the tensor, e.g. "
        "VAEModel(vae, ..., decode=lambda z: vae.decode(z)['my_field'])."
    )


def _check_latents(value: object, *, role: str, source: str, batch: int, space: LatentSpace) -> Latents:
    """``value`` if it is λ's ``role`` part in the latent layout: ``[B, D]``, or a dict of ``[B, D_name]``."""
    if space.names is None:
        if isinstance(value, Tensor) and tuple(value.shape) == (batch, space.total_dim):
            return value
        expected: object = [batch, space.total_dim]
        got: object = list(value.shape) if isinstance(value, Tensor) else type(value).__name__
    else:
        if isinstance(value, Mapping) and set(value) == set(space.names) and all(
            isinstance(value[n], Tensor) and tuple(value[n].shape) == (batch, size) for n, size in space.sizes.items()
        ):
            return dict(value)
        expected = {n: [batch, size] for n, size in space.sizes.items()}
        got = ({n: list(v.shape) if isinstance(v, Tensor) else type(v).__name__ for n, v in value.items()}
               if isinstance(value, Mapping) else type(value).__name__)
    raise ValueError(f"{source} returned {role} of shape {got}; expected {expected} (x's batch size {batch} and "
                     f"latent_dim={_describe(space)}); check that latent_dim matches the encoder")


def encoder_output(out: object, *, batch: int, space: LatentSpace, source: str, fix: str) -> tuple[Latents, Latents]:
    """``(loc, log_var)`` from what an encoder returned, checked against the batch and the latent layout.

    Accepted: a pair ``(loc, log_var)`` (or a longer list/tuple starting with them, as many VAE collections return
    ``[mu, log_var, ...]``), or a mapping/object with exactly one mean and one log-variance field named as in
    :data:`ENCODER_FIELDS` (e.g. pythae's ``ModelOutput(embedding=..., log_covariance=...)``). Each part is a
    ``[B, D]`` tensor, or a dict of ``[B, D_name]`` tensors for several latent variables.

    Args:
        out: the encoder's output.
        batch: B, x's batch size.
        space: the latent layout.
        source: how to name the encoder in errors (e.g. ``"vae.encode(x)"``).
        fix: the argument that replaces the encoder, shown in errors (e.g. ``"encode="``).

    Raises:
        TypeError: the output has no recognisable ``(loc, log_var)``.
        ValueError: a part has the wrong shape.
    """
    if isinstance(out, list | tuple) and len(out) >= 2:
        loc, log_var = out[0], out[1]
    else:
        fields = _fields(out)
        loc, log_var = (_pick(fields, names) for names in ENCODER_FIELDS)
        if loc is None or log_var is None:
            split = " If it holds both, split it: .chunk(2, dim=-1)." if isinstance(out, Tensor) else ""
            raise TypeError(
                f"{source} returned {_kind(out)}; expected (loc, log_var): a pair, a list starting with them, or a "
                f"mapping/object with one field of {list(ENCODER_FIELDS[0])} and one of {list(ENCODER_FIELDS[1])}."
                f"{split} Otherwise pass {fix}lambda x: ... returning (loc, log_var)."
            )
    return (_check_latents(loc, role="loc", source=source, batch=batch, space=space),
            _check_latents(log_var, role="log_var", source=source, batch=batch, space=space))


def _flatten_leading(decoder: Callable[[Tensor], Any], z: Tensor) -> Tensor:
    """Runs ``decoder`` on ``[..., D]`` as one ``[N, D]`` batch, restoring the leading dimensions after."""
    leading = z.shape[:-1]
    out = _decoder_tensor(decoder(z.reshape(-1, z.shape[-1])))
    return out.reshape(*leading, *out.shape[1:])


def _likelihood(likelihood: str | Likelihood, options: Mapping[str, Any], owner: str) -> Likelihood:
    """The likelihood of an adapter, with options meant for an inference method named as such."""
    misplaced = sorted(set(options) & _METHOD_OPTIONS)
    if misplaced:
        shown = ", ".join(f"{name}={options[name]!r}" for name in misplaced)
        raise TypeError(
            f"{owner} got {shown}: {'that is an option' if len(misplaced) == 1 else 'those are options'} of the "
            f"inference method, not of the model. Pass {'it' if len(misplaced) == 1 else 'them'} there, e.g. "
            f"IterativeInferenceOptimizer(model, latent_dim=..., {shown})."
        )
    try:
        return make_likelihood(likelihood, **options)
    except TypeError as error:
        raise TypeError(f"{owner}: {error}") from None


class DecoderModel(nn.Module):
    """A latent model built from a decoder, a likelihood name and an N(0, I) prior.

    log p(x, z) = log p(x | decoder(z)) + log N(z; 0, I).

    Args:
        decoder: maps ``[N, D]`` latents to the likelihood's parameters ``[N, *event]`` (logits for
            ``"bernoulli"``, the mean for ``"gaussian"``, logits for ``"multinomial"``), with x's event shape.
            Extra leading sample dimensions are flattened before the call, so any 2-D-input decoder (MLP or
            convolutional) works. It may return an output object or dict with a field named as in
            :data:`DECODER_FIELDS`.
        likelihood: a name (``"bernoulli"``, ``"bernoulli-probs"``, ``"gaussian"``, ``"multinomial"``) or a
            :class:`~learned_inference.likelihoods.Likelihood`.
        latent_dim: the size of z.
        encoder: optional module mapping x to ``(loc, log_var)`` (see :func:`encoder_output`); enables ``encode``.
        **likelihood_options: passed to the likelihood (e.g. ``log_var=-2.0, learn_variance=True``).

    Raises:
        TypeError: a decoder that is not callable, or an option the likelihood does not take (options of the
            inference methods, such as ``init``, are named as such).

    Example:
        >>> import torch
        >>> model = DecoderModel(torch.nn.Linear(4, 10), likelihood="gaussian", latent_dim=4, log_var=-1.0)
        >>> model.log_joint(torch.zeros(8, 10), torch.zeros(2, 8, 4)).shape
        torch.Size([2, 8])
    """

    def __init__(
        self,
        decoder: Callable[[Tensor], Any],
        *,
        likelihood: str | Likelihood = "bernoulli",
        latent_dim: int,
        encoder: Callable[[Tensor], Any] | None = None,
        **likelihood_options: Any,
    ) -> None:
        super().__init__()
        if not callable(decoder):
            raise TypeError(f"decoder must be callable (an nn.Module), got {type(decoder).__name__}")
        self.decoder = decoder
        self.likelihood = _likelihood(likelihood, likelihood_options, "DecoderModel")
        self.latent_space = LatentSpace(latent_dim)
        self.encoder = encoder

    def decode(self, z: Tensor) -> Tensor:
        """The decoder's output (likelihood parameters) for ``z`` of shape ``[..., D]``."""
        return _flatten_leading(self.decoder, z)

    def log_likelihood(self, x: Tensor, z: Tensor) -> Tensor:
        """log p(x | z), shape ``z.shape[:-1]``.

        Raises:
            ValueError: the decoder's output does not have x's shape (after z's leading dimensions): the likelihood
                would broadcast them into a wrong number.
        """
        params = self.decode(z)
        if params.shape[max(params.dim() - x.dim(), 0):] != x.shape:
            raise ValueError(
                f"the decoder returned shape {list(params.shape)} for z of shape {list(z.shape)}, but x has shape "
                f"{list(x.shape)}: the likelihood compares them entry by entry, so the decoder must return "
                f"[..., B, *event] with x's event shape {list(x.shape[1:])}. Reshape x to the decoder's layout "
                "(e.g. x.flatten(1) for a decoder that returns flat vectors) or the decoder's output to x's."
            )
        return self.likelihood.log_prob(params, x)

    def likelihood_mean(self, z: Tensor) -> Tensor:
        """E[x | z], shape ``[..., *event]``."""
        return self.likelihood.mean(self.decode(z))

    def prior(self) -> Distribution:
        """N(0, I) over ``D`` dimensions (event shape ``[D]``), in the decoder's dtype and on its device."""
        return standard_normal_prior(self.latent_space.total_dim, like=self)

    def log_prior(self, z: Tensor) -> Tensor:
        """log N(z; 0, I), shape ``z.shape[:-1]``."""
        return gaussian_standard_log_prob(z)

    def log_joint(self, x: Tensor, z: Tensor) -> Tensor:
        """log p(x, z) = log p(x | z) + log p(z)."""
        return self.log_likelihood(x, z) + self.log_prior(z)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(loc, log_var)``, each ``[B, D]``, from the encoder given at construction (checked)."""
        if self.encoder is None:
            raise AttributeError("this DecoderModel has no encoder: pass encoder=... to use encode()")
        return _pair(encoder_output(self.encoder(x), batch=x.shape[0], space=self.latent_space,
                                    source="DecoderModel's encoder(x)", fix="encoder="))

    def check_support(self, x: Tensor) -> None:
        """Raises ``ValueError`` if ``x`` is outside the likelihood's support (see
        :meth:`~learned_inference.likelihoods.Likelihood.check_support`)."""
        self.likelihood.check_support(x)


def gaussian_standard_log_prob(z: Tensor) -> Tensor:
    """log N(z; 0, I) summed over the last dimension."""
    return -0.5 * (z.square() + _LOG_2PI).sum(-1)


def _unregistered(fn: Callable[..., Any], vae: object) -> Callable[..., Any]:
    """``fn``, as a plain callable when it is a module inside ``vae`` (so it is not registered, nor saved, twice)."""
    if isinstance(fn, nn.Module) and isinstance(vae, nn.Module) and any(m is fn for m in vae.modules()):
        return fn.__call__
    return fn


class VAEModel(nn.Module):
    """Wraps a VAE with an encoder and a decoder, as it is (the common shape of VAE collections).

    By default ``vae.encode(x)`` gives ``(loc, log_var)`` and ``vae.decode(z)`` the likelihood's parameters for
    ``z`` of shape ``[N, D]``. Both may return what VAE collections return: ``encode`` a list starting with
    ``[mu, log_var]`` or an output object/dict with fields named as in :data:`ENCODER_FIELDS`; ``decode`` a tensor or
    an object/dict with a field named as in :data:`DECODER_FIELDS`. For anything else, or a VAE whose encoder and
    decoder are not methods called ``encode``/``decode``, pass ``encode=`` and ``decode=`` callables.

    Args:
        vae: the user's VAE (its parameters stay its own; this wrapper registers it as a submodule).
        likelihood: as in :class:`DecoderModel`; use ``"bernoulli-probs"`` if ``decode`` ends in a sigmoid, and
            ``"gaussian"`` with ``log_var=``:func:`~learned_inference.likelihoods.log_var_from_squared_error` for a
            VAE trained with a squared-error loss.
        latent_dim: the size of z.
        encode: replaces ``vae.encode``: a callable x → (loc, log_var) (or any output :func:`encoder_output` reads,
            e.g. ``vae.encoder`` for pythae models).
        decode: replaces ``vae.decode``: a callable z → the likelihood's parameters (or an output object read as
            above, e.g. ``vae.decoder``).
        **likelihood_options: passed to the likelihood (e.g. ``log_var=-2.0``).

    Raises:
        TypeError: no encoder or decoder, or an unknown option (options of the inference methods, such as
            ``init="encoder"``, are named as such: they belong to the method).

    Example:
        >>> import torch
        >>> class TinyVAE(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.enc, self.dec = torch.nn.Linear(6, 4), torch.nn.Linear(2, 6)
        ...     def encode(self, x):
        ...         return list(self.enc(x).chunk(2, dim=-1))
        ...     def decode(self, z):
        ...         return self.dec(z)
        >>> model = VAEModel(TinyVAE(), likelihood="bernoulli", latent_dim=2)
        >>> model.log_joint(torch.ones(5, 6), torch.zeros(5, 2)).shape
        torch.Size([5])
        >>> [tuple(part.shape) for part in model.encode(torch.ones(5, 6))]
        [(5, 2), (5, 2)]
    """

    def __init__(
        self,
        vae: EncoderDecoder | nn.Module,
        *,
        likelihood: str | Likelihood = "bernoulli",
        latent_dim: int,
        encode: Callable[[Tensor], Any] | None = None,
        decode: Callable[[Tensor], Any] | None = None,
        **likelihood_options: Any,
    ) -> None:
        super().__init__()
        given = {"encode": encode, "decode": decode}
        for method, fn in given.items():
            if fn is None and not callable(getattr(vae, method, None)):
                raise TypeError(f"vae must have a callable {method}() method, or pass {method}=... (a callable); "
                                f"{type(vae).__name__} has no {method}()")
            if fn is not None and not callable(fn):
                raise TypeError(f"{method} must be callable, got {type(fn).__name__}")
        self.vae = vae
        self.encoder: Callable[[Tensor], Any] = (
            _unregistered(encode, vae) if encode is not None else cast(Callable[[Tensor], Any], vae.encode)
        )
        decoder = _unregistered(decode, vae) if decode is not None else cast(Callable[[Tensor], Any], vae.decode)
        self.model = DecoderModel(decoder, likelihood=_likelihood(likelihood, likelihood_options, "VAEModel"),
                                  latent_dim=latent_dim)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(loc, log_var)``, each ``[B, D]``, from the VAE's encoder (checked, see :func:`encoder_output`)."""
        return _pair(encoder_output(self.encoder(x), batch=x.shape[0], space=self.model.latent_space,
                                    source="vae.encode(x)", fix="VAEModel(vae, ..., encode="))

    def decode(self, z: Tensor) -> Tensor:
        """The likelihood's parameters for ``z`` of shape ``[..., D]``."""
        return self.model.decode(z)

    def log_likelihood(self, x: Tensor, z: Tensor) -> Tensor:
        """log p(x | z), shape ``z.shape[:-1]``."""
        return self.model.log_likelihood(x, z)

    def likelihood_mean(self, z: Tensor) -> Tensor:
        """E[x | z], shape ``[..., *event]``."""
        return self.model.likelihood_mean(z)

    def prior(self) -> Distribution:
        """N(0, I) over ``D`` dimensions, in the VAE's dtype and on its device."""
        return standard_normal_prior(self.model.latent_space.total_dim, like=self)

    def log_prior(self, z: Tensor) -> Tensor:
        """log N(z; 0, I), shape ``z.shape[:-1]``."""
        return self.model.log_prior(z)

    def log_joint(self, x: Tensor, z: Tensor) -> Tensor:
        """log p(x, z) = log p(x | z) + log p(z)."""
        return self.model.log_joint(x, z)

    def check_support(self, x: Tensor) -> None:
        """Raises ``ValueError`` if ``x`` is outside the likelihood's support."""
        self.model.check_support(x)


def _pair(pair: tuple[Latents, Latents]) -> tuple[Tensor, Tensor]:
    """``(loc, log_var)`` of a single latent variable: two tensors."""
    loc, log_var = pair
    if not isinstance(loc, Tensor) or not isinstance(log_var, Tensor):
        raise TypeError("encode() of a model with one latent variable must give (loc, log_var) tensors")
    return loc, log_var


def standard_normal_prior(dim: int, *, like: nn.Module) -> Distribution:
    """N(0, I) over ``dim`` dimensions (event shape ``[dim]``), in the dtype and on the device of ``like``'s first
    floating-point parameter or buffer (the default dtype on the CPU for a module without one). Built without
    argument validation: its parameters are valid by construction, and validation would synchronise a GPU."""
    tensors = (t for t in (*like.parameters(), *like.buffers()) if t.is_floating_point())
    first = next(tensors, None)
    dtype, device = (first.dtype, first.device) if first is not None else (torch.get_default_dtype(), None)
    zeros = torch.zeros(dim, dtype=dtype, device=device)
    return Independent(Normal(zeros, torch.ones_like(zeros), validate_args=False), 1, validate_args=False)


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


def _describe(space: LatentSpace) -> int | dict[str, int]:
    return space.total_dim if space.names is None else dict(space.sizes)


def _failure_hint(model: object, space: LatentSpace) -> str:
    """What a log_joint failure most likely means: latent_dim only when the model declares another one."""
    declared = _declared_latent_dim(model)
    given = _describe(space)
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
