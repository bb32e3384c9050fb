"""The inference-gap report: where each method's ELBO loses to log p(x) (Cremer, Li & Duvenaud 2018).

For a method that infers q_λ(z | x) from a variational family Q, with λ its (amortized or refined) parameters,

    log p(x) − L(λ)  =  [log p(x) − L(λ*)]  +  [L(λ*) − L(λ)],      λ* = argmax_{λ' ∈ Q} L(λ'),
                        approximation gap        amortization gap

(Cremer, Li & Duvenaud 2018, "Inference Suboptimality in Variational Autoencoders", Sec. 3): the approximation gap
is what the family cannot express, the amortization gap what the method leaves on the table within its family.
:func:`gap_report` estimates, per example x of a batch and per method:

* log p(x): annealed importance sampling (:func:`~learned_inference.ais.annealed_importance_sampling`), or a
  given exact value;
* L(λ): the method's ELBO, :func:`~learned_inference.evaluation.elbo_estimate` with ``elbo_samples`` samples;
* L(λ*): the best ELBO of the method's family, from long E-steps started at the method's own λ: Adam
  (:class:`~learned_inference.baselines.GradientEStep`) for ``e_step_steps`` steps at every learning rate of
  ``e_step_lrs``; per example, the best candidate (those runs and λ itself) chosen by one ELBO estimate and
  scored by an independent one (so the choice does not bias the score upward);
* IWAE-k: :func:`~learned_inference.evaluation.importance_weighted_log_marginal` with ``iwae_samples`` samples;
* samples to bound: the smallest k in 1, 2, 4, …, ``max_samples`` with which the method's posterior, as an
  importance-sampling proposal, reaches the ``reference`` method's IWAE-``iwae_samples`` bound within
  ``bound_tolerance`` nats, both as means over the examples. The mean IWAE-k bound is estimated from one pool of
  ``max_samples`` log weights per example, split into ``max_samples / k`` groups of k: a tighter proposal needs
  fewer samples, i.e. evaluates log p(x) more cheaply.

Every gap carries its standard error over the examples. Both gaps are ≥ 0 in expectation, up to Monte Carlo
error, the stochastic bias of AIS (a lower bound in expectation) and the E-steps' incomplete convergence, all of
which are reported (AIS's own standard error, the settings).

Example:
    >>> import torch
    >>> from learned_inference import GradientEStep, StandardEncoder
    >>> from learned_inference.zoo import ProbabilisticPCA
    >>> model = ProbabilisticPCA.random(data_dim=5, latent_dim=2, generator=torch.Generator().manual_seed(0))
    >>> x = model.sample(8, generator=torch.Generator().manual_seed(1))
    >>> prior_guess = lambda x: (torch.zeros(len(x), 2), torch.zeros(len(x), 2))
    >>> methods = {"prior": StandardEncoder(model, latent_dim=2, init=prior_guess),
    ...            "e-step": GradientEStep(model, latent_dim=2, lr=0.1, num_steps=200)}
    >>> report = gap_report(model, methods, x, log_px=model.log_marginal(x).detach(), e_step_steps=200,
    ...                     e_step_lrs=(0.1,), iwae_samples=64, max_samples=64, elbo_samples=64,
    ...                     generator=torch.Generator().manual_seed(2))
    >>> report.gaps["prior"].amortization_gap.mean() > 1.0, report.gaps["e-step"].amortization_gap.mean() < 0.1
    (tensor(True), tensor(True))
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from learned_inference.ais import AISResult, annealed_importance_sampling
from learned_inference.baselines import GradientEStep
from learned_inference.evaluation import elbo_estimate, importance_weighted_log_marginal, log_weights
from learned_inference.inference import InferenceMethod
from learned_inference.model import LatentModel
from learned_inference.validation import check_data, check_int

__all__ = ["GapReport", "MethodGaps", "gap_report", "mean_iwae_by_samples", "samples_to_bound"]


def _mean_and_error(values: Tensor) -> tuple[float, float]:
    """The mean over examples and its standard error (sample standard deviation / √n; 0 for one example)."""
    values = values.double()
    error = (values.std() / math.sqrt(len(values))).item() if len(values) > 1 else 0.0
    return values.mean().item(), error


@dataclass(frozen=True)
class MethodGaps:
    """One method's row of a :class:`GapReport`: per-example ``[B]`` float64 tensors and the samples to bound.

    Attributes:
        elbo: L(λ), the method's ELBO.
        iwae: the IWAE-k estimate of log p(x) with the method's posterior as proposal.
        best_elbo: L(λ*), the best ELBO of the method's family found from λ.
        approximation_gap: log p(x) − L(λ*).
        amortization_gap: L(λ*) − L(λ).
        iwae_by_samples: the mean over examples of the IWAE-k bound, for k = 1, 2, 4, … (pooled estimate).
        samples_to_bound: the smallest such k within the tolerance of the reference bound (None: none reached it).
        best_lr: per example, the E-step learning rate that gave L(λ*) (0.0 where λ itself was best).
    """

    elbo: Tensor
    iwae: Tensor
    best_elbo: Tensor
    approximation_gap: Tensor
    amortization_gap: Tensor
    iwae_by_samples: dict[int, float]
    samples_to_bound: int | None
    best_lr: Tensor

    def summary(self) -> dict[str, Any]:
        """Means over the examples with their standard errors (``<name>_se``), and ``samples_to_bound``."""
        out: dict[str, Any] = {}
        for name in ("elbo", "iwae", "best_elbo", "approximation_gap", "amortization_gap"):
            out[name], out[f"{name}_se"] = _mean_and_error(getattr(self, name))
        out["samples_to_bound"] = self.samples_to_bound
        out["iwae_by_samples"] = dict(self.iwae_by_samples)
        return out


@dataclass(frozen=True)
class GapReport:
    """What :func:`gap_report` returns; ``str(report)`` is a Markdown table of the means ± standard errors.

    Attributes:
        log_px: ``[B]`` float64, the log p(x) the gaps are measured against (AIS, or the value given).
        log_px_error: ``[B]`` float64, its per-example standard error (AIS's; zeros for a given value).
        gaps: one :class:`MethodGaps` per method, by name.
        reference: the method whose IWAE bound ``samples_to_bound`` aims at.
        bound: that bound: the mean over examples of the reference's IWAE-``iwae_samples``.
        ais: the AIS run (None when ``log_px`` was given).
        ais_seconds: its wall-clock time (0.0 when ``log_px`` was given).
        settings: every option of the run.
    """

    log_px: Tensor
    log_px_error: Tensor
    gaps: dict[str, MethodGaps]
    reference: str
    bound: float
    ais: AISResult | None
    ais_seconds: float
    settings: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """Means and standard errors: ``log_px`` (``log_px_se`` over examples, ``log_px_mc_se`` the mean Monte
        Carlo error of AIS), ``bound``, and per method :meth:`MethodGaps.summary` under ``methods``."""
        mean, error = _mean_and_error(self.log_px)
        return {"log_px": mean, "log_px_se": error, "log_px_mc_se": self.log_px_error.mean().item(),
                "bound": self.bound, "reference": self.reference, "ais_seconds": self.ais_seconds,
                "methods": {name: gaps.summary() for name, gaps in self.gaps.items()}}

    def __str__(self) -> str:
        summary = self.summary()
        k = self.settings.get("iwae_samples")
        source = "given" if self.ais is None else f"AIS, Monte Carlo error {summary['log_px_mc_se']:.3f}"
        lines = [f"log p(x) = {summary['log_px']:.2f} ± {summary['log_px_se']:.2f} (over {len(self.log_px)} examples; "
                 f"{source}); bound: IWAE-{k} of {self.reference!r} {self.bound:.2f}", "",
                 f"| method | ELBO | IWAE-{k} | approximation gap | amortization gap | samples to bound |",
                 "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for name, row in summary["methods"].items():
            reached = row["samples_to_bound"] if row["samples_to_bound"] is not None \
                else f"> {self.settings.get('max_samples')}"
            cells = [f"{row[key]:.2f} ± {row[key + '_se']:.2f}"
                     for key in ("elbo", "iwae", "approximation_gap", "amortization_gap")]
            lines.append(f"| {name} | {' | '.join(cells)} | {reached} |")
        return "\n".join(lines)


def mean_iwae_by_samples(log_w: Tensor, sizes: Sequence[int]) -> dict[int, float]:
    """The mean over examples of the IWAE-k bound for each k of ``sizes``, from one pool of log weights ``[N, B]``.

    The pool's first ⌊N / k⌋ · k weights form ⌊N / k⌋ disjoint groups of k; each group gives
    log p̂_k = logsumexp(group) − log k, averaged over the groups and the examples.

    Example:
        >>> log_w = torch.log(torch.tensor([[1.0], [3.0], [1.0], [3.0]]))
        >>> {k: round(v, 4) for k, v in mean_iwae_by_samples(log_w, [1, 2, 4]).items()}
        {1: 0.5493, 2: 0.6931, 4: 0.6931}
    """
    out = {}
    for k in sizes:
        if not 1 <= k <= log_w.shape[0]:
            raise ValueError(f"sizes must be in 1..{log_w.shape[0]} (the pool of log weights), got {k}")
        groups = log_w.shape[0] // k
        grouped = log_w[: groups * k].reshape(groups, k, -1)
        out[k] = (torch.logsumexp(grouped, 1) - math.log(k)).mean().item()
    return out


def samples_to_bound(iwae_by_samples: Mapping[int, float], bound: float, *, tolerance: float) -> int | None:
    """The smallest k whose mean IWAE-k is at least ``bound − tolerance`` (None if none is).

    Example:
        >>> samples_to_bound({1: -90.0, 2: -89.5, 4: -89.05}, -89.0, tolerance=0.1)
        4
    """
    return next((k for k in sorted(iwae_by_samples) if iwae_by_samples[k] >= bound - tolerance), None)


def _pool(model: LatentModel, posterior: Any, x: Tensor, *, size: int, chunk_size: int) -> Tensor:
    """``[size, B]`` float64 log weights from ``posterior``, drawn ``chunk_size`` at a time."""
    return torch.cat([log_weights(model, posterior, x, num_samples=min(chunk_size, size - begin)).double()
                      for begin in range(0, size, chunk_size)])


def _best_family_elbo(model: LatentModel, method: InferenceMethod, result: Any, x: Tensor, *, lrs: Sequence[float],
                      num_steps: int, num_samples: int, elbo_samples: int, chunk_size: int) -> tuple[Tensor, Tensor]:
    """Per example, L(λ*) and the learning rate that gave it (0.0: λ itself; see the module docstring)."""
    latent_dim = result.posterior.event_shape[-1]
    candidates = [result.posterior]
    for lr in lrs:
        e_step = GradientEStep(model, latent_dim=latent_dim, family=method.family, lr=lr, num_steps=num_steps,
                               num_samples=num_samples)
        candidates.append(e_step.infer(x, init_params=result.params).posterior)
    options = {"num_samples": elbo_samples, "chunk_size": chunk_size}
    choose = torch.stack([elbo_estimate(model, q, x, **options) for q in candidates])
    score = torch.stack([elbo_estimate(model, q, x, **options) for q in candidates])
    best = choose.nan_to_num(nan=-math.inf).argmax(0)
    rates = torch.tensor([0.0, *lrs], dtype=torch.float64)
    return score.gather(0, best.unsqueeze(0)).squeeze(0), rates[best.cpu()]


def gap_report(
    model: LatentModel,
    methods: Mapping[str, InferenceMethod],
    x: Tensor,
    *,
    log_px: Tensor | None = None,
    ais_start: str | None = None,
    ais_options: Mapping[str, Any] | None = None,
    e_step_steps: int = 500,
    e_step_lrs: Sequence[float] = (0.1, 0.03, 0.01, 0.003),
    e_step_samples: int = 1,
    elbo_samples: int = 1000,
    iwae_samples: int = 5000,
    reference: str | None = None,
    bound_tolerance: float = 0.1,
    max_samples: int = 4096,
    chunk_size: int = 100,
    generator: torch.Generator | None = None,
) -> GapReport:
    """Approximation and amortization gaps, ELBO, IWAE and samples-to-bound of each method on ``x``.

    See the module docstring for the definitions and estimators.

    Args:
        model: anything with ``log_joint(x, z)`` and a single latent vector z.
        methods: inference methods by name; each one's ``infer(x)`` gives its λ and posterior, and its ``family``
            is the family whose best ELBO the E-steps seek.
        x: the data ``[B, *event]``.
        log_px: a known log p(x) ``[B]`` (e.g. exact, or an earlier AIS run); default: estimated by AIS.
        ais_start: the method whose posterior starts the AIS path (default: the prior). Any start gives a valid
            estimate; a good one needs far fewer annealing steps.
        ais_options: keyword options of :func:`~learned_inference.ais.annealed_importance_sampling` (``num_chains``,
            ``num_steps``, ``num_leapfrog``, ...).
        e_step_steps: the steps of each E-step (Adam) toward the family's best ELBO.
        e_step_lrs: their learning rates (the grid).
        e_step_samples: reparameterized samples per E-step ELBO evaluation.
        elbo_samples: samples of every ELBO estimate.
        iwae_samples: k of the IWAE column and of the reference bound.
        reference: the method whose IWAE-``iwae_samples`` is the bound of ``samples_to_bound`` (default: the first).
        bound_tolerance: nats below the bound that count as reaching it.
        max_samples: the largest k tried for ``samples_to_bound`` (the pool size per method).
        chunk_size: samples evaluated at once (memory grows with this).
        generator: seeds the whole report (torch's global generator is then left untouched).

    Returns:
        A :class:`GapReport`.

    Raises:
        ValueError: for an empty ``methods``, an unknown ``reference`` or ``ais_start``, or a ``log_px`` of the
            wrong shape.
    """
    check_data(x)
    if not methods:
        raise ValueError("methods must name at least one inference method, e.g. {'encoder': StandardEncoder(...)}")
    reference = next(iter(methods)) if reference is None else reference
    for option, name in (("reference", reference), ("ais_start", ais_start)):
        if name is not None and name not in methods:
            raise ValueError(f"{option}={name!r} is not one of the methods ({', '.join(map(repr, methods))})")
    if log_px is not None and (not isinstance(log_px, Tensor) or tuple(log_px.shape) != (x.shape[0],)):
        raise ValueError(f"log_px must be a tensor of shape [{x.shape[0]}] (one log p(x) per example of x), got "
                         f"{list(log_px.shape) if isinstance(log_px, Tensor) else type(log_px).__name__}")
    for option, value in (("e_step_steps", e_step_steps), ("e_step_samples", e_step_samples),
                          ("elbo_samples", elbo_samples), ("iwae_samples", iwae_samples),
                          ("max_samples", max_samples), ("chunk_size", chunk_size)):
        check_int(option, value, minimum=1)
    ais_settings = dict(ais_options or {})
    settings = {"e_step_steps": e_step_steps, "e_step_lrs": list(e_step_lrs), "e_step_samples": e_step_samples,
                "elbo_samples": elbo_samples, "iwae_samples": iwae_samples, "bound_tolerance": bound_tolerance,
                "max_samples": max_samples, "ais_start": ais_start, "ais_options": ais_settings,
                "num_examples": x.shape[0]}
    seed = None if generator is None else int(torch.randint(2 ** 62, (), generator=generator))
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else [], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        results = {name: method.infer(x) for name, method in methods.items()}
        ais, seconds = None, 0.0
        if log_px is None:
            start = time.perf_counter()
            initial = None if ais_start is None else results[ais_start].posterior
            if isinstance(initial, Mapping):
                raise NotImplementedError("gap_report supports a single latent vector z; ais_start's posterior is a "
                                          "dict of several latent variables")
            ais = annealed_importance_sampling(model, x, initial=initial, **ais_settings)
            seconds, log_px, error = time.perf_counter() - start, ais.log_px, ais.standard_error
        else:
            log_px, error = log_px.double(), torch.zeros_like(log_px, dtype=torch.float64)
        options = {"chunk_size": chunk_size}
        sizes = [2 ** i for i in range(int(math.log2(max_samples)) + 1)]
        rows = {}
        for name, method in methods.items():
            result = results[name]
            elbo = elbo_estimate(model, result.posterior, x, num_samples=elbo_samples, **options)
            best, best_lr = _best_family_elbo(model, method, result, x, lrs=e_step_lrs, num_steps=e_step_steps,
                                              num_samples=e_step_samples, elbo_samples=elbo_samples, **options)
            iwae = importance_weighted_log_marginal(model, result.posterior, x, num_samples=iwae_samples, **options)
            curve = mean_iwae_by_samples(_pool(model, result.posterior, x, size=max_samples, **options), sizes)
            rows[name] = (elbo, iwae, best, best_lr, curve)
    bound = rows[reference][1].mean().item()
    gaps = {name: MethodGaps(
        elbo=elbo, iwae=iwae, best_elbo=best, approximation_gap=log_px - best, amortization_gap=best - elbo,
        iwae_by_samples=curve, samples_to_bound=samples_to_bound(curve, bound, tolerance=bound_tolerance),
        best_lr=best_lr) for name, (elbo, iwae, best, best_lr, curve) in rows.items()}
    return GapReport(log_px=log_px, log_px_error=error, gaps=gaps, reference=reference, bound=bound, ais=ais,
                     ais_seconds=seconds, settings=settings)
