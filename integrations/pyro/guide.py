"""``AutoIterativeNormal``: an amortized Pyro autoguide whose per-datapoint posteriors are refined by a learned
update network (iterative amortized inference, Marino, Yue & Mandt 2018).

For every datapoint i of the amortized plate, the local latent sites get one diagonal Normal posterior
q(u_i) = N(μ_i, diag σ²_i) in unconstrained coordinates (z_i = T(u_i), ``T = biject_to(support)``). Starting
from λ_0 = (μ_0, log σ²_0) (the ``init_loc_fn`` value and unit scale, shared by all datapoints), each of the
``num_steps`` steps evaluates the per-datapoint ELBO and its exact λ-gradient (one batched model run,
:mod:`.log_joint`),

    L_t,i = E_{ε}[log p(x_i, T(μ_{t,i} + σ_{t,i} ε) | g) + log|det J_T|] + H[N(μ_{t,i}, σ²_{t,i})],

and applies the learned gated update (paper eq. 62, the core's :mod:`~learned_inference.updates`)

    λ_{t+1} = γ_t ⊙ λ_t + (1 − γ_t) ⊙ f_φ(enc(∇_λ L_t, x_i, λ_t)).

The steps run on the core's refinement engine (:func:`~learned_inference.engine.refine`: the same learned step,
non-finite policy and training loss as :class:`~learned_inference.IterativeInferenceOptimizer`). The guide then
samples from N(μ_T, σ²_T). Global sites (outside the amortized plate) get ordinary AutoNormal
parameters and are sampled first, so the refinement is conditioned on them. Because λ is a function of the data,
the guide infers new data without re-fitting.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from functools import partial
from typing import Any, cast

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.util import sum_rightmost
from pyro.infer.autoguide import AutoGuide, AutoNormal
from pyro.infer.autoguide.guides import prototype_hide_fn
from pyro.infer.autoguide.initialization import InitMessenger, init_to_feasible
from pyro.poutine.indep_messenger import CondIndepStackFrame
from pyro.poutine.messenger import Messenger
from pyro.poutine.replay_messenger import ReplayMessenger
from pyro.poutine.runtime import _PYRO_STACK, Message, NonlocalExit, get_plates
from pyro.poutine.trace_messenger import TraceMessenger
from pyro.poutine.util import site_is_subsample
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils import _pytree as pytree

from learned_inference.encodings import (
    DEFAULT_ENCODING,
    Concat,
    Data,
    Encoding,
    FeatureShapes,
    PosteriorParams,
    make_encoding,
)
from learned_inference.engine import Training, refine
from learned_inference.families import DiagonalGaussian, Family, Params, make_family
from learned_inference.latent_space import LatentSpace
from learned_inference.learned_step import learned_step
from learned_inference.low_rank import LowRankGaussian
from learned_inference.networks import UpdateNetwork, make_network
from learned_inference.objectives import Objective, UnscoredObjective, sample_noise
from learned_inference.train_mode import TrainModeRun, batch_norm_error
from learned_inference.updates import make_update
from learned_inference.validation import check_int

from .elbo import record_refinement_loss
from .layout import (
    LocalLayout,
    LocalSite,
    check_continuous,
    enumerated,
    find_amortized_plates,
    left_shape,
    local_layout,
    on_a_simplex,
    site_plates,
)
from .log_joint import LocalLogJoint, TracedObjective

__all__ = ["AutoAmortizedNormal", "AutoIterativeNormal"]

#: the seed of the refinement noise in :meth:`AutoIterativeNormal.median` and ``quantiles`` (deterministic)
SUMMARY_SEED = 0


def _inner_step_weights(num_steps: int, batch: int, *, scale: float) -> list[float]:
    """w_t = s for t = 1..T−1 (summed over datapoints, scaled like Pyro's per-datapoint terms), 0 at t = 0 and T:
    step T is trained through λ_T by the Pyro ELBO itself."""
    return [0.0] + [scale] * max(num_steps - 1, 0) + [0.0] * min(num_steps, 1)


def _plate_indices(plate: pyro.plate) -> Tensor:
    with plate as indices:
        if indices is None:
            raise ValueError(
                f"the amortized plate {plate.name!r} gave no subsample indices: it has no size (created as "
                f"pyro.plate({plate.name!r}) with size=None) or was iterated sequentially before, so this guide "
                "cannot tell which datapoints the call holds. Give the plate its size where it is created, "
                f"pyro.plate({plate.name!r}, <number of datapoints>) (subsample_size= to subsample), in the model "
                "and, within an AutoGuideList, in its create_plates"
            )
        return indices


class AutoIterativeNormal(AutoGuide):
    """An amortized, iteratively refined diagonal Normal autoguide: a drop-in replacement for ``AutoNormal``.

    Latent sites inside the amortized plate get per-datapoint Normal posteriors (in unconstrained space)
    computed by ``num_steps`` learned refinement steps from the gradient of each datapoint's log-joint; latent
    sites outside it get AutoNormal parameters. The update network's parameters are ordinary guide parameters:
    ``SVI`` trains them with any ELBO (through the final step), and :class:`IterativeTrace_ELBO` trains them on
    every step (the paper's objective).

    Usage::

        guide = AutoIterativeNormal(model)
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), IterativeTrace_ELBO())  # or Trace_ELBO()
        for batch in loader:
            svi.step(batch)
        guide.median(new_data)                      # amortized: no re-fitting for new data
        Predictive(model, guide=guide, num_samples=100)(new_data)

    Notes:
        * The model must not couple datapoints through sites outside the amortized plate (the refinement only
          sees the plate's sites), and must broadcast over extra leading batch dimensions (as vectorized
          particles already require).
        * Discrete latent sites are refused; compose with ``AutoGuideList`` as the error message shows. A site
          the model enumerates (left unguided here) that the guide has drawn before this guide runs (an earlier
          part of an ``AutoGuideList``, a sample statement of a guide function before the call) is conditioned
          on: the refinement targets p(local sites | x, that draw), one refinement per value where the draw is
          enumerated in parallel (a label y gives q(z | x, y)). Sites hidden from this guide, or guided by later
          parts, are drawn from the model during the refinement.
        * ``median`` and ``quantiles`` take the model's arguments (the posterior depends on the data) and use a
          fixed seed for the refinement noise, so they are deterministic and consistent with each other.
        * Pickling keeps the model, so it must be picklable (a module-level function or module); otherwise
          round-trip through ``state_dict`` (call the new guide once on data first, as for every autoguide).

    Args:
        model: a Pyro model.
        amortized_plates: the plate(s) of datapoints; detected when the latent sites sit in exactly one plate and
            it holds an observed site (``obs=`` or ``pyro.factor``). A plate of latent sites without data has
            nothing to amortize over: its sites are then fit per element by the internal AutoNormal.
        num_steps: refinement steps T; 0 for an encoder only (one learned step from λ_0 that reads the data and
            not the model's gradient: ``encoding="data"``, as :class:`AutoAmortizedNormal`).
        num_samples: reparameterized samples per refinement gradient.
        init_loc_fn: per-site initialization (λ_0 takes its value averaged over the datapoints).
        init_scale: initial scale of the global sites' AutoNormal posteriors.
        global_guide: builds the guide of the global sites (latent sites outside the amortized plates) from the
            model with only those sites exposed, ``poutine.block(model, expose=[...])``: any Pyro guide over them,
            e.g. ``AutoDelta``, ``AutoLowRankMultivariateNormal``, or a function that samples them (called with the
            model's arguments). Default: ``AutoNormal(model, init_loc_fn=init_loc_fn, init_scale=init_scale)``.
            The local sites are refined given its draw; ``median`` and ``quantiles`` need its own.
        encoding: what the update network sees (default: log/sign gradient, data, λ).
        update: ``"gated"`` (eq. 62) or ``"residual"``.
        network: ``"highway"``, ``"lstm"``, ``"gru"`` or an :class:`~learned_inference.networks.UpdateNetwork`.
        hidden_size: units per layer of the update network.
        num_layers: hidden layers of the highway network.
        network_scale: c in (0, 1]: the update network's parameters θ are stored (in Pyro's param store, where the
            optimizer moves them) as θ / c and used as c · (θ / c). With Adam-type optimizers (step size ≈ the
            learning rate, whatever the gradient's scale) this multiplies the network's effective learning rate by
            c, and leaves the global sites' alone: with 1.0 (default) train at neural-network learning rates
            (Adam 1e-3 to 5e-3); for AutoNormal's typical 0.05, pass 0.1 (0.02 to 0.2 measured to work on a
            conjugate model; at 0.05 the network collapses to the prior). See docs/pyro.md, "Learning rates".
        create_plates: as for every ``AutoGuide``: returns the plate(s) to create, for subsampling.

    Example:
        >>> import torch, pyro, pyro.distributions as dist
        >>> def model(x):
        ...     scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
        ...     with pyro.plate("data", len(x)):
        ...         z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        ...         pyro.sample("x", dist.Normal(z, scale).to_event(1), obs=x)
        >>> guide = AutoIterativeNormal(model, num_steps=2, hidden_size=16)
        >>> sorted(guide(torch.randn(5, 2)))
        ['scale', 'z']
        >>> guide.median(torch.randn(7, 2))["z"].shape    # new data, another size
        torch.Size([7, 2])
    """

    def __init__(
        self,
        model: Callable[..., Any],
        *,
        amortized_plates: str | Sequence[str] | None = None,
        num_steps: int = 5,
        num_samples: int = 1,
        init_loc_fn: Callable[[dict], Tensor] = init_to_feasible,
        init_scale: float = 0.1,
        global_guide: Callable[[Callable[..., Any]], Callable[..., Any]] | None = None,
        family: str | Family = "diagonal_gaussian",
        encoding: str | Encoding | Sequence[str | Encoding] = DEFAULT_ENCODING,
        update: str = "gated",
        network: str | UpdateNetwork = "highway",
        hidden_size: int = 256,
        num_layers: int = 2,
        network_scale: float = 1.0,
        create_plates: Callable[..., Any] | None = None,
    ) -> None:
        if not isinstance(init_scale, float) or not init_scale > 0:
            raise ValueError(f"init_scale must be a float > 0, got {init_scale!r}")
        if not isinstance(network_scale, float) or not 0 < network_scale < math.inf:
            raise ValueError(
                f"network_scale must be a finite float > 0, got {network_scale!r}: it divides the update network's "
                "stored parameters (1.0: stored as they are; 0.1: Adam moves the network 10 times slower than the "
                "rest of the model; 10.0: 10 times faster)"
            )
        self.network_scale = network_scale
        super().__init__(model, create_plates=create_plates)
        self.amortized_plates = amortized_plates
        self.num_steps = check_int("num_steps", num_steps, minimum=0)
        self.num_samples = check_int("num_samples", num_samples, minimum=1)
        self.init_loc_fn = init_loc_fn
        self.init_scale = init_scale
        self._global_guide_of = global_guide
        self._network = network
        self._update_name = update
        self._hidden_size = check_int("hidden_size", hidden_size, minimum=1)
        self._num_layers = check_int("num_layers", num_layers, minimum=1)
        self.family = make_family(family)
        if not isinstance(self.family, (DiagonalGaussian, LowRankGaussian)):
            raise ValueError(f"family must be 'diagonal_gaussian', 'low_rank' or a DiagonalGaussian/LowRankGaussian "
                             f"(a Gaussian over the local sites, in unconstrained space), got {self.family!r}; for "
                             "mixtures use learned_inference's core methods on a model with log_joint")
        self.encoding = make_encoding(encoding)
        if not self.num_steps and not _reads_data_only(self.encoding):
            raise ValueError(
                f"num_steps=0 is the encoder-only guide: λ is one learned step from λ_0 that reads the data without "
                f"evaluating the model, but encoding={self.encoding!r} reads more (the gradient or errors): pass "
                "encoding='data', or use AutoAmortizedNormal"
            )
        self.globals: Callable[..., Any] | None = None
        self._global_names: frozenset[str] = frozenset()
        self._on_the_simplex = _OnTheSimplex(frozenset())
        self._data_features: int | None = None

    # -- set-up ---------------------------------------------------------------------------------------------------

    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        # first without init_loc_fn, which would fail on a discrete site before our clearer error
        # the set-up runs of the model move no running statistic of a batch norm in training mode
        with TrainModeRun():
            visible = poutine.block(self.model, prototype_hide_fn)
            check_continuous(poutine.block(poutine.trace(visible).get_trace)(*args, **kwargs))
            # sites the model enumerates are left unguided: TraceEnum_ELBO sums them out, and so does the refinement
            unguided = poutine.block(self.model, hide_fn=enumerated)
            model = poutine.block(InitMessenger(self.init_loc_fn)(unguided), prototype_hide_fn)
            self.prototype_trace = poutine.block(poutine.trace(model).get_trace)(*args, **kwargs)
        if self.master is not None:
            self.master()._check_prototype(self.prototype_trace)
        self._prototype_frames = {}
        for _, site in self.prototype_trace.iter_stochastic_nodes():
            for frame in site["cond_indep_stack"]:
                if not frame.vectorized:
                    raise NotImplementedError(
                        f"AutoIterativeNormal does not support the sequential pyro.plate {frame.name!r} (iterated as "
                        f"`for i in pyro.plate(...)`) around the latent site {site['name']!r}: it refines a plate's "
                        f"datapoints together, as one batch. Use a vectorized plate, `with pyro.plate({frame.name!r}, "
                        "size):` with batched sample statements; or keep the loop and guide its sites yourself: "
                        "auto = AutoIterativeNormal(poutine.block(model, hide=[<the loop's sites>])), called from a "
                        "guide function that also samples those sites (Pyro's autoguides, AutoGuideList included, "
                        "do not support sequential plates either)"
                    )
                self._prototype_frames[frame.name] = _sized(frame, site)
        # which plates hold data; the random streams of the devices in use stay as they were
        with torch.random.fork_rng(devices=_cuda_devices(self.prototype_trace)), TrainModeRun():
            full = poutine.block(poutine.trace(self.model).get_trace)(*args, **kwargs)
        observed = [site for site in full.nodes.values() if site["type"] == "sample" and site["is_observed"]]
        data_plates = set().union(*(site_plates(site) for site in observed))
        self._features = frozenset(site["name"] for site in observed)
        self._model_sites = frozenset(name for name, site in full.nodes.items()
                                      if site["type"] == "sample" and not site_is_subsample(site))
        # where the refinement may enumerate: left of every plate the model uses
        self._enumerates = any(enumerated(site) for site in full.nodes.values())
        self._plate_nesting = max((-frame.dim for site in full.nodes.values() if site["type"] == "sample"
                                   for frame in site["cond_indep_stack"] if frame.dim is not None), default=0)
        plates = find_amortized_plates(self.prototype_trace, self.amortized_plates, data_plates)
        self.layout: LocalLayout = local_layout(self.prototype_trace, plates)
        global_names = [
            name for name, _ in self.prototype_trace.iter_stochastic_nodes()
            if name not in {site.name for site in self.layout.sites}
        ]
        if global_names:
            restricted = poutine.block(self.model, expose=global_names)
            self.globals = (AutoNormal(restricted, init_loc_fn=self.init_loc_fn, init_scale=self.init_scale)
                            if self._global_guide_of is None else self._global_guide_of(restricted))
            self._global_names = frozenset(global_names)
            if not isinstance(self.globals, AutoGuide):  # a function creates the plates of its sites itself
                stacks = [self.prototype_trace.nodes[site.name]["cond_indep_stack"] for site in self.layout.sites]
                local = {frame.name for stack in stacks for frame in stack}
                self._prototype_frames = {name: frame for name, frame in self._prototype_frames.items()
                                          if name in local}
            supports = {name: cast(Any, self.prototype_trace.nodes[name]["fn"]).support for name in global_names}
            self._on_the_simplex = _OnTheSimplex(frozenset(name for name in global_names
                                                           if on_a_simplex(supports[name])))
        if not self.layout.sites:
            return
        init_loc = self.layout.init_loc
        self.register_buffer("init_loc", init_loc)
        self.register_buffer("init_log_var", torch.zeros_like(init_loc))
        network = make_network(self._network, hidden_size=self._hidden_size, num_layers=self._num_layers)
        # built on the data's device (a lazy input layer is then sized there); the guide moves with .to() later
        self.update = make_update(self._update_name, self.family.param_sizes(self.layout.total_dim),
                                  hidden_size=network.hidden_size,
                                  dim=self.layout.total_dim).to(init_loc.device)
        self.network = network.to(init_loc.device)

    def _create_plates(self, *args: Any, **kwargs: Any) -> dict[str, pyro.plate]:
        """Creates the plates (as every AutoGuide), with the amortized plates sized on this call's data.

        Within an ``AutoGuideList`` the list creates the plates: from its prototype unless it has ``create_plates``,
        so a ``ValueError`` says how to size them on the data when this call's data has another size.
        """
        if not self.layout.plates:
            return super()._create_plates(*args, **kwargs)
        frames = self._amortized_frames(args, kwargs)
        if self.master is None:
            self._prototype_frames.update({frame.name: frame for frame in frames})
            return super()._create_plates(*args, **kwargs)
        plates = super()._create_plates(*args, **kwargs)
        stale = [(frame.name, plates[frame.name].subsample_size, frame.size) for frame in frames
                 if frame.name in plates and plates[frame.name].subsample_size != frame.size]
        if stale:
            name, size, wanted = stale[0]
            raise ValueError(
                f"the AutoGuideList holding {type(self).__name__} created plate {name!r} with size {size} (from the "
                f"data it was set up on), but this call's data has {wanted} datapoints: an AutoGuideList sizes its "
                "plates once, unless it has create_plates. Give it one that sizes the plate on the data, e.g. "
                f"AutoGuideList(model, create_plates=lambda *args, **kwargs: pyro.plate({name!r}, <datapoints in "
                "args>)), so the list amortizes over new data."
            )
        return plates

    def _amortized_frames(self, args: tuple, kwargs: dict) -> list[CondIndepStackFrame]:
        """The amortized plates' frames for these arguments: the model runs up to its first local site only."""
        names = set(self.layout.plates)
        try:
            with poutine.block(), TrainModeRun():
                poutine.escape(self.model, lambda msg: not site_is_subsample(msg) and names <= site_plates(msg))(
                    *args, **kwargs
                )
        except NonlocalExit as exit_:
            return [_sized(frame, exit_.site) for frame in exit_.site["cond_indep_stack"] if frame.name in names]
        raise ValueError(
            f"the model, run with this call's arguments, returned without reaching a site inside the plate(s) "
            f"{sorted(names)}, where this guide amortizes the local latent sites "
            f"{[site.name for site in self.layout.sites]} (found with the arguments it was set up with): a branch of "
            "the model skipped them. Call the guide with arguments for which the model samples them (it receives the "
            "arguments of svi.step, Predictive or the model call), or, if those sites are optional, guide them with "
            "an autoguide that does not amortize over a plate (AutoNormal)"
        )

    def _check_prototype(self, part_trace: Any) -> None:
        """Lets the internal AutoNormal for the global sites set itself up under this guide (as its master)."""

    def _registered(self, name: str) -> Any:
        """The submodule ``name``, its trainable parameters registered with Pyro (as every attribute access to a
        plain ``nn.Module`` of a ``PyroModule`` does); a frozen one (``requires_grad_(False)``) is used as it is."""
        module = self._modules[name]
        assert module is not None  # set up in _setup_prototype
        return getattr(self, name) if any(p.requires_grad for p in module.parameters()) else module

    def _update_network(self, data_features: int, dim: int) -> UpdateNetwork:
        """The network, registered with Pyro; its lazy input layer is sized first, so that Pyro never records an
        uninitialized parameter. Raises ``ValueError`` when the observations do not match the first call's."""
        if self._data_features is None:
            self._data_features = data_features
        elif data_features != self._data_features:
            raise ValueError(
                f"{type(self).__name__} reads the observed values inside the plate(s) {list(self.layout.plates)} to "
                f"infer each datapoint's posterior: {self._data_features} per datapoint when it was set up, but "
                f"{data_features} with these arguments. An observation argument is probably None (the model then "
                "samples it instead of observing it): pass the observed data, e.g. Predictive(model, guide)(x, y) "
                "rather than (x, y=None); to predict unobserved outputs, guide only the global sites "
                "(AutoNormal(poutine.block(model, hide=[<local sites>])))."
            )
        network = cast(UpdateNetwork, self._modules["network"])  # no pyro.module statement yet
        shapes = FeatureShapes.of(data=data_features, param_names=self.family.param_sizes(dim), space=LatentSpace(dim))
        network.materialize(self.encoding.num_features(shapes))
        if self.network_scale != 1.0 and not any(map(parametrize.is_parametrized, network.modules())):
            for module in (network, self._modules["update"]):
                assert module is not None  # set up in _setup_prototype
                _scale_parameters(module, self.network_scale)
        registered: UpdateNetwork = self._registered("network")
        return registered

    @property
    def locs(self) -> Any:
        """The global sites' unconstrained locations, as ``AutoNormal.locs`` (a ``PyroModule``, one attribute per
        site); an ``AttributeError`` before the first call or when every latent site is local."""
        return self._global_guide().locs

    @property
    def scales(self) -> Any:
        """The global sites' scales, as ``AutoNormal.scales``; see :attr:`locs`."""
        return self._global_guide("scales").scales

    def _global_guide(self, attribute: str = "locs") -> Any:
        """The guide of the global sites, which must have ``attribute``."""
        if self.globals is None:
            raise AttributeError(
                "this guide has no global sites yet: call it once on data to set it up, or the model has no latent "
                "site outside the amortized plate (local sites have no per-site parameters: see median())"
            )
        if not hasattr(self.globals, attribute):
            raise AttributeError(
                f"the guide of the global sites ({self.globals!r}, from global_guide=) has no {attribute}: pass an "
                f"autoguide that has it (the default AutoNormal, AutoDelta, ...) for {attribute}"
            )
        return self.globals

    def _draw_globals(self, args: tuple, kwargs: dict) -> dict[str, Tensor]:
        """Samples the global sites with their guide; returns their values (every global site, or a clear error)."""
        if self.globals is None:
            return {}
        with poutine.trace() as tape, TrainModeRun(), self._on_the_simplex:  # an autoguide's set-up runs the model
            self.globals(*args, **kwargs)
        drawn = {name: site["value"] for name, site in tape.trace.nodes.items()
                 if site["type"] == "sample" and name in self._global_names}
        if missing := sorted(self._global_names - set(drawn)):
            raise ValueError(f"the guide of the global sites (global_guide=) did not sample {missing}: it must "
                             "sample every latent site outside the amortized plates")
        return cast(dict[str, Tensor], drawn)

    # -- the guide --------------------------------------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """Samples every latent site, with the same ``*args, **kwargs`` as the model.

        Returns:
            A dict mapping site name to sampled (constrained) value.
        """
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        plates = self._create_plates(*args, **kwargs)
        result = self._draw_globals(args, kwargs)
        if not self.layout.sites:
            return result
        replay = self._enclosing_replay()
        replayed = None if replay is None else self._replayed(replay, self._call_fingerprint(args, kwargs))
        if replayed is None:
            params, masks = self._refine(plates, dict(result), get_plates(), args, kwargs, generator=None)
        else:  # the draws are replayed with the λ_T and masks they were made with: no refinement to redo
            params, masks = replayed
        # taken after the refinement: the first one sizes the network's lazy parameters
        params = self._replayable(params, plates, masks, self._call_fingerprint(args, kwargs),
                                  stale=replay is not None and replayed is None)
        if isinstance(self.family, LowRankGaussian):
            return self._sample_jointly(params, plates, masks, result)
        locs = self.layout.split(params["loc"])
        scales = self.layout.split(torch.exp(0.5 * params["log_var"]))
        for site in self.layout.sites:
            with self._site_plates(site, plates, masks):
                u = pyro.sample(
                    site.name + "_unconstrained",
                    dist.Normal(locs[site.name], scales[site.name]).to_event(site.event_dim),
                    infer={"is_auxiliary": True},
                )
                result[site.name] = _constrained_site(site, u)
        return result

    def _sample_jointly(self, params: Params, plates: dict[str, pyro.plate], masks: dict[str, Any],
                       result: dict[str, Tensor]) -> dict[str, Tensor]:
        """A correlated family (low-rank): one auxiliary site ``_<guide>_latent`` draws every local site's
        unconstrained value at once, u ~ q_λ over all D dimensions (inside the amortized plates); each site is then
        its block of u, transformed, with the Jacobian as its log-density (as ``AutoLowRankMultivariateNormal``)."""
        with ExitStack() as stack:
            for name in self.layout.plates:
                stack.enter_context(plates[name])
            left = params["loc"].shape[:-1]
            aligned = {name: self.layout.with_inner_dims(value) for name, value in params.items()}
            q = cast(torch.distributions.LowRankMultivariateNormal, self.family.distribution(aligned))
            joint = dist.LowRankMultivariateNormal(q.loc, q.cov_factor, q.cov_diag)
            u = pyro.sample(f"_{self._pyro_name}_latent", joint, infer={"is_auxiliary": True})
        blocks = self.layout.split(u.reshape(*left, u.shape[-1]))
        for site in self.layout.sites:
            with self._site_plates(site, plates, masks):
                result[site.name] = _constrained_site(site, blocks[site.name])
        return result

    def _lambda_site(self, name: str) -> str:
        """The auxiliary site that carries the final posterior parameter ``name`` (see :meth:`_replayable`)."""
        return f"_{self._pyro_name}_{name}"

    def _call_fingerprint(self, args: tuple, kwargs: dict) -> tuple[Any, ...]:
        """What makes a replayed λ_T this call's own: the same argument tensors (by identity and version), the
        update network's parameters unchanged since (their versions), and the same gradient mode."""
        tensors = [leaf for leaf in pytree.tree_leaves((args, kwargs)) if isinstance(leaf, Tensor)]
        network = [p for name in ("network", "update") for p in cast(nn.Module, self._modules[name]).parameters()]
        return (torch.is_grad_enabled(), tuple((id(t), t._version) for t in tensors),
                tuple((id(p), p._version) for p in network))

    def _enclosing_replay(self) -> Any:
        """The trace of the innermost enclosing ``poutine.replay`` that holds this guide's λ_T, or None."""
        for messenger in reversed(_PYRO_STACK):
            trace = messenger.trace if isinstance(messenger, ReplayMessenger) else None
            if trace is not None and self._lambda_site("loc") in trace:
                return trace
        return None

    def _replayed(self, trace: Any, call: tuple[Any, ...]) -> tuple[Params, dict[str, Any]] | None:
        """λ_T and the masks that ``trace`` (a replayed trace of this guide) holds, if it is this call's own (see
        :meth:`_replayable`); None for another call's trace (other data, an updated network, no gradient)."""
        nodes = {name: trace.nodes[self._lambda_site(name)] for name in self.family.param_sizes(1)}
        infer = cast(dict[str, Any], nodes["loc"]["infer"])
        if infer.get("call") != call:
            return None
        values = {name: cast(Tensor, node["value"]) for name, node in nodes.items()}  # [*left, *inner, P]
        params = {name: value.reshape(*value.shape[: self.layout.plate_dim], value.shape[-1])
                  for name, value in values.items()}
        return params, infer["masks"]

    def _replayable(self, params: Params, plates: dict[str, pyro.plate], masks: dict[str, Any],
                    call: tuple[Any, ...], *, stale: bool) -> Params:
        """λ_T through one auxiliary site per parameter (a ``Delta`` masked out: log-density 0, also at a replayed
        value), so that a replay of this guide's trace gives back the λ_T its draws were made from.

        The refinement is random (its noise, the model's own draws inside it) without sample sites of its own: a
        re-run of the guide under ``poutine.replay`` (``TraceEnum_ELBO``'s sequential enumeration re-runs the guide
        once per value of a later discrete site and replays the earlier draws; ``poutine.queue``; a user's replay)
        would replay the draw u but refine anew, and score u under another λ'_T: the estimate is then
        E[log p − log q'] = ELBO + KL(q ‖ q'), biased up without bound, and training raises the KL until the
        estimate is positive and diverges (measured on Pyro's scanvi example: a positive ELBO in the first epoch,
        then a zero-inflated negative binomial with probs 1 at step 18).

        In a replay of this call's own trace (:meth:`_replayed`; ``call`` identifies it) the refinement is not run
        again: λ_T and the model's masks of the local sites (kept in the sites' ``infer``) come from the replayed
        trace. A replay of another call's trace (``stale``) refines anew and keeps its λ_T off the replay (the sites
        are hidden from it), as Pyro's autoguides recompute their distributions under a replay.
        """
        replayed = {}
        with ExitStack() as stack:
            for name in self.layout.plates:
                stack.enter_context(plates[name])
            if stale:
                stack.enter_context(poutine.block(hide=[self._lambda_site(name) for name in params]))
            for name, value in params.items():  # [*left, P]
                aligned = self.layout.with_inner_dims(value)
                site = pyro.sample(self._lambda_site(name), dist.Delta(aligned, event_dim=1).mask(False),
                                   infer=cast(Any, {"is_auxiliary": True, "masks": masks, "call": call}))
                replayed[name] = site.reshape(value.shape)
        return replayed

    @contextmanager
    def _site_plates(self, site: LocalSite, plates: dict[str, pyro.plate], masks: dict[str, Any]) -> Iterator[None]:
        """Inside: the plates of a local site, and the model's mask of it where the model masks it (padding)."""
        trace = self.prototype_trace
        assert trace is not None  # set up
        with ExitStack() as stack:
            for frame in trace.nodes[site.name]["cond_indep_stack"]:
                stack.enter_context(plates[frame.name])
            if isinstance(masks.get(site.name), Tensor):
                stack.enter_context(poutine.mask(mask=masks[site.name]))
            yield

    def _refine(
        self, plates: dict[str, pyro.plate], conditioned: dict[str, Tensor], outer: Sequence[Any], args: tuple,
        kwargs: dict, *, generator: torch.Generator | None,
    ) -> tuple[Params, dict[str, Any]]:
        """Runs the T refinement steps; returns the final λ as ``{"loc", "log_var"}`` of shape ``[*left, D]``, and
        the model's masks of the local latent sites (by name, where the model masks them).

        In training (grad enabled), λ_T keeps its graph to the update network, and the surrogate of steps
        1..T−1 is reported to :class:`IterativeTrace_ELBO` (see :mod:`.elbo`).
        """
        layout, family = self.layout, self.family
        amortized = [plates[name] for name in layout.plates]
        drawn, enumerated_dims = self._guide_draws(exclude=frozenset(conditioned))
        outer = [*outer, *enumerated_dims]
        frames = [*outer, *(_frame(plate) for plate in amortized)]
        left = left_shape(frames, plate_dim=layout.plate_dim)
        scale = math.prod(plate.size / plate.subsample_size for plate in amortized)
        conditioned.update({name: _plate_indices(plate) for name, plate in plates.items()})
        # one context for all the model runs of this refinement (see learned_inference.train_mode)
        train_mode = TrainModeRun()
        nesting = max(self._plate_nesting, len(left) - layout.plate_dim - 1)
        log_joint = LocalLogJoint(self.model, args, kwargs, layout=layout, left_shape=left, conditioned=conditioned,
                                  subsample_scale=scale, train_mode=train_mode,
                                  outer_plates=frozenset(frame.name for frame in outer),
                                  enumerate_dim=-(nesting + 1) if self._enumerates else None,
                                  features=getattr(self, "_features", None),  # None: a guide pickled before
                                  drawn=drawn)
        batch, dim = math.prod(left), layout.total_dim
        start = family.from_diagonal(self.init_loc.expand(batch, dim), self.init_log_var.expand(batch, dim))
        assert start is not None  # a Gaussian family (checked at construction)
        params = family.constrain(start)
        x = log_joint.observations(params["loc"])
        network = self._update_network(int(x.shape[1]), dim)
        update = self._registered("update")
        tracing = torch.jit.is_tracing()
        # The encoder-only guide is one step that reads the data only: the model is not evaluated (and it traces).
        kind = UnscoredObjective if not self.num_steps else TracedObjective if tracing else Objective
        train = torch.is_grad_enabled()
        # Traced, the steps 1..T-1 are not trained (their vector-Jacobian products would be traced): as Trace_ELBO.
        training = Training(step_parameters=(*network.parameters(), *update.parameters()),
                            step_weights=partial(_inner_step_weights, scale=0.0 if tracing else scale))
        run = refine(
            partial(learned_step, self.encoding, network, update), params, x,
            objective=kind(log_joint, family, LatentSpace(dim)), num_steps=max(self.num_steps, 1),
            noise=lambda t: sample_noise(self.num_samples if self.num_steps else 0, batch, dim, dtype=x.dtype,
                                         device=x.device, generator=generator),
            training=training, train=train, evaluate_last=False,
        )
        if not train and train_mode.batch_norms_in_training:
            module = train_mode.batch_norms_in_training[0]
            raise batch_norm_error(f"the model's {type(module).__name__}", module, cause="test_time")
        if train and run.loss.requires_grad:
            record_refinement_loss(run.loss, name=f"{self._pyro_name}.refinement_loss")
        return {name: value.reshape(*left, value.shape[-1]) for name, value in run.params.items()}, log_joint.masks

    def _guide_draws(self, *, exclude: frozenset[str]) -> tuple[dict[str, Tensor], list[CondIndepStackFrame]]:
        """The values the enclosing guide has drawn so far for the model's latent sites that this guide does not
        refine (found in the innermost trace being recorded: the ELBO's, ``Predictive``'s), except ``exclude``;
        and a frame for each dim that their parallel enumeration uses (``TraceEnum_ELBO`` puts each enumerated
        value there), so that every enumerated value gets a refinement of its own."""
        trace = next((m.trace for m in reversed(_PYRO_STACK) if isinstance(m, TraceMessenger)), None)
        if trace is None:
            return {}, []
        own = exclude | {site.name for site in self.layout.sites}
        model_sites: frozenset[str] = getattr(self, "_model_sites", frozenset())  # empty: a guide pickled before
        drawn: dict[str, Tensor] = {}
        frames: dict[int, CondIndepStackFrame] = {}
        for name, site in trace.nodes.items():
            if site["type"] != "sample":
                continue
            infer = site["infer"] or {}
            if (name in own or name not in model_sites or site_is_subsample(site)
                    or infer.get("is_auxiliary")):
                continue
            value = cast(Tensor, site["value"])
            drawn[name] = value
            dim = infer.get("_enumerate_dim")
            if dim is not None:
                batch_shape = value.shape[: value.dim() - cast(Any, site["fn"]).event_dim]
                frames[dim] = CondIndepStackFrame(name=f"_enumerated_{name}", dim=dim, size=batch_shape[dim],
                                                  counter=0, full_size=batch_shape[dim])
        return drawn, list(frames.values())

    # -- summaries ---------------------------------------------------------------------------------------------------

    def _posterior(self, args: tuple, kwargs: dict) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Unconstrained (loc, scale) per local site for the data in ``args``, with deterministic refinement noise."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        if not self.layout.sites:
            return {}, {}
        if self.master is not None:  # an AutoGuideList's summaries do not size its plates on these arguments
            self.master()._create_plates(*args, **kwargs)
        plates = self._create_plates(*args, **kwargs)
        conditioned = {} if self.globals is None else self._global_guide("median").median(*args, **kwargs)
        generator = torch.Generator(device=self.init_loc.device).manual_seed(SUMMARY_SEED)
        params, _ = self._refine(plates, dict(conditioned), get_plates(), args, kwargs, generator=generator)
        return self.layout.split(params["loc"]), self.layout.split(self.family.distribution(params).stddev)

    @torch.no_grad()
    def median(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """Posterior medians of every latent site for the data in ``args`` (same arguments as the model).

        Returns:
            A dict mapping site name to its median, T(μ_T) for local sites.
        """
        locs, _ = self._posterior(args, kwargs)
        result = {} if self.globals is None else self._global_guide("median").median(*args, **kwargs)
        result.update({site.name: site.value(locs[site.name]) for site in self.layout.sites})
        return result

    @torch.no_grad()
    def quantiles(self, quantiles: Sequence[float] | Tensor, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """Posterior quantiles of every latent site for the data in ``args``.

        Args:
            quantiles: the requested quantiles, each in (0, 1).

        Returns:
            A dict mapping site name to a ``[len(quantiles), *site_shape]`` tensor, T(μ + σ Φ⁻¹(q)) for local sites.
        """
        locs, scales = self._posterior(args, kwargs)
        result = {} if self.globals is None else self._global_guide("quantiles").quantiles(quantiles, *args, **kwargs)
        for site in self.layout.sites:
            loc, scale = locs[site.name], scales[site.name]
            q = torch.as_tensor(quantiles, dtype=loc.dtype, device=loc.device).reshape(-1, *(1,) * loc.dim())
            result[site.name] = site.value(dist.Normal(loc, scale).icdf(q))
        return result

    # -- pickling ------------------------------------------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        model = self._model
        state = super().__getstate__()  # drops the model (and master) on self and in the state
        self._model = model
        state["_model"] = model
        return state


class AutoAmortizedNormal(AutoIterativeNormal):
    """An amortized diagonal Normal autoguide without refinement: an encoder network maps each datapoint's
    observations to its local posterior, λ_i = γ ⊙ λ_0 + (1 − γ) ⊙ f_φ(x_i) (the gated update from the constant
    start, a standard encoder: the paper's one step, Sec. 4.2).

    It is :class:`AutoIterativeNormal` with ``num_steps=0`` and ``encoding="data"``: the same set-up, global sites,
    plates, summaries and errors, but the model is not evaluated to infer the local sites, so a call costs one
    network pass, and ``torch.jit`` traces it (``JitTrace_ELBO``). Prefer :class:`AutoIterativeNormal` where the
    encoder leaves an amortization gap (a weak encoder, sparse data, a frozen model).

    Usage::

        guide = AutoAmortizedNormal(model)
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), JitTrace_ELBO())

    Args:
        model: a Pyro model.
        amortized_plates: as for :class:`AutoIterativeNormal`.
        init_loc_fn: per-site initialization of λ_0 (and of the global sites).
        init_scale: initial scale of the global sites' AutoNormal posteriors.
        global_guide: as for :class:`AutoIterativeNormal`.
        encoding: what the encoder reads: ``"data"`` (default), or data-only encodings such as
            ``Data(log1p=True)`` for count data (an encoding that reads the model's gradient is refused: use
            :class:`AutoIterativeNormal`).
        update: ``"gated"`` or ``"residual"``.
        network: ``"highway"`` or an :class:`~learned_inference.networks.UpdateNetwork`.
        hidden_size: units per layer of the encoder.
        num_layers: hidden layers of the highway encoder.
        network_scale: as for :class:`AutoIterativeNormal` (0.1 for AutoNormal's typical learning rate 0.05).
        create_plates: as for every ``AutoGuide``.

    Example:
        >>> import torch, pyro, pyro.distributions as dist
        >>> def model(x):
        ...     with pyro.plate("data", len(x)):
        ...         z = pyro.sample("z", dist.Normal(0.0, 1.0))
        ...         pyro.sample("x", dist.Normal(z, 0.5), obs=x)
        >>> AutoAmortizedNormal(model, hidden_size=8).median(torch.zeros(3))["z"].shape
        torch.Size([3])
    """

    def __init__(
        self,
        model: Callable[..., Any],
        *,
        amortized_plates: str | Sequence[str] | None = None,
        init_loc_fn: Callable[[dict], Tensor] = init_to_feasible,
        init_scale: float = 0.1,
        global_guide: Callable[[Callable[..., Any]], Callable[..., Any]] | None = None,
        encoding: str | Encoding | Sequence[str | Encoding] = "data",
        update: str = "gated",
        network: str | UpdateNetwork = "highway",
        hidden_size: int = 256,
        num_layers: int = 2,
        network_scale: float = 1.0,
        create_plates: Callable[..., Any] | None = None,
    ) -> None:
        super().__init__(
            model, amortized_plates=amortized_plates, num_steps=0, init_loc_fn=init_loc_fn, init_scale=init_scale,
            global_guide=global_guide, encoding=encoding, update=update, network=network, hidden_size=hidden_size,
            num_layers=num_layers, network_scale=network_scale, create_plates=create_plates,
        )


class _Scaled(nn.Module):
    """The parametrization θ = c · θ̃: the parameter is stored (and optimised) as θ̃ = θ / c."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, stored: Tensor) -> Tensor:
        return self.scale * stored

    def right_inverse(self, value: Tensor) -> Tensor:
        return value / self.scale


def _scale_parameters(module: nn.Module, scale: float) -> None:
    """Stores every parameter of ``module``'s submodules divided by ``scale`` (see ``network_scale``)."""
    for owner in list(module.modules()):
        for name, _ in list(owner.named_parameters(recurse=False)):
            parametrize.register_parametrization(owner, name, _Scaled(scale))


def _reads_data_only(encoding: Encoding) -> bool:
    """Whether an encoding reads only the data and λ (an encoder's inputs), not the model's gradient or errors."""
    if isinstance(encoding, Concat):
        return all(_reads_data_only(part) for part in encoding.encodings)
    return isinstance(encoding, (Data, PosteriorParams))


def _constrained_site(site: LocalSite, u: Tensor) -> Tensor:
    """Samples the model's site as T(u), with log|det ∂T⁻¹/∂z| as its log-density (unless the site is masked out)."""
    value = site.value(u)
    log_density: Tensor | float = 0.0
    if poutine.get_mask() is not False:
        jacobian = site.transform.inv.log_abs_det_jacobian(value, u)
        log_density = sum_rightmost(jacobian, jacobian.dim() - value.dim() + site.constrained_event_dim)
    return pyro.sample(site.name, dist.Delta(value, log_density=log_density, event_dim=site.constrained_event_dim))


class _OnTheSimplex(Messenger):
    """Renormalizes the draws of the named simplex-valued sites: v / Σᵢ vᵢ.

    Pyro's stick-breaking transform in float32 can miss Σᵢ vᵢ = 1 by more than the 10⁻⁶ that the Dirichlet's
    support check allows on a long simplex (measured: 1.25·10⁻⁶ on a 1,024-word topic of Pyro's LDA example, five
    steps into training with ``AutoNormal`` itself), and Pyro's validation then refuses the model's log-density.
    The draw is on the simplex up to rounding, so dividing by its sum changes it only by rounding, and its
    log-density (the transform's Jacobian) is kept.
    """

    def __init__(self, names: frozenset[str]) -> None:
        super().__init__()
        self.names = names

    def _process_message(self, msg: Message) -> None:
        fn = msg["fn"]
        if msg["type"] == "sample" and msg["name"] in self.names and isinstance(fn, dist.Delta):
            value = fn.v / fn.v.sum(-1, keepdim=True)
            msg["fn"] = dist.Delta(value, log_density=fn.log_density, event_dim=fn.event_dim)


def _sized(frame: CondIndepStackFrame, site: Message) -> CondIndepStackFrame:
    """``frame`` with its size: a plate created without one (``pyro.plate("data")``) takes it from the batch shape
    of the site met inside it (Pyro records such a plate with size −1)."""
    if frame.size != -1 or frame.dim is None:
        return frame
    shape = cast(Any, site["fn"]).batch_shape  # a distribution: the site is a sample site
    size = shape[frame.dim] if len(shape) >= -frame.dim else 1
    return frame._replace(size=size, full_size=size)


def _cuda_devices(trace: Any) -> list[int]:
    """The indices of the CUDA devices that hold a value of ``trace`` (for ``fork_rng``)."""
    values = [site["value"] for site in trace.nodes.values() if isinstance(site.get("value"), Tensor)]
    return sorted({int(v.device.index or 0) for v in values if v.device.type == "cuda"})


def _frame(plate: pyro.plate) -> Any:
    """The ``CondIndepStackFrame`` a plate will push (its current subsample size)."""
    with plate:
        return get_plates()[-1]
