"""Annealed importance sampling (AIS) of log p(x) with Hamiltonian Monte Carlo transitions (Neal 2001).

A ground truth for the inference gaps: unlike an importance-weighted bound, AIS approaches log p(x) however poor
the proposal, as the number of annealing steps grows. Between an initial distribution q(z) (the prior, or any
``[B]``-batched posterior) and the unnormalized posterior p(x, z) it walks the geometric path

    f_t(z) = q(z)^{1 − β_t} p(x, z)^{β_t},      0 = β_0 < β_1 < … < β_T = 1,

with K independent chains per example: z_0 ~ q, then for t = 1..T the weight grows by the ratio of successive
densities at the current state and z moves by an HMC transition that leaves f_t invariant,

    log w ← log w + (β_t − β_{t−1}) (log p(x, z_{t−1}) − log q(z_{t−1})),      z_t ~ HMC_{f_t}(· | z_{t−1}),

    log p̂(x) = logsumexp_k(log w_k) − log K.

E[p̂(x)] = p(x) for any schedule and kernels that leave their f_t invariant, so E[log p̂(x)] ≤ log p(x) (a stochastic
lower bound, like IWAE); with enough steps the log weights of all chains agree and the bound is tight. The spread of
the log weights over the chains is the diagnostic: :attr:`AISResult.standard_error` is the delta-method standard
error of log p̂, std_k(w) / (√K · mean_k(w)), small only when the chains agree.

Each HMC transition draws a momentum r ~ N(0, I), takes L leapfrog steps of size ε on log f_t (one gradient each)

    r ← r + ε/2 ∇ log f_t(z),   z ← z + ε r,   r ← r + ε/2 ∇ log f_t(z),

and accepts the end point with probability min(1, exp(H(z, r) − H(z', r'))), H = −log f_t(z) + ½‖r‖². Every
example has its own step size; with ``adapt_step_size=True`` (default) it moves after every transition toward the
target acceptance rate, log ε ← log ε + ``adaptation_rate`` · (ā − ``target_acceptance``), ā the example's mean
acceptance probability over its chains (Wu et al. 2017, "On the quantitative analysis of decoder-based generative
models", adapt toward 0.65; with one transition per annealing step a higher target, 0.9 by default, gave a smaller
spread of the log weights on linear-Gaussian models). The adaptation uses the chains' past, a standard departure
from fixed kernels (no bias was measurable on linear-Gaussian models); ``adapt_step_size=False`` keeps ε fixed at
``step_size`` (p̂ exactly unbiased).

The schedule is sigmoidal (Grosse et al. 2016): β_t = (σ(δ(2t/T − 1)) − σ(−δ)) / (σ(δ) − σ(−δ)), δ = 4, dense near
β = 0 and β = 1 where the density changes fastest; :func:`sigmoid_schedule`. Cost: T · L evaluations of
log p(x, z) and its z-gradient for each of the K · B chains.

Only a single latent vector z (``[S, B, D]``) is supported: models whose ``log_joint`` takes a dict of latent
variables are not (yet) and raise a ``NotImplementedError``.

Example:
    >>> import torch
    >>> from learned_inference.zoo import ProbabilisticPCA
    >>> model = ProbabilisticPCA.random(data_dim=5, latent_dim=2, generator=torch.Generator().manual_seed(0))
    >>> x = model.sample(3, generator=torch.Generator().manual_seed(1))
    >>> result = annealed_importance_sampling(model, x, num_chains=32, num_steps=500, num_leapfrog=5,
    ...                                       generator=torch.Generator().manual_seed(2))
    >>> error = result.log_px - model.log_marginal(x).double()
    >>> bool((error.abs() < 3 * result.standard_error + 0.01).all())
    True
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.distributions import Distribution, Independent, Normal

from learned_inference.model import LatentModel, WithPrior, check_model, check_support
from learned_inference.validation import check_data, check_int

__all__ = ["AISResult", "annealed_importance_sampling", "hmc_transition", "leapfrog", "sigmoid_schedule"]

#: a log density of z ``[K, B, D]`` returning its values ``[K, B]`` and z-gradient ``[K, B, D]``
LogDensity = Callable[[Tensor], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class AISResult:
    """What :func:`annealed_importance_sampling` returns (per example b of the batch).

    Attributes:
        log_px: ``[B]`` float64, the estimate log p̂(x) = logsumexp_k(log w_k) − log K.
        log_weights: ``[K, B]`` float64, the chains' log weights.
        standard_error: ``[B]`` float64, the delta-method standard error of log p̂: std_k(w) / (√K · mean_k(w)).
        log_weight_std: ``[B]`` float64, the standard deviation of the log weights over the chains.
        acceptance: ``[B]``, the HMC acceptance probability averaged over chains and transitions.
        step_size: ``[B]``, the leapfrog step size at the end of the run.
        betas: ``[T + 1]``, the annealing schedule used.
    """

    log_px: Tensor
    log_weights: Tensor
    standard_error: Tensor
    log_weight_std: Tensor
    acceptance: Tensor
    step_size: Tensor
    betas: Tensor


def sigmoid_schedule(num_steps: int, *, sharpness: float = 4.0, dtype: torch.dtype = torch.float64) -> Tensor:
    """The sigmoidal annealing schedule β_0 = 0 < … < β_T = 1 (``[num_steps + 1]``; Grosse et al. 2016).

    β_t = (σ(δ(2t/T − 1)) − σ(−δ)) / (σ(δ) − σ(−δ)) with δ = ``sharpness``: small steps near both ends.

    Example:
        >>> sigmoid_schedule(4)
        tensor([0.0000, 0.1050, 0.5000, 0.8950, 1.0000], dtype=torch.float64)
    """
    check_int("num_steps", num_steps, minimum=1)
    if not sharpness > 0:
        raise ValueError(f"sharpness must be > 0, got {sharpness!r}")
    s = torch.sigmoid(sharpness * (2 * torch.arange(num_steps + 1, dtype=torch.float64) / num_steps - 1))
    return ((s - s[0]) / (s[-1] - s[0])).to(dtype)


def leapfrog(
    log_density: LogDensity, z: Tensor, momentum: Tensor, grad: Tensor, *, step_size: Tensor, num_steps: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``num_steps`` leapfrog steps of Hamiltonian dynamics on −log f with unit mass.

    Args:
        log_density: z ``[K, B, D]`` → (log f(z) ``[K, B]``, ∇_z log f(z) ``[K, B, D]``).
        z: the position ``[K, B, D]``.
        momentum: r, ``[K, B, D]``.
        grad: ∇_z log f(z) at ``z``.
        step_size: ε, broadcastable to ``z`` (e.g. ``[1, B, 1]`` per example).
        num_steps: L.

    Returns:
        ``(z', r', log f(z'), ∇ log f(z'))``.

    Example:
        >>> def log_density(z):          # a standard normal: the dynamics rotate (z, r)
        ...     return -0.5 * z.square().sum(-1), -z
        >>> z, r = torch.ones(1, 1, 1), torch.zeros(1, 1, 1)
        >>> z, r, value, _ = leapfrog(log_density, z, r, -z, step_size=torch.tensor(0.01), num_steps=157)
        >>> round(abs(z.item()), 2), round(r.item(), 2)          # a quarter turn: (1, 0) -> (0, -1)
        (0.0, -1.0)
    """
    check_int("num_steps", num_steps, minimum=1)
    value = grad.new_zeros(z.shape[:-1])
    momentum = momentum + 0.5 * step_size * grad
    for step in range(num_steps):
        z = z + step_size * momentum
        value, grad = log_density(z)
        momentum = momentum + (step_size if step < num_steps - 1 else 0.5 * step_size) * grad
    return z, momentum, value, grad


def hmc_transition(
    log_density: LogDensity,
    z: Tensor,
    value: Tensor,
    grad: Tensor,
    *,
    step_size: Tensor,
    num_leapfrog: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One HMC transition per chain, leaving the density f invariant (fresh momentum, L leapfrog steps, MH test).

    Draws the momentum and the acceptance uniforms from torch's global generator. A proposal with a non-finite
    log density is rejected.

    Args:
        log_density: z ``[K, B, D]`` → (log f(z) ``[K, B]``, ∇_z log f(z) ``[K, B, D]``).
        z: the chains' states ``[K, B, D]``.
        value: log f(z) ``[K, B]``.
        grad: ∇_z log f(z) ``[K, B, D]``.
        step_size: ε, broadcastable to ``z``.
        num_leapfrog: L.

    Returns:
        ``(z, log f(z), ∇ log f(z), acceptance probability [K, B], accepted [K, B])`` after the transition.

    Example:
        >>> def log_density(z):
        ...     return -0.5 * z.square().sum(-1), -z
        >>> z = torch.zeros(4, 2, 3)
        >>> z, value, grad, accept, _ = hmc_transition(log_density, z, *log_density(z),
        ...                                            step_size=torch.tensor(0.1), num_leapfrog=5)
        >>> z.shape, bool(((accept >= 0) & (accept <= 1)).all())
        (torch.Size([4, 2, 3]), True)
    """
    momentum = torch.randn_like(z)
    proposal, end_momentum, new_value, new_grad = leapfrog(
        log_density, z, momentum, grad, step_size=step_size, num_steps=num_leapfrog)
    log_ratio = new_value - value - 0.5 * (end_momentum.square().sum(-1) - momentum.square().sum(-1))
    log_ratio = torch.where(torch.isfinite(log_ratio), log_ratio, torch.full_like(log_ratio, -math.inf))
    accept_prob = log_ratio.clamp(max=0.0).exp()
    accept = torch.rand_like(accept_prob) < accept_prob
    return (torch.where(accept.unsqueeze(-1), proposal, z), torch.where(accept, new_value, value),
            torch.where(accept.unsqueeze(-1), new_grad, grad), accept_prob, accept)


def _value_and_grad(fn: Callable[[Tensor], Tensor], z: Tensor) -> tuple[Tensor, Tensor]:
    """``fn(z)`` ``[K, B]`` (detached) and its z-gradient: the gradient of the sum is per chain and example, since
    neither chains nor (by the model contract) examples are coupled."""
    with torch.enable_grad():
        leaf = z.detach().requires_grad_(True)
        value = fn(leaf)
        (grad,) = torch.autograd.grad(value.sum(), leaf)
    return value.detach(), grad


def _initial_distribution(
    model: LatentModel, x: Tensor, initial: Distribution | None, latent_dim: int | None
) -> Distribution:
    """q: ``initial`` (batch shape [B] or []), else ``model.prior()``, else N(0, I) over ``latent_dim``."""
    names = getattr(getattr(model, "latent_space", None), "names", None)
    if isinstance(initial, Mapping) or isinstance(getattr(model, "latent_dim", None), Mapping) or names is not None:
        raise NotImplementedError(
            "annealed_importance_sampling supports a single latent vector z ([S, B, D]); this model has several "
            "latent variables (a dict z), which AIS does not support yet. Estimate log p(x) with "
            "learned_inference.evaluation.importance_weighted_log_marginal instead."
        )
    if initial is None and isinstance(model, WithPrior):
        initial = model.prior()
    if initial is None:
        if latent_dim is None:
            raise ValueError(f"{type(model).__name__} has no prior(); pass latent_dim= (for an N(0, I) start) or "
                             "initial= (a torch.distributions.Distribution over z)")
        zeros = x.new_zeros(check_int("latent_dim", latent_dim, minimum=1))
        return Independent(Normal(zeros, torch.ones_like(zeros), validate_args=False), 1, validate_args=False)
    if not isinstance(initial, Distribution):
        raise TypeError(f"initial must be a torch.distributions.Distribution, got {type(initial).__name__}")
    batch = x.shape[0]
    if tuple(initial.batch_shape) not in ((), (batch,)) or len(initial.event_shape) != 1:
        raise ValueError(
            f"initial must have batch shape [] or [{batch}] (x's batch) and an event shape [D], got batch shape "
            f"{list(initial.batch_shape)} and event shape {list(initial.event_shape)} (e.g. pass result.posterior "
            "of an inference run on the same x)"
        )
    return initial


def annealed_importance_sampling(
    model: LatentModel,
    x: Tensor,
    *,
    initial: Distribution | None = None,
    num_chains: int = 16,
    num_steps: int = 500,
    num_leapfrog: int = 10,
    step_size: float = 0.05,
    adapt_step_size: bool = True,
    target_acceptance: float = 0.9,
    adaptation_rate: float = 0.1,
    betas: Tensor | None = None,
    latent_dim: int | None = None,
    generator: torch.Generator | None = None,
) -> AISResult:
    """AIS estimate of log p(x) per example, with HMC transitions on the path q^{1−β} p(x, ·)^β (module docstring).

    Args:
        model: anything with ``log_joint(x, z)``, ``[S, B]`` for z ``[S, B, D]`` (a single latent vector).
        x: the data ``[B, *event]``.
        initial: q, the start of the path: a ``Distribution`` with event shape ``[D]`` and batch shape ``[B]`` (e.g.
            an encoder's ``result.posterior``) or ``[]``; default ``model.prior()``, or N(0, I) over ``latent_dim``.
            Its ``log_prob`` must be differentiable in z (every torch distribution with a density is).
        num_chains: K independent chains per example.
        num_steps: annealing steps T (intermediate distributions); ignored when ``betas`` is given.
        num_leapfrog: leapfrog steps L per HMC transition.
        step_size: the initial (or, without adaptation, the fixed) leapfrog step size ε.
        adapt_step_size: adapt each example's ε toward ``target_acceptance`` after every transition.
        target_acceptance: the acceptance rate the adaptation aims at.
        adaptation_rate: how fast log ε moves per transition per unit of acceptance-rate error.
        betas: an explicit schedule ``[T + 1]``, increasing from 0 to 1 (default :func:`sigmoid_schedule`).
        latent_dim: D, for the N(0, I) start of a model without ``prior()``.
        generator: seeds every random draw of the run (torch's global generator is then left untouched).

    Returns:
        An :class:`AISResult`: ``log_px`` and the diagnostics.

    Raises:
        NotImplementedError: for a model with several latent variables (a dict z).
        ValueError: for bad options or an ``initial`` whose shape does not fit ``x``.

    Example:
        >>> import torch
        >>> from learned_inference import DecoderModel
        >>> model = DecoderModel(torch.nn.Linear(2, 6), likelihood="bernoulli", latent_dim=2)
        >>> result = annealed_importance_sampling(model, torch.ones(4, 6), num_chains=3, num_steps=10,
        ...                                       generator=torch.Generator().manual_seed(0))
        >>> result.log_px.shape, result.log_weights.shape, result.log_px.dtype
        (torch.Size([4]), torch.Size([3, 4]), torch.float64)
    """
    check_model(model)
    check_data(x)
    check_support(model, x)
    check_int("num_chains", num_chains, minimum=1)
    check_int("num_leapfrog", num_leapfrog, minimum=1)
    for name, value, low, high in (("step_size", step_size, 0.0, math.inf),
                                   ("target_acceptance", target_acceptance, 0.0, 1.0),
                                   ("adaptation_rate", adaptation_rate, 0.0, math.inf)):
        if not low < value < high:
            raise ValueError(f"{name} must be in ({low}, {high}), got {value!r}")
    if betas is None:
        betas = sigmoid_schedule(num_steps)
    elif not (isinstance(betas, Tensor) and betas.dim() == 1 and len(betas) >= 2 and betas[0] == 0
              and betas[-1] == 1 and bool((betas[1:] > betas[:-1]).all())):
        raise ValueError("betas must be a 1-D tensor increasing strictly from 0 to 1 (e.g. sigmoid_schedule(T)), "
                         f"got {betas!r}")
    q = _initial_distribution(model, x, initial, latent_dim)
    seed = None if generator is None else int(torch.randint(2 ** 62, (), generator=generator))
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices, enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        return _run(model, x, q, betas.tolist(), num_chains=num_chains, num_leapfrog=num_leapfrog,
                    step_size=step_size, adapt=adapt_step_size, target=target_acceptance, rate=adaptation_rate)


def _run(model: LatentModel, x: Tensor, q: Distribution, betas: list[float], *, num_chains: int, num_leapfrog: int,
         step_size: float, adapt: bool, target: float, rate: float) -> AISResult:
    """The annealing loop of :func:`annealed_importance_sampling` (validated inputs, RNG already set)."""
    batch = x.shape[0]
    z = q.sample((num_chains,) if tuple(q.batch_shape) else (num_chains, batch)).to(x.dtype)
    joint, joint_grad = _value_and_grad(lambda z: model.log_joint(x, z), z)
    log_q, log_q_grad = _value_and_grad(q.log_prob, z)
    if joint.shape != (num_chains, batch):
        raise ValueError(f"model.log_joint(x, z) must return [S, B] = {[num_chains, batch]} for z of shape "
                         f"{list(z.shape)} ([S, B, D]), got {list(joint.shape)}")
    log_w = torch.zeros(num_chains, batch, dtype=torch.float64, device=x.device)
    eps = torch.full((batch,), step_size, dtype=x.dtype, device=x.device)
    acceptance = torch.zeros(batch, dtype=torch.float64, device=x.device)
    for previous, beta in itertools.pairwise(betas):
        log_w += (beta - previous) * (joint - log_q).double()

        def log_density(z: Tensor, beta: float = beta) -> tuple[Tensor, Tensor]:
            nonlocal joint, joint_grad, log_q, log_q_grad
            joint, joint_grad = _value_and_grad(lambda z: model.log_joint(x, z), z)
            log_q, log_q_grad = _value_and_grad(q.log_prob, z)
            return (1 - beta) * log_q + beta * joint, (1 - beta) * log_q_grad + beta * joint_grad

        start = (joint, joint_grad, log_q, log_q_grad)
        value, grad = (1 - beta) * log_q + beta * joint, (1 - beta) * log_q_grad + beta * joint_grad
        z, _, _, accept_prob, accepted = hmc_transition(log_density, z, value, grad,
                                                        step_size=eps.view(1, batch, 1), num_leapfrog=num_leapfrog)
        # log_density left the proposal's terms behind: keep them where it was accepted
        joint, log_q = torch.where(accepted, joint, start[0]), torch.where(accepted, log_q, start[2])
        joint_grad = torch.where(accepted.unsqueeze(-1), joint_grad, start[1])
        log_q_grad = torch.where(accepted.unsqueeze(-1), log_q_grad, start[3])
        mean_accept = accept_prob.mean(0)
        acceptance += mean_accept.double()
        if adapt:
            eps = eps * torch.exp(rate * (mean_accept - target))
    log_px = torch.logsumexp(log_w, 0) - math.log(num_chains)
    weights = torch.exp(log_w - log_w.max(0).values)
    zero = torch.zeros_like(log_px)
    spread, log_spread = (weights.std(0), log_w.std(0)) if num_chains > 1 else (zero, zero)
    return AISResult(log_px=log_px, log_weights=log_w,
                     standard_error=spread / (math.sqrt(num_chains) * weights.mean(0)), log_weight_std=log_spread,
                     acceptance=acceptance / (len(betas) - 1), step_size=eps, betas=torch.tensor(betas))
