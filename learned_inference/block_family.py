"""One posterior family per latent variable, over the flat λ that inference works on.

With several latent variables λ is one ``[B, D_total]`` tensor per parameter, the variables concatenated in the
order of the :class:`~learned_inference.latent_space.LatentSpace`, each variable's block as wide as its family says
(:meth:`~learned_inference.families.Family.param_sizes`: D_v, or D_v·r for a low-rank factor).
:class:`BlockFamily` applies each variable's own family to its block of columns: samples and constrained
parameters are concatenated, entropies and KLs summed

    H[q] = Σ_v H[q_v],     KL(q || p) = Σ_v KL(q_v || p_v),

and the posterior is one ``Distribution`` per variable (:meth:`BlockFamily.distributions`), or over the
concatenated z (:meth:`BlockFamily.distribution`, a :class:`BlockDistribution`: log q(z) = Σ_v log q_v(z_v)). The
families must share their parameter names (e.g. Gaussians with different ``log_var_bounds`` per level, or low-rank
Gaussians of different ranks), so that λ keeps one tensor per parameter, and draw plain samples (a mixture's
weighted points do not combine across variables). Every method builds a ``BlockFamily`` when ``latent_dim`` is a
dict.

Example:
    >>> import torch
    >>> from learned_inference.families import DiagonalGaussian
    >>> from learned_inference.latent_space import LatentSpace
    >>> family = BlockFamily({"z1": DiagonalGaussian(), "z2": DiagonalGaussian(log_var_bounds=(-4.0, 2.0))},
    ...                      space=LatentSpace({"z1": 3, "z2": 2}))
    >>> params = family.initial_params(4, 5, dtype=torch.float32, device=None)
    >>> family.constrain({"loc": params["loc"], "log_var": torch.full((4, 5), -9.0)})["log_var"][0]
    tensor([-9., -9., -9., -4., -4.])
    >>> q = family.distribution(params)
    >>> q.batch_shape, q.event_shape, q.log_prob(q.rsample()).shape
    (torch.Size([4]), torch.Size([5]), torch.Size([4]))
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from functools import reduce

import torch
from torch import Tensor
from torch.distributions import Distribution, constraints

from learned_inference.families import Family, Params, make_family
from learned_inference.latent_space import LatentSpace

__all__ = ["BlockDistribution", "BlockFamily"]


class BlockDistribution(Distribution):
    """The product of one distribution per latent variable, over the concatenated z ``[..., B, D_total]``.

    log q(z) = Σ_v log q_v(z_v),  H[q] = Σ_v H[q_v]; samples, means and variances are concatenated.

    Args:
        parts: a distribution with batch shape ``[B]`` and event shape ``[D_v]`` per variable, in layout order.
        space: the latent layout.
    """

    arg_constraints: dict = {}  # noqa: RUF012
    support = constraints.real_vector

    def __init__(self, parts: Mapping[str, Distribution], *, space: LatentSpace) -> None:
        self.parts, self.space = dict(parts), space
        first = next(iter(self.parts.values()))
        super().__init__(first.batch_shape, torch.Size([space.total_dim]), validate_args=False)

    @property
    def has_rsample(self) -> bool:  # type: ignore[override]  # a property where Distribution has a class attribute
        return all(part.has_rsample for part in self.parts.values())

    def rsample(self, sample_shape: torch.Size | list[int] | tuple[int, ...] = torch.Size()) -> Tensor:  # noqa: B008
        return torch.cat([part.rsample(torch.Size(sample_shape)) for part in self.parts.values()], -1)

    def sample(self, sample_shape: torch.Size | list[int] | tuple[int, ...] = torch.Size()) -> Tensor:  # noqa: B008
        return torch.cat([part.sample(torch.Size(sample_shape)) for part in self.parts.values()], -1)

    def log_prob(self, value: Tensor) -> Tensor:
        pieces = self.space.split(value)
        assert isinstance(pieces, dict)  # several variables
        return reduce(operator.add, [part.log_prob(pieces[v]) for v, part in self.parts.items()])

    def entropy(self) -> Tensor:
        return reduce(operator.add, [part.entropy() for part in self.parts.values()])

    @property
    def mean(self) -> Tensor:
        return torch.cat([part.mean for part in self.parts.values()], -1)

    @property
    def variance(self) -> Tensor:
        return torch.cat([part.variance for part in self.parts.values()], -1)


class BlockFamily(Family):
    """A :class:`~learned_inference.families.Family` that is a product of one family per latent variable.

    Args:
        families: a family (name or instance) for every variable of ``space``.
        space: the latent layout (several named variables).
    """

    def __init__(self, families: Mapping[str, str | Family], *, space: LatentSpace) -> None:
        if space.names is None or set(families) != set(space.names):
            expected = list(space.names) if space.names is not None else "a dict latent_dim"
            raise ValueError(f"family must give one family per latent variable {expected}, got {sorted(families)}")
        self.space = space
        self.families = {name: make_family(families[name]) for name in space.names}
        names = {family.param_names for family in self.families.values()}
        if len(names) != 1:
            got = {name: family.param_names for name, family in self.families.items()}
            raise ValueError(f"the per-variable families must share their parameter names, got {got}")
        weighted = [name for name, family in self.families.items()
                    if type(family).sample_weights is not Family.sample_weights]
        if weighted:
            raise ValueError(f"the families of {weighted} weight their points (sample_weights, e.g. a mixture's "
                             "strata), which do not combine across latent variables: such a family needs a single "
                             "latent vector (latent_dim as an int)")
        self.param_names = names.pop()
        self.stochastic = any(family.stochastic for family in self.families.values())

    def block_sizes(self) -> dict[str, dict[str, int]]:
        """The width of every parameter's block per variable: ``{name: family.param_sizes(D_name)}``."""
        return {v: f.param_sizes(self.space.sizes[v]) for v, f in self.families.items()}

    def param_sizes(self, dim: int) -> dict[str, int]:
        """The widths of the flat λ: each parameter's blocks summed over the variables."""
        if dim != self.space.total_dim:
            raise ValueError(f"dim must be the total latent size {self.space.total_dim}, got {dim}")
        sizes = self.block_sizes().values()
        return {p: sum(block[p] for block in sizes) for p in self.param_names}

    def blocks(self, params: Params) -> dict[str, Params]:
        """The flat λ split per variable: ``{name: {param: [B, width]}}``, widths from :meth:`block_sizes`."""
        sizes = self.block_sizes()
        pieces = {p: value.split([sizes[v][p] for v in self.families], dim=-1) for p, value in params.items()}
        return {v: {p: pieces[p][i] for p in params} for i, v in enumerate(self.families)}

    def _concat(self, blocks: Mapping[str, Params]) -> Params:
        return {p: torch.cat([blocks[v][p] for v in self.families], -1) for p in self.param_names}

    def initial_params(self, batch: int, dim: int, *, dtype: torch.dtype, device: torch.device | None) -> Params:
        if dim != self.space.total_dim:
            raise ValueError(f"dim must be the total latent size {self.space.total_dim}, got {dim}")
        return self._concat({v: f.initial_params(batch, self.space.sizes[v], dtype=dtype, device=device)
                             for v, f in self.families.items()})

    def _pieces(self, flat: Tensor) -> dict[str, Tensor]:
        pieces = self.space.split(flat)
        assert isinstance(pieces, dict)  # the space names several variables (checked at construction)
        return pieces

    def from_diagonal(self, loc: Tensor, log_var: Tensor) -> Params | None:
        """Every variable's family started from its block of the pair, concatenated (None if one cannot start)."""
        locs, log_vars = self._pieces(loc), self._pieces(log_var)
        blocks = {v: f.from_diagonal(locs[v], log_vars[v]) for v, f in self.families.items()}
        if any(block is None for block in blocks.values()):
            return None
        return self._concat({v: block for v, block in blocks.items() if block is not None})

    def sample(self, params: Params, noise: Tensor) -> Tensor:
        blocks, noises = self.blocks(params), self._pieces(noise)
        return torch.cat([f.sample(blocks[v], noises[v]) for v, f in self.families.items()], -1)

    def entropy(self, params: Params) -> Tensor:
        blocks = self.blocks(params)
        return reduce(operator.add, [f.entropy(blocks[v]) for v, f in self.families.items()])

    def kl_divergence(self, params: Params, prior_loc: Tensor, prior_var: Tensor) -> Tensor | None:
        blocks, locs, variances = self.blocks(params), self._pieces(prior_loc), self._pieces(prior_var)
        kls = [f.kl_divergence(blocks[v], locs[v], variances[v]) for v, f in self.families.items()]
        present = [kl for kl in kls if kl is not None]
        return reduce(operator.add, present) if len(present) == len(kls) else None

    def constrain(self, params: Params) -> Params:
        blocks = self.blocks(params)
        return self._concat({v: f.constrain(blocks[v]) for v, f in self.families.items()})

    def natural_gradient(self, params: Params, grads: Params) -> Params:
        blocks, grad_blocks = self.blocks(params), self.blocks(grads)
        return self._concat({v: f.natural_gradient(blocks[v], grad_blocks[v]) for v, f in self.families.items()})

    def squared_fisher_norm(self, params: Params, step: Params) -> Tensor:
        blocks, step_blocks = self.blocks(params), self.blocks(step)
        return torch.stack([f.squared_fisher_norm(blocks[v], step_blocks[v]) for v, f in self.families.items()]).sum(0)

    def distribution(self, params: Params) -> Distribution:
        return BlockDistribution(self.distributions(params), space=self.space)

    def distributions(self, params: Params) -> dict[str, Distribution]:
        """The posterior of every variable from the flat λ, keyed by name."""
        blocks = self.blocks(params)
        return {v: f.distribution(blocks[v]) for v, f in self.families.items()}

    def __repr__(self) -> str:
        return f"BlockFamily({self.families})"
