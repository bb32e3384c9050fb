"""A Pyro model seen as a :class:`~learned_inference.model.LatentModel` over its local (per-datapoint) sites.

For datapoint i, with the global latents g fixed and the local latents z_i = T(u_i) given in unconstrained
coordinates u_i, the log-joint is the sum of the log densities of every site inside the amortized plate at i,
plus the log-Jacobian of T (see :mod:`.layout`):

    log p(x_i, z_i | g) = Σ_{sites s in the plate} w_s · log p_s(·)[i] + Σ_s log |det ∂T_s(u_{i,s})/∂u_{i,s}|,

where w_s is the site's scale without the amortized plate's subsampling factor (so user scales such as KL
annealing are kept, and the result is per datapoint). The model runs once for the whole batch, conditioned on
g, z and the guide's subsample indices, inside ``poutine.block`` so that nothing leaks into enclosing traces.
Sites outside the plate do not enter: the model must not couple datapoints through them.

Example:
    >>> import torch, pyro, pyro.distributions as dist
    >>> from pyro import poutine
    >>> def model(x):
    ...     with pyro.plate("data", len(x)):
    ...         z = pyro.sample("z", dist.Normal(0.0, 1.0))
    ...         pyro.sample("x", dist.Normal(z, 1.0), obs=x)
    >>> from learned_inference.integrations.pyro.layout import find_amortized_plates, local_layout
    >>> x = torch.tensor([0.0, 2.0])
    >>> trace = poutine.block(poutine.trace(model).get_trace, hide_fn=lambda m: m["is_observed"])(x)
    >>> layout = local_layout(trace, find_amortized_plates(trace, None))
    >>> log_joint = LocalLogJoint(model, (x,), {}, layout=layout, left_shape=(2,), conditioned={})
    >>> log_joint.log_joint(None, torch.zeros(2, 1))  # log N(0; 0, 1) + log N(x; 0, 1)
    tensor([-1.8379, -3.8379])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, cast

import pyro
import torch
from pyro import poutine
from pyro.distributions import ExpandedDistribution, Independent, MaskedDistribution
from pyro.distributions.util import scale_and_mask
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import _ENUM_ALLOCATOR, Message
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample
from torch import Tensor
from torch.utils import _pytree as pytree

from learned_inference.families import Family, Params
from learned_inference.latent_space import LatentSpace
from learned_inference.objectives import Objective, PriorMoments
from learned_inference.train_mode import TrainModeRun

from .layout import LocalLayout, sample_site, site_plates

__all__ = ["LocalLogJoint", "TracedObjective"]


class LocalLogJoint:
    """``log_joint(x, u)`` → per-datapoint log p(x_i, T(u_i) | globals) for a Pyro model (one batched model run).

    Args:
        model: the Pyro model.
        args: the model's positional arguments for this call.
        kwargs: its keyword arguments.
        layout: the local sites' layout.
        left_shape: the datapoint batch shape ``left``; the flat ``u`` has shape ``[*lead, prod(left), D]``.
        conditioned: values to condition on besides the local sites: global latents (constrained) and plate
            subsample indices, keyed by site name.
        subsample_scale: the amortized plates' subsampling factor Π full_size / size, divided out of the site
            scales.
        train_mode: the context every model run is made in (:class:`~learned_inference.train_mode.TrainModeRun`:
            batch norms in training mode use the batch's statistics without updating them, dropouts draw the same
            masks at every run of one refinement), or None to run the model as it is.
        outer_plates: the plates around the guide (vectorized particles, outer sample plates); any other plate of
            the model at a dim left of the amortized plate is *inside* a datapoint (LDA's words, allocated at dim
            -2 left of the documents at -1): its dims are summed (log-densities) or moved right (observations)
            per datapoint.
        enumerate_dim: where the model's parallel-enumerated sites put their values (``first_available_dim``), or
            None when it enumerates none; their log-densities and those of the sites that depend on them are
            summed over the enumerated values (log-sum-exp), per datapoint.
        features: the observed sites :meth:`observations` reads (those observed when the guide was set up), or
            None for every observed site. A site observed in some calls only (a semi-supervised label) is then
            scored where observed, summed out where enumerated, and never read.
        drawn: values the guide drew before the refinement for latent sites it does not refine (earlier parts of
            an ``AutoGuideList``, sample statements of a guide function before the call): the model takes them as
            observed wherever it does not observe the site itself (``poutine.replay``'s rule), so they are scored,
            and read by :meth:`observations` where named in ``features``. A value may carry the dims of the guide's
            parallel enumeration (left of the amortized plate, counted in ``left_shape``).
    """

    def __init__(
        self,
        model: Callable[..., Any],
        args: tuple,
        kwargs: dict[str, Any],
        *,
        layout: LocalLayout,
        left_shape: tuple[int, ...],
        conditioned: dict[str, Tensor],
        subsample_scale: float = 1.0,
        train_mode: TrainModeRun | None = None,
        outer_plates: frozenset[str] = frozenset(),
        enumerate_dim: int | None = None,
        features: frozenset[str] | None = None,
        drawn: dict[str, Tensor] | None = None,
    ) -> None:
        self.model, self.args, self.kwargs = model, args, kwargs
        self.features = features
        self.drawn = {} if drawn is None else drawn
        self.layout, self.left_shape, self.conditioned = layout, left_shape, conditioned
        self.subsample_scale = subsample_scale
        self.train_mode = train_mode
        self.outer_plates, self.enumerate_dim = outer_plates, enumerate_dim
        #: the model's masks of the local latent sites in the last run (``poutine.mask`` in the model, e.g. padding)
        self.masks: dict[str, Any] = {}

    def trace(self, u: Tensor, *, validate: bool = True, enumerating: bool = True) -> tuple[Trace, Tensor]:
        """Runs the model at unconstrained ``u`` ``[*lead, prod(left), D]``: (trace, log|det J| ``[*lead, *left]``);
        without Pyro's argument validation when ``validate`` is False; enumerating the model's enumerated sites
        (when it has them) unless ``enumerating`` is False."""
        u = u.reshape(*u.shape[:-2], *self.left_shape, u.shape[-1])
        values, log_det = self.layout.constrain(u)
        enumerate_dim = self.enumerate_dim if enumerating else None
        if enumerate_dim is not None and u.dim() > len(self.left_shape) + 1:
            raise ValueError(
                "a model with enumerated sites is refined with one sample per step (num_samples=1): the samples' "
                "dimension would collide with the enumerated values' dimensions"
            )
        model = _Drawn(self.drawn)(poutine.condition(self.model, data={**self.conditioned, **values}))
        if enumerate_dim is not None:
            model = poutine.enum(model, first_available_dim=enumerate_dim)
        with poutine.block(), nullcontext() if self.train_mode is None else self.train_mode, \
                nullcontext() if validate else pyro.validation_enabled(False), _enumeration_kept():
            trace = poutine.trace(model).get_trace(*self.args, **self.kwargs)
        self.masks = {site.name: trace.nodes[site.name]["mask"] for site in self.layout.sites if site.name in trace}
        return trace, log_det

    def _plate_sites(self, trace: Trace) -> list[Message]:
        plates = set(self.layout.plates)
        return [
            site
            for site in trace.nodes.values()
            if site["type"] == "sample" and not site_is_subsample(site) and plates <= site_plates(site)
        ]

    def log_joint(self, x: Tensor | None, u: Tensor) -> Tensor:
        """log p(x_i, T(u_i) | globals) + log|det J|, shape ``u.shape[:-1]`` (``x`` is unused: the model has it).
        Masked local latents count with their (unmasked) prior term.

        The model runs without Pyro's argument validation: a step that reaches parameters a distribution refuses
        (a probability of exactly 1, an overflowing rate) gives that datapoint a non-finite value, which the
        engine's non-finite policy handles (the datapoint keeps its last finite λ, with a warning), where the
        validation error would stop the whole batch. The ELBO's own run of the model keeps validation."""
        trace, total = self.trace(u, validate=False)
        latent = {site.name for site in self.layout.sites}
        enumerated: Tensor | None = None  # the factors that carry the enumerated values, summed (broadcast)
        inner: set[int] = set()
        for site in self._plate_sites(trace):
            fn, value = sample_site(site)
            log_prob = fn.log_prob(value, *site["args"], **site["kwargs"])
            # A masked local latent (padding) is scored by its prior, unmasked, so its posterior stays the prior's
            # instead of drifting where nothing constrains it; the guide masks it as the model does (its ELBO terms
            # then cancel), so this changes what the steps see, not the ELBO.
            mask = None if site["name"] in latent else site["mask"]
            log_prob = scale_and_mask(log_prob, site["scale"] / self.subsample_scale, mask)
            dims = self._inner_dims(site)
            if self._carries_enumeration(log_prob):
                enumerated = log_prob if enumerated is None else enumerated + log_prob
                inner |= set(dims)
                continue
            total = total + self.layout.per_datapoint(self._sum_dims(log_prob, dims))
        if enumerated is not None:
            # Σ over each datapoint's enumerated values of p(value) p(what depends on it), then its inner plates
            marginal = torch.logsumexp(enumerated, dim=cast(int, self.enumerate_dim), keepdim=True)
            total = total + self.layout.per_datapoint(self._sum_dims(marginal, sorted(inner)))
        return total.reshape(*u.shape[:-1])

    def _inner_dims(self, site: Message) -> list[int]:
        """The batch dims of the plates inside a datapoint that sit left of the amortized plate (see the class)."""
        return [frame.dim for frame in site["cond_indep_stack"]
                if frame.dim is not None and frame.dim < self.layout.plate_dim
                and frame.name not in self.outer_plates and frame.name not in self.layout.plates]

    def _carries_enumeration(self, log_prob: Tensor) -> bool:
        dim = self.enumerate_dim
        return dim is not None and log_prob.dim() >= -dim and log_prob.shape[dim] > 1

    @staticmethod
    def _sum_dims(tensor: Tensor, dims: Sequence[int]) -> Tensor:
        """``tensor`` summed over the batch ``dims`` it has, keeping them (as size 1)."""
        present = [d for d in dims if tensor.dim() >= -d]
        return tensor.sum(present, keepdim=True) if present else tensor

    @torch.no_grad()
    def observations(self, u: Tensor) -> Tensor:
        """The observed values inside the amortized plate at ``u``, flattened per datapoint: ``[prod(left), F]``.

        A categorical observation is read one-hot, summed over the plates inside a datapoint: a document of word
        ids is read as its counts of each word, whatever the order of its words."""
        trace, _ = self.trace(u, enumerating=False)  # the observed values only: enumerated sites are drawn
        conditioned = {*self.conditioned, *(site.name for site in self.layout.sites)}
        features = []
        for site in self._plate_sites(trace):
            if not site["is_observed"] or site["name"] in conditioned or (site["infer"] or {}).get("_deterministic"):
                continue
            if self.features is not None and site["name"] not in self.features:
                continue
            fn, value = sample_site(site)
            shape = fn.batch_shape + fn.event_shape
            if not math.prod(fn.event_shape):  # nothing observed, e.g. pyro.factor's empty value
                continue
            # read in λ's dtype (a float64 model keeps them exact); a drawn value may carry enumerated dims
            value = value.to(u.dtype).expand(torch.broadcast_shapes(value.shape, shape))
            categorical = _categorical(fn)
            if categorical is not None:
                features.append(self._counts(site, value, *categorical, dtype=u.dtype))
                continue
            dims = [d - fn.event_dim for d in self._inner_dims(site) if value.dim() - fn.event_dim >= -d]
            if dims:  # the datapoint's inner plates, moved right of the amortized plate: [..., b, inner, event];
                # a size-1 dim stays in each one's place, so the dims left of it (particles) keep their places
                places = sorted(value.dim() + d for d in dims)
                value = value.movedim(dims, list(range(-fn.event_dim - len(dims), -fn.event_dim)))
                for place in places:
                    value = value.unsqueeze(place)
            features.append(self.layout.datapoint_features(value, event_dim=fn.event_dim + len(dims)))
        if not features:
            return u.new_zeros(math.prod(self.left_shape), 0)
        features = [self._fit_left(f) for f in features]
        width = [f.shape[-1] for f in features]
        return torch.cat([f.expand(*self.left_shape, w) for f, w in zip(features, width, strict=True)], -1).reshape(
            -1, sum(width)
        )

    def _fit_left(self, features: Tensor) -> Tensor:
        """``[..., b, F]`` without the size-1 dims left of ``left_shape`` (an inner plate's place, kept so that
        outer dims such as vectorized particles stay where ``left_shape`` has them)."""
        while features.dim() > len(self.left_shape) + 1 and features.shape[0] == 1:
            features = features.squeeze(0)
        return features

    def _counts(self, site: Message, value: Tensor, categories: int, masks: list[Any], *,
                dtype: torch.dtype) -> Tensor:
        """A categorical site's observed values as counts over its categories per datapoint ``[..., b, K]``:
        one-hot, times the site's masks (``poutine.mask``, ``.mask()``: padding counts nothing), summed over the
        plates inside a datapoint (left or right of the amortized plate's dim)."""
        counts = torch.nn.functional.one_hot(value.long(), categories).to(dtype)  # [*batch, K]
        for mask in (site["mask"], *masks):
            if isinstance(mask, Tensor):
                counts = counts * mask.to(dtype).unsqueeze(-1)
            elif mask is False:
                counts = counts * 0.0
        batch = counts.dim() - 1
        inner = [d for d in self._inner_dims(site) if batch >= -d]
        right = [d for d in range(self.layout.plate_dim + 1, 0) if batch >= -d]
        counts = counts.sum([d - 1 for d in inner], keepdim=True) if inner else counts
        return counts.sum([d - 1 for d in right]) if right else counts


def _categorical(fn: Any) -> tuple[int, list[Any]] | None:
    """The number of categories of a categorical distribution (also masked, expanded or with ``to_event(0)``) and
    the masks of its ``.mask()`` wrappers, or None for any other distribution."""
    masks = []
    while isinstance(fn, (MaskedDistribution, ExpandedDistribution)) or (
            isinstance(fn, Independent) and fn.reinterpreted_batch_ndims == 0):
        if isinstance(fn, MaskedDistribution):
            masks.append(fn._mask)
        fn = fn.base_dist
    return (int(fn.param_shape[-1]), masks) if isinstance(fn, torch.distributions.Categorical) else None


@contextmanager
def _enumeration_kept() -> Iterator[None]:
    """Restores Pyro's enumeration-dim allocator on exit: the model's own enumeration in a refinement run resets
    it, and the enclosing guide (enumerated by ``TraceEnum_ELBO``) still needs the dims it allocated."""
    state = {name: dict(value) if isinstance(value, dict) else value for name, value in vars(_ENUM_ALLOCATOR).items()}
    try:
        yield
    finally:
        vars(_ENUM_ALLOCATOR).clear()
        vars(_ENUM_ALLOCATOR).update(state)


class _Drawn(Messenger):
    """Sets the sample sites named in ``values`` that the model does not observe to those values, as observed."""

    def __init__(self, values: dict[str, Tensor]) -> None:
        super().__init__()
        self.values = values

    def _pyro_sample(self, msg: Message) -> None:
        if msg["name"] in self.values and not msg["is_observed"]:
            msg["value"] = self.values[msg["name"]]
            msg["is_observed"] = True


@dataclass(frozen=True)
class TracedObjective(Objective):
    """An :class:`~learned_inference.objectives.Objective` over a :class:`LocalLogJoint` whose ELBO and λ-gradient
    ``torch.jit.trace`` records as one operation (``JitTrace_ELBO``, ``torch.jit.trace`` of the guide).

    The JIT tracer cannot record the gradient of an operation that saves its output (``exp``, ``sigmoid``, ...:
    pytorch/pytorch#11967), so the log-joint's λ-gradient would be traced wrongly. Here it is an opaque
    ``torch.autograd.Function`` (a ``prim::PythonOp`` in the traced graph) that runs the model untraced at every
    call of the traced function, on that call's tensors (the model's arguments, the conditioned global sites, λ,
    the noise). Its outputs have no gradient, as in the untraced first-order refinement (the steps see the gradient
    detached). A traced graph with this operation runs, but cannot be saved with ``torch.jit.save``.
    """

    def elbo_and_grad(
        self, params: Params, x: Tensor, noise: Tensor, *, update_statistics: bool = False
    ) -> tuple[Tensor, Params]:
        """Per-example ELBO ``[B]`` and ∇_λ L, through :class:`_ElboAndGrad` (a guide never trains the model with
        it: ``update_statistics`` has no effect)."""
        log_joint = self.model
        assert isinstance(log_joint, LocalLogJoint)
        leaves, tree = pytree.tree_flatten((log_joint.args, log_joint.kwargs, log_joint.conditioned, log_joint.drawn))
        positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor)]
        names = list(params)
        spec = _OpSpec(
            model=log_joint.model, layout=log_joint.layout, left_shape=log_joint.left_shape,
            subsample_scale=log_joint.subsample_scale, objective=(self.family, self.space, self.prior), tree=tree,
            leaves=[None if i in positions else leaf for i, leaf in enumerate(leaves)], positions=positions,
            shapes=[tuple(map(int, leaves[i].shape)) for i in positions], names=names,
        )
        tensors = [leaves[i] for i in positions] + [params[n] for n in names] + [x, noise]
        values, *grads = _ElboAndGrad.apply(spec, *(t.detach() for t in tensors))
        return values, dict(zip(names, grads, strict=True))


@dataclass(frozen=True)
class _OpSpec:
    """What :class:`_ElboAndGrad` rebuilds the log-joint from (stored in the traced graph; holds no tensor)."""

    model: Callable[..., Any]
    layout: LocalLayout
    left_shape: tuple[int, ...]
    subsample_scale: float
    objective: tuple[Family, LatentSpace, PriorMoments | None]
    tree: pytree.TreeSpec
    leaves: list[Any]
    positions: list[int]
    shapes: list[tuple[int, ...]]
    names: list[str]

    def evaluate(self, tensors: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """(ELBO, *∇_λ L) from the tensors: the model's tensor arguments and conditioned values, λ, x, the noise."""
        leaves = list(self.leaves)
        for i, tensor, shape in zip(self.positions, tensors, self.shapes, strict=False):
            if tuple(tensor.shape) != shape:
                raise ValueError(
                    f"AutoIterativeNormal was traced by torch.jit (JitTrace_ELBO) for arguments of shapes "
                    f"{self.shapes}, and is now called with a {tuple(tensor.shape)} tensor where it had {shape}: its "
                    "traced graph has the plate sizes built in. Give the traced ELBO data of one shape (e.g. "
                    "mini-batches of one size: DataLoader(..., drop_last=True)), or train "
                    "with the non-JIT ELBO (Trace_ELBO, IterativeTrace_ELBO)."
                )
            leaves[i] = tensor
        args, kwargs, conditioned, drawn = pytree.tree_unflatten(leaves, self.tree)
        rest = tensors[len(self.positions):]
        params, (x, noise) = dict(zip(self.names, rest, strict=False)), rest[len(self.names):]
        log_joint = LocalLogJoint(self.model, args, kwargs, layout=self.layout, left_shape=self.left_shape,
                                  conditioned=conditioned, subsample_scale=self.subsample_scale, drawn=drawn)
        values, grads = Objective(log_joint, *self.objective).elbo_and_grad(params, x, noise)
        return values, *(grads[n] for n in self.names)


class _ElboAndGrad(torch.autograd.Function):
    """The ELBO and its λ-gradient as one operation: untraced inside, without gradient outside."""

    @staticmethod
    def forward(ctx: Any, spec: _OpSpec, *tensors: Tensor) -> tuple[Tensor, ...]:
        ctx.num_inputs = len(tensors)
        with _untraced():
            return spec.evaluate(tensors)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[None, ...]:
        return (None,) * (1 + ctx.num_inputs)


@contextmanager
def _untraced() -> Iterator[None]:
    """Pauses the JIT tracer (its recording of this operation's inside would fail on the gradient)."""
    state = torch._C._get_tracing_state()
    torch._C._set_tracing_state(None)  # type: ignore[attr-defined]  # private: no public pause
    try:
        yield
    finally:
        torch._C._set_tracing_state(state)  # type: ignore[attr-defined]  # private: no public resume
