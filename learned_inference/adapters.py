"""Adapters that turn a user's VAE into a :class:`~learned_inference.model.LatentModel` in a line.

:class:`DecoderModel` wraps a decoder and a likelihood name (``"bernoulli"``, ``"gaussian"``, ``"multinomial"``,
...); :class:`VAEModel` wraps VAEs from other code as they are: ``encode``/``decode`` may return tuples, dicts or
output objects (fields named as in :data:`ENCODER_FIELDS` and :data:`DECODER_FIELDS` are found), or be replaced by
``encode=``/``decode=`` callables. Recipes for two common collections are in the docs' recipes page. Both give
``log_joint(x, z) = log p(x | z) + log N(z; 0, I)`` per example, with the optional ``encode``, ``prior``,
``log_likelihood`` and ``likelihood_mean`` that inference uses when present.

Example:
    >>> import torch
    >>> model = DecoderModel(torch.nn.Linear(2, 5), likelihood="bernoulli", latent_dim=2)
    >>> model.log_joint(torch.ones(3, 5), torch.zeros(3, 2)).shape
    torch.Size([3])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, cast

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, Independent, Normal

from learned_inference.latent_space import Latents, LatentSpace
from learned_inference.likelihoods import Likelihood, make_likelihood

__all__ = [
    "DECODER_FIELDS",
    "ENCODER_FIELDS",
    "DecoderModel",
    "EncoderDecoder",
    "VAEModel",
    "encoder_output",
    "gaussian_standard_log_prob",
    "standard_normal_prior",
]

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


class EncoderDecoder(Protocol):
    """A VAE as :class:`VAEModel` takes it by default: ``encode(x)`` and ``decode(z)`` methods (usually an
    ``nn.Module``), returning tensors, tuples or output objects (see :class:`VAEModel`)."""

    def encode(self, x: Tensor, /) -> Any: ...

    def decode(self, z: Tensor, /) -> Any: ...


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
                     f"latent_dim={space.latent_dim}); check that latent_dim matches the encoder")


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
