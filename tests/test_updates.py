"""Update rules: the natural gradient's Fisher metric, and a learned step that vanishes with the gradient."""

from __future__ import annotations

import pytest
import torch

from learned_inference import DecoderModel, IterativeInferenceOptimizer
from learned_inference.block_family import BlockFamily
from learned_inference.context import StepContext
from learned_inference.families import DiagonalGaussian
from learned_inference.latent_space import LatentSpace
from learned_inference.objectives import Objective, sample_noise
from learned_inference.updates import NaturalGradientUpdate, StagedUpdate
from learned_inference.zoo import ProbabilisticPCA
from tests.conftest import mlp_decoder


def test_the_default_updates_classes_are_exported_at_the_top_level():
    import learned_inference

    model = ProbabilisticPCA.random(data_dim=3, latent_dim=2)
    inference = IterativeInferenceOptimizer(model, latent_dim=2, hidden_size=8)
    assert isinstance(inference.update, learned_inference.StagedUpdate)
    assert isinstance(inference.update.then, learned_inference.NaturalGradientUpdate)
    assert {"StagedUpdate", "NaturalGradientUpdate"} <= set(learned_inference.__all__)


def test_gaussian_natural_gradient_uses_the_fisher_information_of_q():
    """F is the Hessian of δ ↦ KL(q_λ || q_{λ+δ}) at 0; the family's natural gradient must be F⁻¹∇."""
    torch.manual_seed(0)
    family = DiagonalGaussian()
    loc, log_var = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)

    def kl(delta: torch.Tensor) -> torch.Tensor:
        q = family.distribution({"loc": loc[None], "log_var": log_var[None]})
        r = family.distribution({"loc": (loc + delta[:3])[None], "log_var": (log_var + delta[3:])[None]})
        return torch.distributions.kl_divergence(q, r).sum()

    fisher = torch.autograd.functional.hessian(kl, torch.zeros(6, dtype=torch.float64))
    grads = {"loc": torch.randn(1, 3, dtype=torch.float64), "log_var": torch.randn(1, 3, dtype=torch.float64)}
    natural = family.natural_gradient({"loc": loc[None], "log_var": log_var[None]}, grads)
    expected = torch.linalg.solve(fisher, torch.cat([grads["loc"][0], grads["log_var"][0]]))
    torch.testing.assert_close(torch.cat([natural["loc"][0], natural["log_var"][0]]), expected)


def test_natural_gradient_update_leaves_a_stationary_point_where_it_is():
    """With a point-estimate family the gradient is zero at the MAP (to rounding), so any number of steps of an
    untrained (random) natural-gradient optimizer leave it there: the step vanishes with the gradient. (Steps are
    kept small: the Delta family has no Fisher metric, and a raw-gradient step of 0.5 would be unstable here.)"""
    gen = torch.Generator().manual_seed(0)
    model = ProbabilisticPCA.random(data_dim=6, latent_dim=2, dtype=torch.float64, generator=gen)
    x = model.sample(4, generator=gen)
    map_estimate = model.exact_posterior(x)[0]
    update = NaturalGradientUpdate(("loc",), hidden_size=8, dim=2, max_step=0.02, init_step=0.01)
    inference = IterativeInferenceOptimizer(model, latent_dim=2, family="delta", update=update, hidden_size=8)
    inference.double()
    result = inference.infer(x, num_steps=50, init_params={"loc": map_estimate})
    torch.testing.assert_close(result.params["loc"], map_estimate, rtol=0, atol=1e-10)
    # The gated update (paper eq. 62) has no such fixed point: untrained, it moves away.
    gated = IterativeInferenceOptimizer(model, latent_dim=2, family="delta", hidden_size=8).double()
    moved = gated.infer(x, num_steps=50, init_params={"loc": map_estimate}).params["loc"]
    assert (moved - map_estimate).abs().max() > 1e-3


def test_natural_gradient_steps_start_at_init_step_and_stay_in_range():
    update = NaturalGradientUpdate(("loc",), hidden_size=4, dim=2, max_step=2.0, init_step=0.5)
    step = update.max_step * update.steps["loc"](torch.zeros(1, 4)).sigmoid()
    torch.testing.assert_close(step, torch.full((1, 2), 0.5))
    with pytest.raises(ValueError, match="need 0 < init_step < max_step"):
        NaturalGradientUpdate(("loc",), hidden_size=4, dim=2, max_step=1.0, init_step=1.0)


def test_antithetic_pairs_cancel_the_gradient_noise_of_a_quadratic_model():
    """For a linear-Gaussian model log p(x, z) is quadratic in z, so the reparameterized μ-gradient is
    ∇μL(μ) + Hσε: its noise is linear in ε, and antithetic pairs (ε, −ε) remove it exactly."""
    gen = torch.Generator().manual_seed(0)
    model = ProbabilisticPCA.random(data_dim=6, latent_dim=2, dtype=torch.float64, generator=gen)
    x = model.sample(4, generator=gen)
    objective = Objective(model, DiagonalGaussian(), LatentSpace(2))
    params = {"loc": torch.randn(4, 2, dtype=torch.float64, generator=gen), "log_var": torch.zeros(4, 2).double()}

    def loc_gradients(antithetic: bool) -> torch.Tensor:
        return torch.stack([
            objective.elbo_and_grad(params, x, sample_noise(2, 4, 2, dtype=torch.float64, device=None,
                                                            antithetic=antithetic))[1]["loc"]
            for _ in range(20)
        ])

    assert loc_gradients(True).std(0).max() < 1e-10 < 1e-2 < loc_gradients(False).std(0).min()
    with pytest.raises(ValueError, match="antithetic=True needs an even num_samples"):
        IterativeInferenceOptimizer(model, num_samples=3, antithetic=True, latent_dim=2)


def test_fisher_norm_is_twice_the_kl_to_second_order():
    """½‖Δ‖_F² = KL(q_λ || q_{λ+Δ}) + O(|Δ|³): checked on a small step, for one Gaussian and for two blocks."""
    gen = torch.Generator().manual_seed(0)
    family = DiagonalGaussian()
    params = {"loc": torch.randn(4, 3, generator=gen).double(), "log_var": torch.randn(4, 3, generator=gen).double()}
    step = {name: 1e-3 * torch.randn(4, 3, generator=gen).double() for name in params}
    moved = {name: params[name] + step[name] for name in params}
    kl = torch.distributions.kl_divergence(family.distribution(params), family.distribution(moved))
    torch.testing.assert_close(0.5 * family.squared_fisher_norm(params, step), kl, rtol=1e-2, atol=0)
    blocks = BlockFamily({"a": "diagonal_gaussian", "b": "diagonal_gaussian"}, space=LatentSpace({"a": 1, "b": 2}))
    torch.testing.assert_close(blocks.squared_fisher_norm(params, step), family.squared_fisher_norm(params, step))


def test_the_trust_region_bounds_every_step_and_leaves_short_steps_alone():
    """From the prior the ELBO is steep: every example's step is cut to ½‖Δ‖_F² = max_kl; a generous region
    changes nothing."""
    gen = torch.Generator().manual_seed(0)
    model = ProbabilisticPCA.random(data_dim=6, latent_dim=2, dtype=torch.float64, generator=gen)
    x = 20 * model.sample(5, generator=gen)

    def first_step(max_kl: float | None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        torch.manual_seed(1)
        update = NaturalGradientUpdate(("loc", "log_var"), hidden_size=8, dim=2, max_kl=max_kl)
        inference = IterativeInferenceOptimizer(model, latent_dim=2, update=update, hidden_size=8).double()
        result = inference.infer(x, num_steps=1, record_params=True)
        return result.trajectory[0], result.params

    start, bounded = first_step(0.1)
    step = {name: bounded[name] - start[name] for name in start}
    kl = 0.5 * DiagonalGaussian().squared_fisher_norm(start, step)
    torch.testing.assert_close(kl, torch.full((5,), 0.1, dtype=torch.float64))
    torch.testing.assert_close(first_step(1e9)[1], first_step(None)[1])
    with pytest.raises(ValueError, match="max_kl must be > 0 nats"):
        NaturalGradientUpdate(("loc",), hidden_size=4, dim=2, max_kl=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_trust_region_has_finite_derivatives_at_a_zero_step(dtype):
    """An example whose gradient is (nearly) zero, converged, takes a (nearly) zero step; the heads' derivatives
    stay finite (a division by the step's tiny norm overflowed in float32 and gave NaN)."""
    update = NaturalGradientUpdate(("loc", "log_var"), hidden_size=4, dim=2, max_kl=20.0).to(dtype)
    model = ProbabilisticPCA.random(data_dim=3, latent_dim=2, dtype=dtype, generator=torch.Generator().manual_seed(0))
    objective = Objective(model, DiagonalGaussian(), LatentSpace(2))
    params = {"loc": torch.zeros(2, 2, dtype=dtype), "log_var": torch.zeros(2, 2, dtype=dtype)}
    grads = {"loc": torch.tensor([[1e-14, 0.0], [3.0, -1.0]], dtype=dtype), "log_var": torch.zeros(2, 2, dtype=dtype)}
    context = StepContext(x=torch.zeros(2, 3, dtype=dtype), params=params, grads=grads,
                          elbo=torch.zeros(2, dtype=dtype), healthy=torch.ones(2, dtype=torch.bool), t=1,
                          noise=torch.zeros(1, 2, 2, dtype=dtype), objective=objective)
    proposal, _ = update(torch.randn(2, 4, dtype=dtype), context)
    torch.testing.assert_close(proposal["loc"][0], torch.zeros(2, dtype=dtype), rtol=0, atol=1e-12)
    sum(p.sum() for p in proposal.values()).backward()
    assert all(bool(torch.isfinite(p.grad).all()) for p in update.parameters() if p.grad is not None)


def test_a_staged_update_takes_its_first_step_from_first_and_the_rest_from_then():
    """λ_1 is the gated jump; λ_2.. are natural-gradient steps whose momentum starts at zero after the jump."""
    gen = torch.Generator().manual_seed(0)
    model = ProbabilisticPCA.random(data_dim=6, latent_dim=2, dtype=torch.float64, generator=gen)
    x = model.sample(4, generator=gen)
    torch.manual_seed(0)
    staged = IterativeInferenceOptimizer(model, latent_dim=2, hidden_size=8).double()
    assert isinstance(staged.update, StagedUpdate)
    noise = torch.randn(4, 2, 4, 2, dtype=torch.float64)
    run = staged.infer(x, num_steps=3, noise=noise, record_params=True).trajectory
    for update, start, steps in ((staged.update.first, 0, 1), (staged.update.then, 1, 2)):
        alone = IterativeInferenceOptimizer(model, latent_dim=2, update=update, network=staged.network).double()
        replay = alone.infer(x, num_steps=steps, init_params=run[start], noise=noise[start:start + steps + 1])
        torch.testing.assert_close(replay.params, run[start + steps], rtol=0, atol=0)
    with pytest.raises(ValueError, match="every stage must read the same hidden size"):
        StagedUpdate(first=staged.update.first, then=NaturalGradientUpdate(("loc",), hidden_size=4, dim=2))


def test_staged_updates_run_any_sequence_of_stages_each_starting_without_state():
    """stages=[(gated, 1), (residual, 2), (natural gradient, None)]: step t uses the stage that covers it, and a
    stage's first step gets no state (the natural-gradient stage's momentum starts at zero at its first step)."""
    from learned_inference.updates import GatedUpdate, ResidualUpdate

    heads = [GatedUpdate(("loc", "log_var"), hidden_size=4, dim=2), ResidualUpdate(("loc", "log_var"), hidden_size=4,
                                                                                   dim=2),
             NaturalGradientUpdate(("loc", "log_var"), hidden_size=4, dim=2, momentum=True)]
    staged = StagedUpdate(stages=[(heads[0], 1), (heads[1], 2), (heads[2], None)])
    assert [staged.stage_at(t) for t in range(6)] == [0, 1, 1, 2, 2, 2]
    calls = []
    for k, head in enumerate(heads):
        head.register_forward_pre_hook(lambda _m, args, kwargs=None, k=k: calls.append((k, args[2] is None)))
    model = DecoderModel(mlp_decoder(2, 6), likelihood="bernoulli", latent_dim=2)
    inference = IterativeInferenceOptimizer(model, latent_dim=2, hidden_size=4, update=staged).double()
    inference.infer(torch.bernoulli(torch.full((3, 6), 0.5, dtype=torch.float64)), num_steps=5)
    assert [k for k, _ in calls] == [0, 1, 1, 2, 2]
    assert [fresh for k, fresh in calls if k == 2] == [True, False]  # momentum carried within the stage
    with pytest.raises(ValueError, match="the last one's steps None"):
        StagedUpdate(stages=[(heads[0], 1), (heads[1], 2)])
