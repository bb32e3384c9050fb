"""Inference on probabilistic PCA, whose exact posterior and log p(x) are known (zoo.ProbabilisticPCA)."""

from __future__ import annotations

import itertools

import pytest
import torch

from learned_inference import IterativeInferenceOptimizer
from learned_inference.zoo import ProbabilisticPCA
from tests.conftest import train_update_network

TRAIN_STEPS = 5


@pytest.fixture(scope="module")
def trained():
    """An update network trained for T = 5 on a fixed pPCA model (about 20 s on 2 cores)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = ProbabilisticPCA.random(data_dim=16, latent_dim=4, generator=gen).requires_grad_(False)
    x_train, x_test = model.sample(4096, generator=gen), model.sample(512, generator=gen)
    inference = IterativeInferenceOptimizer(model, latent_dim=4, num_steps=TRAIN_STEPS, hidden_size=64)
    train_update_network(inference, x_train, iterations=1500)
    return model, inference, x_test


def _exact_gaps(model, inference, x, steps):
    """Per-step mean of log p(x) − ELBO(λ_t) along one run, with the ELBO in closed form (no sampling noise)."""
    log_px = model.log_marginal(x)
    trajectory = inference.infer(x, num_steps=steps, record_params=True).trajectory
    return [(log_px - model.exact_elbo(x, p["loc"], p["log_var"])).mean().item() for p in trajectory]


def test_trained_optimizer_reaches_exact_log_px_on_held_out_data(trained):
    model, inference, x_test = trained
    gaps = _exact_gaps(model, inference, x_test, TRAIN_STEPS)
    assert gaps[-1] < 0.1, gaps
    assert gaps[0] > 10, "the prior is far from the posterior, so the test is not trivial"


def test_elbo_improves_at_every_step_on_average(trained):
    model, inference, x_test = trained
    gaps = _exact_gaps(model, inference, x_test, TRAIN_STEPS)
    # Strict improvement while far from the optimum; at the optimum, no step may lose more than sampling jitter.
    assert gaps[1] < gaps[0] and gaps[2] < gaps[1], gaps
    assert all(b <= a + 5e-3 for a, b in itertools.pairwise(gaps)), gaps


def test_stable_when_run_for_four_times_its_training_steps(trained):
    model, inference, x_test = trained
    gaps = _exact_gaps(model, inference, x_test, 4 * TRAIN_STEPS)
    assert max(gaps[TRAIN_STEPS:]) < 0.1, gaps


def test_posterior_matches_the_exact_posterior(trained):
    model, inference, x_test = trained
    params = inference.infer(x_test, num_steps=TRAIN_STEPS).params
    loc, log_var = model.exact_posterior(x_test)
    posterior_sd = torch.exp(0.5 * log_var)
    assert ((params["loc"] - loc).abs() / posterior_sd).mean() < 0.1
    assert (params["log_var"] - log_var).abs().mean() < 0.1
