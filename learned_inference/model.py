"""The model contract and adapters that turn a user's VAE into a :class:`LatentModel`.

A latent model is anything with ``log_joint(x, z)`` returning log p(x, z) per example: shape ``[B]`` for ``z`` of
shape ``[B, D]`` and ``[S, B]`` for ``z`` of shape ``[S, B, D]``. With several latent variables ``z`` is a
``dict[str, Tensor]``. The model must not couple examples (no batch norm in training mode, no mean over the
batch), so the gradient of the summed ELBO is exactly the per-example gradient.

Optional methods, used when present:

* ``encode(x)`` → ``(loc, log_var)``: an initial guess for the posterior (and the standard-encoder baseline).
* ``log_likelihood(x, z)`` and ``prior()`` (a ``torch.distributions.Distribution`` over z with event shape
  ``[D]``): enable the analytic KL term of the ELBO.
* ``likelihood_mean(z)`` → E[x | z] and ``prior()``: enable the error encodings εx, εz.

Example:
    >>> import torch
    >>> from learned_inference.model import DecoderModel
    >>> model = DecoderModel(torch.nn.Linear(2, 5), likelihood="bernoulli", latent_dim=2)
    >>> model.log_joint(torch.ones(3, 5), torch.zeros(3, 2)).shape
    torch.Size([3])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, Independent, Normal

from learned_inference.likelihoods import Likelihood, make_likelihood

__all__ = [
    "DecoderModel",
    "EncoderDecoder",
    "LatentModel",
    "LatentSpace",
    "Latents",
    "VAEModel",
    "check_log_joint",
    "check_model",
]

Latents = Tensor | dict[str, Tensor]


@runtime_checkable
class LatentModel(Protocol):
    """Anything with ``log_joint(x, z)`` returning one log p(x, z) per example.

    ``z`` is a tensor for a single latent variable and a dict of tensors (``Latents``) for several; which one
    is set by ``latent_dim`` at run time, so ``z`` is typed ``Any`` here: a model typed ``z: Tensor``,
    ``z: dict[str, Tensor]`` or ``z: Latents`` is a ``LatentModel`` alike.
    """

    def log_joint(self, x: Tensor, z: Any) -> Tensor: ...


class EncoderDecoder(Protocol):
    """A VAE as :class:`VAEModel` takes it: ``encode(x)`` and ``decode(z)`` methods (usually an ``nn.Module``)."""

    def encode(self, x: Tensor, /) -> Any: ...

    def decode(self, z: Tensor, /) -> Tensor: ...


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


def _flatten_leading(decoder: Callable[[Tensor], Tensor], z: Tensor) -> Tensor:
    """Runs ``decoder`` on ``[..., D]`` as one ``[N, D]`` batch, restoring the leading dimensions after."""
    leading = z.shape[:-1]
    out = decoder(z.reshape(-1, z.shape[-1]))
    return out.reshape(*leading, *out.shape[1:])


class DecoderModel(nn.Module):
    """A latent model built from a decoder, a likelihood name and an N(0, I) prior.

    log p(x, z) = log p(x | decoder(z)) + log N(z; 0, I).

    Args:
        decoder: maps ``[N, D]`` latents to the likelihood's parameters ``[N, *event]`` (logits for
            ``"bernoulli"``, the mean for ``"gaussian"``, logits for ``"multinomial"``). Extra leading sample
            dimensions are flattened before the call, so any 2-D-input decoder (MLP or convolutional) works.
        likelihood: a name (``"bernoulli"``, ``"bernoulli-probs"``, ``"gaussian"``, ``"multinomial"``) or a
            :class:`~learned_inference.likelihoods.Likelihood`.
        latent_dim: the size of z.
        encoder: optional module mapping x to ``(loc, log_var)``; enables ``encode``.
        **likelihood_options: passed to the likelihood (e.g. ``log_var=-2.0, learn_variance=True``).

    Example:
        >>> import torch
        >>> model = DecoderModel(torch.nn.Linear(4, 10), likelihood="gaussian", latent_dim=4, log_var=-1.0)
        >>> model.log_joint(torch.zeros(8, 10), torch.zeros(2, 8, 4)).shape
        torch.Size([2, 8])
    """

    def __init__(
        self,
        decoder: Callable[[Tensor], Tensor],
        *,
        likelihood: str | Likelihood = "bernoulli",
        latent_dim: int,
        encoder: nn.Module | None = None,
        **likelihood_options: Any,
    ) -> None:
        super().__init__()
        if not callable(decoder):
            raise TypeError(f"decoder must be callable (an nn.Module), got {type(decoder).__name__}")
        self.decoder = decoder
        self.likelihood = make_likelihood(likelihood, **likelihood_options)
        self.latent_space = LatentSpace(latent_dim)
        self.encoder = encoder

    def decode(self, z: Tensor) -> Tensor:
        """The decoder's output (likelihood parameters) for ``z`` of shape ``[..., D]``."""
        return _flatten_leading(self.decoder, z)

    def log_likelihood(self, x: Tensor, z: Tensor) -> Tensor:
        """log p(x | z), shape ``z.shape[:-1]``."""
        return self.likelihood.log_prob(self.decode(z), x)

    def likelihood_mean(self, z: Tensor) -> Tensor:
        """E[x | z], shape ``[..., *event]``."""
        return self.likelihood.mean(self.decode(z))

    def prior(self) -> Distribution:
        """N(0, I) over ``D`` dimensions (event shape ``[D]``)."""
        p = next(iter(self.parameters()), None)
        dtype, device = (p.dtype, p.device) if p is not None else (torch.get_default_dtype(), None)
        zeros = torch.zeros(self.latent_space.total_dim, dtype=dtype, device=device)
        return Independent(Normal(zeros, torch.ones_like(zeros)), 1)

    def log_prior(self, z: Tensor) -> Tensor:
        """log N(z; 0, I), shape ``z.shape[:-1]``."""
        return gaussian_standard_log_prob(z)

    def log_joint(self, x: Tensor, z: Tensor) -> Tensor:
        """log p(x, z) = log p(x | z) + log p(z)."""
        return self.log_likelihood(x, z) + self.log_prior(z)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(loc, log_var)`` from the encoder given at construction."""
        if self.encoder is None:
            raise AttributeError("this DecoderModel has no encoder: pass encoder=... to use encode()")
        loc, log_var = self.encoder(x)
        return loc, log_var


def gaussian_standard_log_prob(z: Tensor) -> Tensor:
    """log N(z; 0, I) summed over the last dimension."""
    return -0.5 * (z.square() + torch.log(torch.tensor(2 * torch.pi, dtype=z.dtype))).sum(-1)


class VAEModel(nn.Module):
    """Wraps a VAE object with ``encode(x)`` and ``decode(z)`` (the common shape of community VAE collections).

    ``encode`` may return ``(loc, log_var)`` or a list/tuple whose first two entries are those; ``decode``
    returns the likelihood's parameters for ``z`` of shape ``[N, D]``.

    Args:
        vae: the user's VAE (its parameters stay its own; this wrapper registers it as a submodule).
        likelihood: as in :class:`DecoderModel`; use ``"bernoulli-probs"`` if ``decode`` ends in a sigmoid.
        latent_dim: the size of z.
        **likelihood_options: passed to the likelihood.

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
    """

    def __init__(
        self, vae: EncoderDecoder, *, likelihood: str | Likelihood = "bernoulli", latent_dim: int,
        **likelihood_options: Any,
    ) -> None:
        super().__init__()
        for method in ("encode", "decode"):
            if not callable(getattr(vae, method, None)):
                raise TypeError(f"vae must have a callable {method}() method; {type(vae).__name__} has none")
        self.vae = vae
        self.model = DecoderModel(vae.decode, likelihood=likelihood, latent_dim=latent_dim, **likelihood_options)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = self.vae.encode(x)
        if not isinstance(out, list | tuple) or len(out) < 2:
            raise ValueError(f"vae.encode(x) must return (loc, log_var) or a list starting with them, got {type(out)}")
        return out[0], out[1]

    def log_likelihood(self, x: Tensor, z: Tensor) -> Tensor:
        return self.model.log_likelihood(x, z)

    def likelihood_mean(self, z: Tensor) -> Tensor:
        return self.model.likelihood_mean(z)

    def prior(self) -> Distribution:
        return self.model.prior()

    def log_prior(self, z: Tensor) -> Tensor:
        return self.model.log_prior(z)

    def log_joint(self, x: Tensor, z: Tensor) -> Tensor:
        return self.model.log_joint(x, z)


def check_model(model: object) -> None:
    """Raises ``TypeError`` unless ``model`` has a callable ``log_joint``."""
    if not callable(getattr(model, "log_joint", None)):
        raise TypeError(
            f"model must have a log_joint(x, z) method returning log p(x, z) per example; "
            f"{type(model).__name__} has none. Wrap a decoder with DecoderModel(decoder, likelihood=..., "
            "latent_dim=...) or a VAE with encode/decode methods with VAEModel(vae, likelihood=..., latent_dim=...)."
        )


def check_log_joint(model: LatentModel, x: Tensor, space: LatentSpace, *, num_samples: int) -> None:
    """Calls ``log_joint`` once on zeros and checks it returns one value per example (and per sample)."""
    batch = x.shape[0]
    shape = (num_samples, batch) if num_samples > 1 else (batch,)
    z = space.split(torch.zeros(*shape, space.total_dim, dtype=x.dtype, device=x.device))
    z_desc = [*shape, space.total_dim] if space.names is None else {k: [*shape, v] for k, v in space.sizes.items()}
    try:
        with torch.no_grad():
            out = model.log_joint(x, z)
    except Exception as error:
        raise ValueError(
            f"model.log_joint(x, z) failed for x of shape {list(x.shape)} and z of shape {z_desc} "
            f"(latent_dim={space.sizes if space.names is not None else space.total_dim}): {error!r}. Check that "
            "latent_dim matches the model (a dict of sizes for several latent variables)."
        ) from error
    if not isinstance(out, Tensor):
        raise TypeError(f"model.log_joint(x, z) must return a Tensor, got {type(out).__name__}")
    if tuple(out.shape) != shape:
        z_shape = [*shape, space.total_dim]
        hint = ""
        if out.dim() > len(shape):
            hint = " It looks unreduced: sum log p(x | z) over the data dimensions."
        elif out.dim() < len(shape):
            hint = " It looks reduced over the batch: return one value per example (no mean or sum over the batch)."
        raise ValueError(
            f"model.log_joint(x, z) must return shape {list(shape)} for x of shape {list(x.shape)} and z of "
            f"shape {z_shape}, got {list(out.shape)}.{hint}"
        )
