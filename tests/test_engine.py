"""The refinement engine: one loop for every method, the trajectory, sizing and state dicts, one latent layout."""

from __future__ import annotations

import ast
import io
from pathlib import Path

import pytest
import torch

from learned_inference import (
    BlockFamily,
    DecoderModel,
    GradientEStep,
    IterativeInferenceOptimizer,
    SemiAmortized,
    StandardEncoder,
)
from learned_inference.engine import IterateAveraging, RecordIterates, Training, TrainingLoss, refine
from learned_inference.families import DiagonalGaussian
from learned_inference.latent_space import LatentSpace
from learned_inference.objectives import Objective
from learned_inference.zoo import LinearGaussianHierarchy, ProbabilisticPCA
from tests.conftest import mlp_decoder

ROOT = Path(__file__).resolve().parents[1]
D, X, B = 3, 10, 5


def _model() -> DecoderModel:
    return DecoderModel(mlp_decoder(D, X), likelihood="bernoulli", latent_dim=D)


def _data() -> torch.Tensor:
    return torch.bernoulli(torch.full((B, X), 0.4, dtype=torch.float64))


def _calls(path: Path, name: str) -> int:
    tree = ast.parse(path.read_text())
    return sum(isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == name
               for node in ast.walk(tree))


def test_only_the_engine_loops_over_refinement_steps():
    """Every λ-gradient evaluation of a refinement run happens in engine.py (objectives.py defines it; the Pyro
    integration's Objective subclass overrides it to record one evaluation as a single JIT-traceable operation)."""
    callers = {
        path.relative_to(ROOT).as_posix()
        for folder in ("learned_inference", "integrations")
        for path in (ROOT / folder).rglob("*.py")
        if _calls(path, "elbo_and_grad")
    }
    assert callers == {"learned_inference/engine.py", "learned_inference/objectives.py",
                       "integrations/pyro/log_joint.py"}


def _saved(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer)  # torch.load's defaults (weights_only=True)


def test_state_dict_loads_with_torch_load_defaults_before_and_after_the_first_call():
    x = _data()
    fresh = IterativeInferenceOptimizer(_model(), latent_dim=D, hidden_size=8).double()
    unsized = _saved(fresh.state_dict())
    assert not any(key.startswith("network.input") for key in unsized)
    other = IterativeInferenceOptimizer(_model(), latent_dim=D, hidden_size=8).double()
    other.load_state_dict(unsized)  # an unsized state dict loads into an unsized optimizer, which stays lazy
    assert not other.network.is_sized

    fresh.infer(x, num_steps=0)
    sized = _saved(fresh.state_dict())
    assert sized["network.input.weight"].shape == (8, 2 * 2 * D + X + 2 * D)
    other.load_state_dict(sized)  # a sized one sizes the optimizer it is loaded into
    noise = torch.randn(4, 2, B, D, dtype=torch.float64)
    torch.testing.assert_close(other.infer(x, num_steps=3, noise=noise).elbo,
                               fresh.infer(x, num_steps=3, noise=noise).elbo)
    with pytest.raises(RuntimeError, match="Missing key"):
        other.load_state_dict(unsized)  # a sized optimizer does not accept a state dict without its weights


def test_data_shape_sizes_the_network_at_construction_and_other_data_is_refused():
    inference = IterativeInferenceOptimizer(_model(), latent_dim=D, hidden_size=8, data_shape=(X,)).double()
    assert inference.network.is_sized and "network.input.weight" in _saved(inference.state_dict())
    with pytest.raises(ValueError, match=f"takes {4 * D + X + 2 * D} features, but the encoding gives"):
        inference.materialize((X + 1,))  # e.g. a state dict trained for other data


def test_the_trajectory_records_every_step():
    model, x = _model(), _data()
    inference = IterativeInferenceOptimizer(model, latent_dim=D, hidden_size=8).double()
    noise = torch.randn(5, 2, B, D, dtype=torch.float64)
    result = inference.infer(x, num_steps=4, noise=noise, record_params=True)
    assert result.trajectory is not None and len(result.trajectory) == 5
    assert torch.equal(result.trajectory[0]["loc"], torch.zeros(B, D, dtype=torch.float64))
    torch.testing.assert_close(result.trajectory[-1]["loc"], result.params["loc"], rtol=0, atol=0)
    for t in (1, 3):  # λ_t of the recorded run is the result of a t-step run on the same noise
        shorter = inference.infer(x, num_steps=t, noise=noise[: t + 1])
        torch.testing.assert_close(result.trajectory[t]["loc"], shorter.params["loc"], rtol=0, atol=0)
    assert result.healthy.shape == (5, B) and bool(result.healthy.all())
    assert inference.infer(x, num_steps=2).trajectory is None


@pytest.mark.parametrize("method", ["e-step", "semi-amortized", "standard"])
def test_every_method_warns_about_and_masks_non_finite_examples(method):
    """The non-finite policy lives in the engine: the baselines get it as the learned optimizer does."""
    torch.manual_seed(0)
    model = _model()
    x = _data()
    build = {
        "e-step": lambda: GradientEStep(model, latent_dim=D, num_steps=3),
        "semi-amortized": lambda: SemiAmortized(model, latent_dim=D, num_steps=3, init="highway", hidden_size=8),
        "standard": lambda: StandardEncoder(model, latent_dim=D, init="highway", hidden_size=8),
    }[method]().double()
    noise = torch.randn(4, 1, B, D, dtype=torch.float64)
    clean = build.infer(x, num_steps=3, noise=noise)
    bad = noise.clone()
    bad[:, :, 2] = float("inf")  # example 2's samples overflow
    with pytest.warns(RuntimeWarning, match=r"1 of 5 examples .* \(examples 2\)"):
        masked = build.infer(x, num_steps=3, noise=bad)
    keep = torch.arange(B) != 2
    torch.testing.assert_close(masked.elbo[:, keep], clean.elbo[:, keep])
    assert not bool(masked.healthy[:, 2].any()) and torch.isfinite(masked.params["loc"]).all()
    with pytest.warns(RuntimeWarning):
        loss = build(x, noise=bad[: build.num_steps + 1]).loss
    assert torch.isfinite(loss)


def test_dict_latents_use_one_block_family_for_every_method():
    gen = torch.Generator().manual_seed(0)
    model = LinearGaussianHierarchy.random(data_dim=X, latent_dims=(3, 2), dtype=torch.float64, generator=gen)
    x = model.sample(B)
    families = {"z1": "diagonal_gaussian", "z2": DiagonalGaussian(log_var_bounds=(-2.0, 1.0))}
    for method in (GradientEStep(model, latent_dim=model.latent_dim, family=families, num_steps=20, lr=0.05),
                   IterativeInferenceOptimizer(model, latent_dim=model.latent_dim, hidden_size=8).double()):
        assert isinstance(method.family, BlockFamily)
        result = method.infer(x)
        assert set(result.posterior) == {"z1", "z2"} and result.params["z2"]["loc"].shape == (B, 2)
    # The joint posterior over the concatenated z is the product of the per-variable ones.
    flat = {p: torch.cat([result.params[v][p] for v in ("z1", "z2")], -1) for p in ("loc", "log_var")}
    joint = method.family.distribution(flat)
    z = joint.rsample((7,))
    assert z.shape == (7, B, 5)
    expected = result.posterior["z1"].log_prob(z[..., :3]) + result.posterior["z2"].log_prob(z[..., 3:])
    torch.testing.assert_close(joint.log_prob(z), expected)
    torch.testing.assert_close(joint.entropy(), result.posterior["z1"].entropy() + result.posterior["z2"].entropy())


def test_training_options_are_checked():
    with pytest.raises(ValueError, match="second_order=True needs backprop_through_steps=True"):
        Training(second_order=True)
    with pytest.raises(ValueError, match="step_weights must give num_steps \\+ 1 = 3 weights, got 2"):
        TrainingLoss(Training(step_weights=lambda steps, batch: [1.0, 1.0]), batch=2, num_steps=2, initial={},
                     start={})
    objective = Objective(_model(), DiagonalGaussian(), LatentSpace(D))
    with pytest.raises(ValueError, match="on_nonfinite must be one of"):
        refine(lambda c, s: (c.params, s), {}, _data(), objective=objective, num_steps=1, noise=lambda t: t,
               on_nonfinite="ignore")


def test_custom_step_weights_change_only_what_the_update_network_learns():
    """Weights w_t enter φ's gradient as w_t · VJP_t: doubling every weight doubles φ's gradient, not θ's."""
    model, x = _model(), _data()
    inference = IterativeInferenceOptimizer(model, latent_dim=D, num_steps=3, hidden_size=8).double()
    noise = torch.randn(4, 2, B, D, dtype=torch.float64)
    inference.infer(x, num_steps=0)

    def grads(scale: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        model.zero_grad()
        inference.zero_grad()
        rule = inference.training_rule()
        doubled = Training(step_parameters=rule.step_parameters,
                           step_weights=lambda steps, batch: [scale * w for w in rule.step_weights(steps, batch)])
        run = refine(inference.step, inference.init(x), x, objective=Objective(model, inference.family,
                                                                              inference.space),
                     num_steps=3, noise=lambda t: noise[t], training=doubled, train=True)
        run.loss.backward()
        return [p.grad.clone() for p in inference.parameters()], [p.grad.clone() for p in model.parameters()]

    (phi_1, theta_1), (phi_2, theta_2) = grads(1.0), grads(2.0)
    for a, b in zip(phi_1, phi_2, strict=True):
        torch.testing.assert_close(b, 2 * a)
    for a, b in zip(theta_1, theta_2, strict=True):
        torch.testing.assert_close(b, a)


def test_stopping_rule_and_keep_best_per_example():
    """tol stops examples whose ELBO stalls (on common noise) and says how many steps each used; keep-best returns
    every example's best λ, so the final ELBO is never below the start's."""
    torch.manual_seed(0)
    model, x = _model(), _data()
    e_step = GradientEStep(model, latent_dim=D, lr=0.05, num_steps=200).double()
    full = e_step.infer(x)
    assert bool((full.steps == 200).all()) and full.elbo.shape == (201, B)
    stopped = e_step.infer(x, tol=1e-3, patience=2)
    assert stopped.steps.shape == (B,) and bool((stopped.steps < 200).all()) and bool((stopped.steps > 0).all())
    assert stopped.elbo.shape[0] == int(stopped.steps.max()) + 1  # rows until the last example stopped
    # A diverging step size: without keep-best the last λ is far worse than the first; with it, never worse.
    wild = GradientEStep(model, latent_dim=D, optimizer=torch.optim.SGD, lr=50.0, num_steps=10).double()
    noise = torch.zeros(11, 1, B, D, dtype=torch.float64)
    last = wild.infer(x, noise=noise)
    best = wild.infer(x, noise=noise, keep_best=True)
    start_elbo = last.elbo[0]
    assert bool((last.elbo[-1] < start_elbo).any())
    rescored = wild.infer(x, num_steps=0, init_params=best.params, noise=noise[:1]).elbo[0]
    assert bool((rescored >= start_elbo - 1e-9).all())
    with pytest.raises(ValueError, match="tol must be a float >= 0"):
        e_step.infer(x, tol=-1.0)


def test_iterate_averaging_weights_are_polynomial_in_the_step():
    """λ̄_T = Σ_s w_s λ_s over s = start..T with w_s ∝ (s − start + 1)^η for η ∈ {0, 1} (the plain and the linearly
    weighted mean); steps before ``start`` do not count."""
    values = torch.randn(9, 2, 3, dtype=torch.float64)
    iterates = [{"loc": v} for v in values]
    for eta, weights in ((0.0, torch.ones(6)), (1.0, torch.arange(1.0, 7.0))):
        running = IterateAveraging(start=3, eta=eta).running(iterates)
        expected = (weights.double()[:, None, None] * values[3:]).sum(0) / weights.sum()
        torch.testing.assert_close(running[-1]["loc"], expected)
        assert all(running[t] is iterates[t] for t in range(3))
    for bad, match in (({"start": -1}, "start must be an int"), ({"eta": -0.5}, "eta must be a number >= 0")):
        with pytest.raises(ValueError, match=match):
            IterateAveraging(**bad)
    with pytest.raises(ValueError, match="no start step"):
        IterateAveraging().running(iterates)


def _noisy_ascent(context, state):
    """Constant-step gradient ascent on one-sample gradients: it stops improving and scatters around the optimum."""
    return {n: p + 0.05 * context.grads[n] for n, p in context.params.items()}, state


def test_averaging_returns_the_running_average_and_scores_it_last():
    """An IterateAveraging observer makes refine return the running average of the iterates, its last ELBO row is
    that average's ELBO on the last step's noise, and on a model with a known posterior the average is much closer
    to it than the last iterate of a constant-step noisy ascent; runs of at most ``start`` steps are unchanged."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = ProbabilisticPCA.random(data_dim=8, latent_dim=3, generator=gen).requires_grad_(False).double()
    x = model.sample(64, generator=gen)
    objective = Objective(model, DiagonalGaussian(), LatentSpace(3))
    start = objective.family.initial_params(64, 3, dtype=x.dtype, device=None)
    noise = torch.randn(301, 1, 64, 3, generator=gen, dtype=torch.float64)
    averaging = IterateAveraging(start=100)
    plain_iterates, averaged_iterates = RecordIterates(), RecordIterates()
    plain = refine(_noisy_ascent, start, x, objective=objective, num_steps=300, noise=lambda t: noise[t],
                   observers=[plain_iterates])
    averaged = refine(_noisy_ascent, start, x, objective=objective, num_steps=300, noise=lambda t: noise[t],
                      observers=[averaging.watch(), averaged_iterates])
    for a, b in zip(plain_iterates.iterates, averaged_iterates.iterates, strict=True):  # the steps see the iterates
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    expected = averaging.running(averaged_iterates.iterates)[-1]
    torch.testing.assert_close(averaged.params, expected, rtol=0, atol=0)
    torch.testing.assert_close(averaged.elbo[-1], objective.elbo(expected, x, noise[300]))
    log_px = model.log_marginal(x)
    gap_last = (log_px - model.exact_elbo(x, plain.params["loc"], plain.params["log_var"])).mean().item()
    gap_average = (log_px - model.exact_elbo(x, averaged.params["loc"], averaged.params["log_var"])).mean().item()
    assert gap_average < 0.5 * gap_last, (gap_average, gap_last)
    short = refine(_noisy_ascent, start, x, objective=objective, num_steps=100, noise=lambda t: noise[t],
                   observers=[averaging.watch()])
    torch.testing.assert_close(short.params, plain_iterates.iterates[100], rtol=0, atol=0)
    with pytest.raises(ValueError, match="test-time observers"):
        refine(_noisy_ascent, start, x, objective=objective, num_steps=3, noise=lambda t: noise[t], train=True,
               observers=[averaging.watch()])
    with pytest.raises(ValueError, match="test-time estimate with a start step"):
        IterateAveraging().watch()
