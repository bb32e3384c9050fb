"""Where a Pyro model's latent sites live: which plate is amortized, and how local sites map to one flat λ.

A *local* site sits inside every amortized plate; all other latent sites are *global*. Inference for the local
sites works in unconstrained space on one flat vector per datapoint: a tensor ``[*left, D]`` whose leading
dimensions ``left`` are the batch dimensions from the outermost active plate (vectorized particles, outer
sample plates) down to the innermost amortized plate, and whose last dimension concatenates, site after site,
everything a datapoint owns to the right of that plate (inner plates and event dimensions). With the bijection
T_s = ``biject_to(support_s)`` of each site, the log density of the model in these coordinates is

    log p(T(u)) + Σ_s log |det ∂T_s(u_s)/∂u_s|.

Example:
    >>> import torch, pyro, pyro.distributions as dist
    >>> from pyro import poutine
    >>> def model(x):
    ...     with pyro.plate("data", len(x)):
    ...         z = pyro.sample("z", dist.LogNormal(0.0, 1.0).expand([2]).to_event(1))
    ...         pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)
    >>> trace = poutine.trace(model).get_trace(torch.ones(3, 2))
    >>> plates = find_amortized_plates(trace, None)
    >>> layout = local_layout(trace, plates)
    >>> values, log_det = layout.constrain(torch.zeros(3, layout.total_dim))
    >>> plates, values["z"].shape, log_det.shape
    (('data',), torch.Size([3, 2]), torch.Size([3]))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import torch
from pyro.distributions.util import sum_rightmost
from pyro.infer.autoguide.utils import helpful_support_errors
from pyro.poutine.indep_messenger import CondIndepStackFrame
from pyro.poutine.runtime import Message
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample
from torch import Tensor
from torch.distributions import Transform, biject_to, constraints
from torch.distributions.constraints import Constraint

__all__ = [
    "LocalLayout",
    "LocalSite",
    "SiteDistribution",
    "check_continuous",
    "enumerated",
    "find_amortized_plates",
    "left_shape",
    "local_layout",
    "on_a_simplex",
    "sample_site",
    "site_plates",
]


class SiteDistribution(Protocol):
    """What the integration reads from the distribution of a sample site (a Pyro distribution)."""

    @property
    def support(self) -> Constraint: ...

    @property
    def batch_shape(self) -> torch.Size: ...

    @property
    def event_shape(self) -> torch.Size: ...

    @property
    def event_dim(self) -> int: ...

    def log_prob(self, value: Tensor, *args: Any, **kwargs: Any) -> Tensor: ...


def sample_site(site: Message) -> tuple[SiteDistribution, Tensor]:
    """A sample site's distribution and value.

    Pyro's ``Message`` types ``fn`` as any callable and ``value`` as optional; at a sample site of a trace they
    are a Pyro distribution and its (sampled or observed) tensor.
    """
    return cast(SiteDistribution, site["fn"]), cast(Tensor, site["value"])


def site_plates(site: Message) -> set[str]:
    """Names of the vectorized plates a trace site sits in."""
    return {frame.name for frame in site["cond_indep_stack"] if frame.vectorized}


def enumerated(site: Message) -> bool:
    """Whether the model enumerates this site in parallel (``infer={"enumerate": "parallel"}``): a discrete site that
    ``TraceEnum_ELBO`` sums out of the model, and the guide leaves unguided (and sums out in its refinement)."""
    return site["type"] == "sample" and not site["is_observed"] and (site["infer"] or {}).get("enumerate") == "parallel"


def check_continuous(trace: Trace) -> None:
    """Raises ``ValueError`` naming the first discrete latent site (not enumerated by the model) and how to guide
    it instead."""
    for name, site in trace.iter_stochastic_nodes():
        if enumerated(site):
            continue
        support = sample_site(site)[0].support
        if support.is_discrete:
            raise ValueError(
                f"AutoIterativeNormal needs continuous latent sites, but site {name!r} is discrete "
                f"(support {support}). Continuous inference cannot handle discrete sample site {name!r}: consider "
                "enumerating that variable as documented in https://pyro.ai/examples/enumeration.html "
                "(infer={'enumerate': 'parallel'} in the model, trained with TraceEnum_ELBO), and hide it from this "
                f"guide: AutoIterativeNormal(poutine.block(model, hide=[{name!r}])). To guide it instead, compose "
                "guides: guide = AutoGuideList(model); "
                f"guide.append(AutoIterativeNormal(poutine.block(model, hide=[{name!r}]))); "
                f"guide.append(AutoDiscreteParallel(poutine.block(model, expose=[{name!r}]))), "
                "trained with TraceEnum_ELBO."
            )


def find_amortized_plates(trace: Trace, amortized_plates: str | Sequence[str] | None,
                          data_plates: set[str] | None = None) -> tuple[str, ...]:
    """The plates to amortize over: the one plate the latent sites sit in, or the names given.

    Args:
        trace: a prototype trace holding the model's latent sites only.
        amortized_plates: a plate name, a sequence of them, or None to detect the single plate.
        data_plates: when detecting, the plates that hold an observed site (``obs=`` or ``pyro.factor``): a plate
            of latent sites without one has no data to amortize over (an encoder would give every element the
            same posterior), so its sites are fit per element like ``AutoNormal``'s. None: every plate counts.

    Returns:
        The plate names; empty when detecting and no latent site sits in a plate that holds data (every latent
        site is then global).
    """
    used = set().union(*(site_plates(site) for _, site in trace.iter_stochastic_nodes()))
    if amortized_plates is None:
        if len(used) > 1:
            raise ValueError(
                f"the latent sites sit in several plates {sorted(used)}, so the plate of datapoints is ambiguous: "
                "name it, e.g. AutoIterativeNormal(model, amortized_plates=('data',))"
            )
        return tuple(used if data_plates is None else used & data_plates)
    names = (amortized_plates,) if isinstance(amortized_plates, str) else tuple(amortized_plates)
    missing = [name for name in names if name not in used]
    if not names or missing:
        raise ValueError(
            f"amortized_plates must name plates that hold latent sites, one of {sorted(used)}; "
            f"got {amortized_plates!r}"
        )
    return names


@dataclass(frozen=True)
class LocalSite:
    """One local latent site in the flat per-datapoint layout.

    Attributes:
        name: the site name.
        transform: ``biject_to(support)``, unconstrained → constrained.
        event_dim: event dimensions of the unconstrained value.
        constrained_event_dim: event dimensions of the site itself.
        inner_shape: the unconstrained shape one datapoint owns (dimensions right of the amortized plate).
        init_loc: the initial unconstrained value, ``[prod(inner_shape)]`` (averaged over the datapoints).
    """

    name: str
    transform: Transform
    event_dim: int
    constrained_event_dim: int
    inner_shape: tuple[int, ...]
    init_loc: Tensor

    @property
    def size(self) -> int:
        return math.prod(self.inner_shape)

    def value(self, u: Tensor) -> Tensor:
        """T(u), the site's value; a simplex-valued site is kept off the simplex's boundary.

        Every coordinate is at least 10⁶ / (the dtype's largest number), about 3·10⁻³³ in float32. Below that the
        model's log-density (a Dirichlet with a concentration under 1, a categorical's log-probability) has a
        gradient that overflows, and the stick-breaking map's backward turns it into NaN (measured on Pyro's LDA
        example: the update network's parameters became NaN at its 14th training step). Only coordinates already
        below the threshold move, by less than it.
        """
        value = self.transform(u)
        if on_a_simplex(self.transform.codomain):
            value = value.clamp(min=1e6 / torch.finfo(value.dtype).max)
        return value


def on_a_simplex(support: Constraint) -> bool:
    """Whether values of this support lie on a simplex (also as the event of a ``to_event`` distribution)."""
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support is constraints.simplex


@dataclass(frozen=True)
class LocalLayout:
    """The local sites, in model order, and the (innermost) amortized plate's dim.

    Attributes:
        sites: the local sites.
        plates: names of the amortized plates (none when every latent site is global).
        plate_dim: the dim of the innermost amortized plate (negative, counted over batch dimensions).
    """

    sites: tuple[LocalSite, ...]
    plates: tuple[str, ...]
    plate_dim: int = -1

    @property
    def total_dim(self) -> int:
        """D: the size of one datapoint's flat unconstrained vector."""
        return sum(site.size for site in self.sites)

    @property
    def init_loc(self) -> Tensor:
        """λ_0's location, ``[D]``."""
        return torch.cat([site.init_loc for site in self.sites])

    def split(self, flat: Tensor) -> dict[str, Tensor]:
        """``[..., D]`` → ``{name: [..., *inner_shape]}`` (unconstrained, site layout)."""
        pieces = flat.split([site.size for site in self.sites], dim=-1)
        return {
            site.name: piece.reshape(*flat.shape[:-1], *site.inner_shape)
            for site, piece in zip(self.sites, pieces, strict=True)
        }

    def with_inner_dims(self, flat: Tensor) -> Tensor:
        """``[*left, P]`` → ``[*left, 1, ..., 1, P]``: a size-1 dim for each batch dim right of the amortized plate
        (its inner plates), so that the plate's datapoints sit at ``plate_dim`` when sampled inside its plates."""
        return flat.reshape(*flat.shape[:-1], *(1,) * (-self.plate_dim - 1), flat.shape[-1])

    def constrain(self, flat: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """``[..., D]`` → (constrained site values, Σ_s log|det J_s| of shape ``[...]``)."""
        values, log_det = {}, flat.new_zeros(flat.shape[:-1])
        for site, u in zip(self.sites, self.split(flat).values(), strict=True):
            z = site.value(u)
            jacobian = site.transform.log_abs_det_jacobian(u, z)
            log_det = log_det + sum_rightmost(jacobian, jacobian.dim() - log_det.dim())
            values[site.name] = z
        return values, log_det

    def per_datapoint(self, tensor: Tensor, *, event_dim: int = 0) -> Tensor:
        """Sums a site's ``[*batch, *event]`` tensor over everything right of the amortized plate: ``[..., b]``."""
        return sum_rightmost(tensor, event_dim - self.plate_dim - 1)

    def datapoint_features(self, value: Tensor, *, event_dim: int) -> Tensor:
        """A site's value ``[*batch, *event]`` → ``[..., b, F]`` (flattened right of the amortized plate)."""
        keep = value.dim() - event_dim + self.plate_dim + 1
        return value.reshape(*value.shape[:keep], -1)


def local_layout(trace: Trace, plates: tuple[str, ...]) -> LocalLayout:
    """The layout of the latent sites of ``trace`` that sit in every plate of ``plates``.

    Raises ``ValueError`` if a latent site sits in some but not all of them, or if a local site sits in a plate
    outside the amortized plates that is not itself amortized (its datapoints would not be independent).
    """
    if not plates:
        return LocalLayout(sites=(), plates=())
    dims = {
        frame.name: frame.dim
        for _, site in trace.iter_stochastic_nodes()
        for frame in site["cond_indep_stack"]
        if frame.dim is not None  # vectorized
    }
    plate_dim = max(dims[name] for name in plates)
    sites = []
    for name, site in trace.iter_stochastic_nodes():
        inside = site_plates(site) & set(plates)
        if not inside or site_is_subsample(site):  # a nested plate's subsample indices are no latent site
            continue
        if inside != set(plates):
            raise ValueError(
                f"site {name!r} sits in plates {sorted(inside)} but not in all amortized plates {list(plates)}; "
                "pass amortized_plates naming the plates every local site shares"
            )
        outer = [f.name for f in site["cond_indep_stack"] if f.dim is not None and f.dim < plate_dim]
        if any(plate not in plates for plate in outer):
            raise ValueError(
                f"site {name!r} sits in plates {outer} outside the amortized plate at dim {plate_dim}; "
                f"add them to amortized_plates={(*plates, *(p for p in outer if p not in plates))!r}"
            )
        fn, value = sample_site(site)
        with helpful_support_errors(site):
            transform = biject_to(fn.support)
            u = transform.inv(value.detach())
        event_dim = fn.event_dim + u.dim() - value.dim()
        keep = u.dim() - event_dim + plate_dim + 1
        sites.append(
            LocalSite(
                name=name,
                transform=transform,
                event_dim=event_dim,
                constrained_event_dim=fn.event_dim,
                inner_shape=tuple(u.shape[keep:]),
                init_loc=u.reshape(-1, math.prod(u.shape[keep:])).mean(0),
            )
        )
    return LocalLayout(sites=tuple(sites), plates=plates, plate_dim=plate_dim)


def left_shape(frames: Sequence[CondIndepStackFrame], *, plate_dim: int) -> tuple[int, ...]:
    """The batch shape from the outermost frame's dim down to ``plate_dim``: sizes where frames are, else 1.

    Every frame must be a vectorized plate's (a ``TypeError`` names a sequential one).
    """
    dims = [_vectorized_dim(frame) for frame in frames]
    length = max([-plate_dim, *(-dim for dim in dims)]) + plate_dim + 1
    shape = [1] * length
    for frame, dim in zip(frames, dims, strict=True):
        position = dim + length - plate_dim - 1
        if position >= length:
            raise ValueError(
                f"plate {frame.name!r} at dim {dim} is inside the amortized plate's dim {plate_dim}; "
                "outer plates around the guide must use dims left of the model's plates"
            )
        shape[position] = frame.size
    return tuple(shape)


def _vectorized_dim(frame: CondIndepStackFrame) -> int:
    if frame.dim is None:
        raise TypeError(f"plate {frame.name!r} is sequential (it has no dim): only vectorized plates have batch dims")
    return frame.dim
