"""The layout of the latent variables: one vector per example, or several named ones concatenated.

Inference works on one flat vector per example (``[..., D_total]``); :class:`LatentSpace` splits it into what the
user's ``log_joint`` expects (a tensor, or a dict of tensors by variable name) and merges it back.

Example:
    >>> import torch
    >>> space = LatentSpace({"z1": 3, "z2": 2})
    >>> space.block(torch.arange(5.0).expand(2, 5), "z2")
    tensor([[3., 4.],
            [3., 4.]])
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["LatentSpace", "Latents"]

#: latent values as a model takes them: a tensor for one latent vector, a dict of tensors for several
Latents = Tensor | dict[str, Tensor]


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

    @property
    def latent_dim(self) -> int | dict[str, int]:
        """The sizes in the form ``latent_dim`` takes: an int for one vector, a dict of sizes for several."""
        return self.total_dim if self.names is None else dict(self.sizes)

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
