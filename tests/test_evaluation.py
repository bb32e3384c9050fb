"""Evaluation: the importance-weighted estimator against exact pPCA log p(x), chunking, stability, metrics."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributions import Distribution, Independent, Normal
from torch.profiler import ProfilerActivity, profile

from learned_inference import GradientEStep, StandardEncoder
from learned_inference.evaluation import (
    amortization_gap,
    bits_per_dim,
    elbo_estimate,
    importance_weighted_log_marginal,
    log_weights,
    perplexity,
)
from learned_inference.likelihoods import MultinomialLikelihood, multinomial_coefficient
from learned_inference.zoo import ProbabilisticPCA


def _ppca(batch: int, *, seed: int = 0) -> tuple[ProbabilisticPCA, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    model = ProbabilisticPCA.random(data_dim=8, latent_dim=3, generator=generator)
    return model, model.sample(batch, generator=generator)


@torch.no_grad()
def _posterior(model: ProbabilisticPCA, x: torch.Tensor, *, variance_ratio: float) -> Distribution:
    """The exact posterior with its variance multiplied by ``variance_ratio`` (an over-dispersed proposal)."""
    loc, log_var = model.exact_posterior(x)
    return Independent(Normal(loc, torch.exp(0.5 * (log_var + math.log(variance_ratio)))), 1)


def test_k5000_matches_exact_ppca_log_marginal_and_the_mean_rises_with_k() -> None:
    model, x = _ppca(200)
    posterior = _posterior(model, x, variance_ratio=4.0)
    exact = model.log_marginal(x).detach().double()
    torch.manual_seed(0)
    error = importance_weighted_log_marginal(model, posterior, x, num_samples=5000, chunk_size=500) - exact
    assert abs(error.mean()) < 0.01  # nats per example
    assert error.abs().max() < 0.15
    means = []
    for k in (1, 10, 100, 1000):
        torch.manual_seed(1)  # with chunks of 100 the k = 100 samples are the first of the k = 1000 ones
        means.append((importance_weighted_log_marginal(model, posterior, x, num_samples=k) - exact).mean())
    assert all(later >= earlier for earlier, later in itertools.pairwise(means)), means
    assert means[0] < -1.0  # k = 1 is the ELBO: KL(q || p) = 3 · ½(4 − 1 − log 4) ≈ 2.4 nats below


def test_exact_posterior_gives_exact_estimates_for_any_k() -> None:
    model, x = _ppca(10)
    posterior = _posterior(model, x, variance_ratio=1.0)
    exact = model.log_marginal(x).detach().double()
    for k in (1, 7):
        torch.testing.assert_close(
            importance_weighted_log_marginal(model, posterior, x, num_samples=k), exact, rtol=0, atol=1e-4
        )
        torch.testing.assert_close(
            elbo_estimate(model, posterior, x, num_samples=k), exact, rtol=0, atol=1e-4
        )


class _Replay(Distribution):
    """A Gaussian whose ``sample`` hands out the rows of a fixed ``[K, B, D]`` tensor in order."""

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, draws: torch.Tensor) -> None:
        self.normal = Independent(Normal(loc, scale), 1)
        self.draws, self.used = draws, 0
        super().__init__(loc.shape[:-1], loc.shape[-1:], validate_args=False)

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:  # noqa: B008
        out = self.draws[self.used : self.used + sample_shape[0]]
        self.used += sample_shape[0]
        return out

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return self.normal.log_prob(value)


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1000])
def test_chunking_reduces_exactly_like_one_logsumexp(chunk_size: int) -> None:
    model, x = _ppca(5)
    loc, scale = torch.zeros(5, 3), torch.ones(5, 3)
    draws = torch.randn(64, 5, 3, generator=torch.Generator().manual_seed(2))
    weights = (
        (model.log_joint(x, draws) - Independent(Normal(loc, scale), 1).log_prob(draws)).detach().double()
    )
    expected_iw = torch.logsumexp(weights, 0) - math.log(64)
    got_iw = importance_weighted_log_marginal(
        model, _Replay(loc, scale, draws), x, num_samples=64, chunk_size=chunk_size
    )
    torch.testing.assert_close(got_iw, expected_iw)
    got_elbo = elbo_estimate(model, _Replay(loc, scale, draws), x, num_samples=64, chunk_size=chunk_size)
    torch.testing.assert_close(got_elbo, weights.mean(0))


class _FarModel:
    """log p(x, z) = −5000 + log N(z; 0, I): exp of any log weight underflows, even in float64."""

    def log_joint(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return -5000.0 + Normal(0.0, 1.0).log_prob(z).sum(-1)


def test_estimate_is_stable_for_tiny_weights_and_float64() -> None:
    q = Independent(Normal(torch.zeros(3, 2), 2.0), 1)
    estimate = importance_weighted_log_marginal(
        _FarModel(), q, torch.zeros(3, 1), num_samples=20000, chunk_size=999
    )
    assert estimate.dtype == torch.float64
    torch.testing.assert_close(estimate, torch.full((3,), -5000.0, dtype=torch.float64), rtol=0, atol=0.05)


@settings(max_examples=10, deadline=None)
@given(batch=st.integers(2, 6), seed=st.integers(0, 2**16), data=st.data())
def test_changing_one_example_never_changes_another_estimate(
    batch: int, seed: int, data: st.DataObject
) -> None:
    model, x = _ppca(batch, seed=seed % 7)
    changed = data.draw(st.integers(0, batch - 1))
    other = x.clone()
    other[changed] += 1.0
    estimates = []
    for inputs in (x, other):
        torch.manual_seed(seed)
        estimates.append(
            importance_weighted_log_marginal(
                model, _posterior(model, x, variance_ratio=2.0), inputs, num_samples=30, chunk_size=8
            )
        )
    keep = torch.arange(batch) != changed
    torch.testing.assert_close(estimates[0][keep], estimates[1][keep], rtol=0, atol=0)
    assert estimates[0][changed] != estimates[1][changed]


def test_several_latent_variables_sum_their_log_densities() -> None:
    class TwoLatents:
        def log_joint(self, x: torch.Tensor, z: dict[str, torch.Tensor]) -> torch.Tensor:
            return Normal(0.0, 1.0).log_prob(torch.cat([z["a"], z["b"]], -1)).sum(-1)

    prior = {name: Independent(Normal(torch.zeros(4, size), 1.0), 1) for name, size in (("a", 2), ("b", 1))}
    weights = log_weights(TwoLatents(), prior, torch.zeros(4, 1), num_samples=3)
    torch.testing.assert_close(weights, torch.zeros(3, 4))  # q = p(z) and p(x | z) = 1: every weight is 1


def test_peak_memory_does_not_grow_with_k() -> None:
    model, x = _ppca(4)
    posterior = _posterior(model, x, variance_ratio=2.0)

    def peak(num_samples: int) -> int:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            importance_weighted_log_marginal(model, posterior, x, num_samples=num_samples, chunk_size=50)
        events = sorted(
            (e.start_ns(), e.nbytes())
            for e in prof.profiler.kineto_results.events()
            if e.name() == "[memory]"
        )
        running = torch.tensor([nbytes for _, nbytes in events]).cumsum(0)
        return int(running.max())

    small, large = peak(100), peak(2000)
    assert small > 50 * 4 * 8 * 4  # at least one chunk of x-sized activations
    assert large <= small


def test_amortization_gap_of_a_biased_encoder_is_its_ppca_elbo_deficit() -> None:
    model, x = _ppca(6)
    model, x = model.double(), x.double()
    loc, log_var = (value.detach() for value in model.exact_posterior(x))
    biased = (loc + 0.1, log_var + 0.5)
    guess = StandardEncoder(model, latent_dim=3, init=lambda inputs: biased).infer(x)
    e_step = GradientEStep(model, latent_dim=3, lr=0.01, num_steps=300, num_samples=16)
    torch.manual_seed(0)
    gap = amortization_gap(guess, x, e_step=e_step, num_samples=10000, chunk_size=2500)
    expected = (model.log_marginal(x) - model.exact_elbo(x, *biased)).detach()
    assert gap.shape == (6,) and gap.dtype == torch.float64
    assert expected.min() > 0.4
    torch.testing.assert_close(gap, expected, rtol=0, atol=0.06)  # Monte Carlo noise of the two ELBOs


def test_perplexity_and_bits_per_dim() -> None:
    counts = torch.tensor([[2.0, 0.0, 1.0], [0.0, 5.0, 0.0]])
    log_px = torch.tensor([-3.0, -7.0])
    assert perplexity(log_px, counts).item() == pytest.approx(math.exp(10.0 / 8.0))
    images = torch.zeros(2, 1, 2, 2)
    assert bits_per_dim(log_px, images).item() == pytest.approx(5.0 / (4 * math.log(2)))


@given(counts=st.lists(st.lists(st.integers(0, 6), min_size=4, max_size=4), min_size=1, max_size=5),
       seed=st.integers(0, 2**16))
@settings(max_examples=30, deadline=None)
def test_multinomial_conventions_differ_by_the_coefficient_and_match_torch(counts: list[list[int]], seed: int) -> None:
    """Default: Σ xᵢ log pᵢ (the topic-model convention); normalized: torch's Multinomial log-probability."""
    x = torch.tensor(counts, dtype=torch.float64)
    logits = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    tokens = MultinomialLikelihood().log_prob(logits, x)
    normalized = MultinomialLikelihood(normalized=True).log_prob(logits, x)
    torch.testing.assert_close(tokens, (x * torch.log_softmax(logits, -1)).sum(-1))
    reference = torch.stack([torch.distributions.Multinomial(int(row.sum()), logits=row_logits).log_prob(row)
                             for row, row_logits in zip(x, logits, strict=True)])
    torch.testing.assert_close(normalized, reference)
    torch.testing.assert_close(normalized - tokens, multinomial_coefficient(x))


def test_a_uniform_model_has_the_vocabulary_size_as_perplexity() -> None:
    """The literature's perplexity of a model that draws every token uniformly is V, whatever the documents."""
    counts = torch.tensor([[3.0, 0.0, 1.0, 0.0, 2.0], [0.0, 0.0, 7.0, 1.0, 0.0]])
    log_px = MultinomialLikelihood().log_prob(torch.zeros_like(counts), counts)
    assert perplexity(log_px, counts).item() == pytest.approx(5.0)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: perplexity(torch.zeros(3), torch.ones(2, 4)), "log_px of shape"),
        (lambda: bits_per_dim(torch.zeros(2, 1), torch.ones(2, 4)), "log_px of shape"),
        (
            lambda: importance_weighted_log_marginal(
                _FarModel(), Independent(Normal(torch.zeros(3, 2), 1.0), 1), torch.zeros(4, 1)
            ),
            r"batch shape \[4\]",
        ),
        (
            lambda: importance_weighted_log_marginal(
                _FarModel(), Normal(torch.zeros(4), 1.0), torch.zeros(4, 1)
            ),
            "event shape",
        ),
        (
            lambda: importance_weighted_log_marginal(
                _FarModel(), Independent(Normal(torch.zeros(4, 2), 1.0), 1), torch.zeros(4, 1), chunk_size=0
            ),
            "chunk_size",
        ),
        (
            lambda: amortization_gap(None, torch.zeros(4, 1), e_step=object()),
            "e_step must be a GradientEStep",
        ),
    ],
)
def test_bad_arguments_are_named(call: Callable[[], object], match: str) -> None:
    with pytest.raises((TypeError, ValueError), match=match):
        call()
