"""λ₀ strategies: where refinement starts, one object shared by every method.

An :class:`InitialEstimate` gives λ_0 for a batch x:

* ``"prior"``: the family's start from the prior (N(0, I) for a Gaussian), the same for every example;
* ``"encoder"``: the model's own ``encode(x)`` (its ``(loc, log_var)``);
* ``"highway"``: a highway encoder built for the family (its parameters train with the method);
* a callable x → ``(loc, log_var)``, or x → all of λ as a dict like ``result.params`` (a mixture's logits, a
  low-rank factor).

A ``(loc, log_var)`` pair starts the family through :meth:`~learned_inference.families.Family.from_diagonal` (a
low-rank Gaussian from that diagonal Gaussian exactly; a mixture cannot start so, and says so at construction).
Encoders keep their graph: an encoder learns from −L_0 (or through the steps). An explicit λ_0 for one call is
``init_params=`` of ``forward``/``infer``, which bypasses the strategy.

Example:
    >>> import torch
    >>> from learned_inference.families import DiagonalGaussian
    >>> from learned_inference.latent_space import LatentSpace
    >>> start = InitialEstimate(encoder=lambda x: (x[:, :2], torch.zeros(len(x), 2)), label="callable")
    >>> start(torch.ones(3, 4), family=DiagonalGaussian(), space=LatentSpace(2), flatten=None)["loc"]
    tensor([[1., 1.],
            [1., 1.],
            [1., 1.]])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from learned_inference.adapters import encoder_output
from learned_inference.block_family import BlockFamily
from learned_inference.families import Family, Params
from learned_inference.family_encoder import FamilyEncoder
from learned_inference.latent_space import LatentSpace
from learned_inference.model import WithEncoder
from learned_inference.networks import HighwayEncoder

__all__ = ["INIT_NAMES", "InitialEstimate", "make_initial"]

#: the named strategies
INIT_NAMES = ("prior", "encoder", "highway")

#: how the public form of λ (per variable) is turned into the flat one, validated (``InferenceMethod._flatten``)
Flatten = Callable[[dict[str, Any], Tensor], Params]

_SOURCES = {"encoder": "model.encode(x)", "highway": "the highway encoder", "callable": "the init= encoder"}


@dataclass(frozen=True)
class InitialEstimate:
    """λ_0 from the prior (``encoder`` None) or from an encoder's output.

    Attributes:
        encoder: x → ``(loc, log_var)`` or x → all of λ (a dict), or None for the prior.
        label: how the method was configured (``init=``), for messages and ``repr``.
    """

    encoder: Callable[[Tensor], Any] | None = None
    label: str = "prior"

    def __call__(self, x: Tensor, *, family: Family, space: LatentSpace, flatten: Flatten | None) -> Params:
        """λ_0 for the batch ``x`` (flat: a dict of ``[B, ...]`` tensors), with its graph to the encoder."""
        if self.encoder is None:
            return family.initial_params(x.shape[0], space.total_dim, dtype=x.dtype, device=x.device)
        out: Any = self.encoder(x)
        if isinstance(self.encoder, FamilyEncoder) and isinstance(family, BlockFamily):
            out = family.blocks(out)  # its flat λ in the public form, per variable
        keys = family.param_names if space.names is None else space.names
        if gives_all_params(family) and isinstance(out, Mapping) and set(out) == set(keys) and flatten is not None:
            return family.constrain(flatten(dict(out), x))
        loc, log_var = encoder_output(out, batch=x.shape[0], space=space, source=_SOURCES.get(self.label, self.label),
                                      fix="init=")
        params = family.from_diagonal(space.merge(loc), space.merge(log_var))
        if params is None:
            raise TypeError(f"family={family!r} needs an encoder returning all of λ, a dict with entries "
                            f"{list(keys)}; got {type(out).__name__} (init='highway' builds one)")
        return family.constrain(params)


def gives_all_params(family: Family) -> bool:
    """Whether λ has parameters beyond (loc, log_var) (a mixture's logits, a low-rank factor): then an encoder
    built for it returns all of λ as a dict."""
    return not set(family.param_names) <= {"loc", "log_var"}


def make_initial(
    init: str | Callable[[Tensor], Any], *, model: object, family: Family, space: LatentSpace, allow_prior: bool,
    hidden_size: int, num_layers: int,
) -> tuple[InitialEstimate, nn.Module | None]:
    """The strategy named by ``init`` (see the module docstring), and the encoder module it built (to register on
    the method, so that it trains and saves with it), if any.

    Raises:
        ValueError: an unknown ``init``; ``"encoder"`` for a model without ``encode``, or for a family that a
            ``(loc, log_var)`` pair cannot start.
    """
    if init == "prior" and allow_prior:
        return InitialEstimate(), None
    if init == "encoder":
        if not callable(getattr(model, "encode", None)):
            raise ValueError(f"init='encoder' needs model.encode(x) -> (loc, log_var); {type(model).__name__} has "
                             "none (use init='highway' to build an encoder, or init='prior')")
        zeros = torch.zeros(1, space.total_dim)
        prior = "start from the prior (init='prior'), " if allow_prior else ""
        if family.from_diagonal(zeros, zeros) is None:
            raise ValueError(f"init='encoder' starts from model.encode(x)'s (loc, log_var), but family={family!r} has "
                             f"parameters {list(family.param_names)}: use init='highway' (an encoder for all of λ), a "
                             f"callable returning λ as a dict, {prior}or pass init_params= (e.g. another method's "
                             "result.params, such as a RecursiveMixtureEncoder's)")
        return InitialEstimate(cast(WithEncoder, model).encode, "encoder"), None
    if init == "highway":
        built: nn.Module = (FamilyEncoder(family.param_sizes(space.total_dim), hidden_size=hidden_size,
                                          num_layers=num_layers) if gives_all_params(family)
                            else HighwayEncoder(space.total_dim, hidden_size=hidden_size, num_layers=num_layers))
        return InitialEstimate(built, "highway"), built
    if callable(init) and not isinstance(init, str):
        return InitialEstimate(init, "callable"), init if isinstance(init, nn.Module) else None
    options = "'prior', " if allow_prior else ""
    raise ValueError(f"init must be {options}'encoder', 'highway', or a callable x -> (loc, log_var), got {init!r}")
