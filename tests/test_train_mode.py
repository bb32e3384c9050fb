"""Models in training mode (batch norm, dropout) train jointly with inference, core and Pyro (issue 26).

What is checked: a training step runs; the running statistics after it equal those of the user's own forward on
the same batch at the final posterior (once, not once per refinement step); the steps' λ-gradient is the gradient
of the batch's total ELBO with batch statistics; eval mode is exactly an affine map per example; a frozen model
or a test-time call in training mode is a clear error that moves no statistic; dropout masks are fixed within a
run and fresh across runs.
"""

from __future__ import annotations

import copy

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, TraceMeanField_ELBO
from torch import nn

from learned_inference import DecoderModel, IterativeInferenceOptimizer
from learned_inference.engine import refine
from learned_inference.families import DiagonalGaussian
from learned_inference.integrations.pyro import (
    AutoIterativeNormal,
    IterativeTrace_ELBO,
    IterativeTraceMeanField_ELBO,
)
from learned_inference.latent_space import LatentSpace
from learned_inference.objectives import Objective
from learned_inference.train_mode import TrainModeRun

D, X, B, T = 3, 16, 6, 3


class _ConvDecoder(nn.Module):
    """z → 4×2×2 → transposed conv with BatchNorm2d and LeakyReLU → 1×4×4 logits, flattened (AntixK-style)."""

    def __init__(self) -> None:
        super().__init__()
        self.input = nn.Linear(D, 4 * 2 * 2)
        self.body = nn.Sequential(nn.ConvTranspose2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.LeakyReLU(),
                                  nn.ConvTranspose2d(4, 4, 2, stride=2), nn.BatchNorm2d(4), nn.LeakyReLU(),
                                  nn.Conv2d(4, 1, 3, padding=1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(self.input(z).view(-1, 4, 2, 2)).flatten(1)


def _decoder(kind: str) -> nn.Module:
    if kind == "batch_norm_1d":
        return nn.Sequential(nn.Linear(D, 16), nn.BatchNorm1d(16), nn.ELU(), nn.Linear(16, X)).double()
    if kind == "batch_norm_2d":
        return _ConvDecoder().double()
    return nn.Sequential(nn.Linear(D, 16), nn.Dropout(0.3), nn.ELU(), nn.Linear(16, X)).double()


def _x(seed: int = 0) -> torch.Tensor:
    return torch.bernoulli(torch.rand(B, X, generator=torch.Generator().manual_seed(seed))).double()


def _statistics(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if "running" in k or "num_batches" in k}


def _warm_up_statistics(decoder: nn.Module) -> None:
    """Moves the running statistics away from their initial values (so that a test of them can fail)."""
    with torch.no_grad():
        for _ in range(3):
            decoder(torch.randn(32, D, dtype=torch.float64))


@pytest.mark.parametrize("kind", ["batch_norm_1d", "batch_norm_2d", "dropout"])
def test_a_model_in_training_mode_trains_jointly(kind):
    decoder = _decoder(kind)
    model = DecoderModel(decoder, likelihood="bernoulli", latent_dim=D)
    inference = IterativeInferenceOptimizer(model, latent_dim=D, num_steps=T, hidden_size=8).double()
    optim = torch.optim.Adam([*model.parameters(), *inference.parameters()], lr=1e-2)
    before = copy.deepcopy(model.state_dict())
    losses = []
    for step in range(4):
        optim.zero_grad()
        result = inference(_x(step))
        result.loss.backward()
        optim.step()
        losses.append(result.loss.detach())
        assert result.healthy.all()
    assert torch.isfinite(torch.stack(losses)).all()
    assert decoder.training
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any("weight" in k for k in changed)  # the model learned
    if kind != "dropout":
        batch_norms = [m for m in decoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert all(int(m.num_batches_tracked) == 4 for m in batch_norms)  # once per training step, not per step t


@pytest.mark.parametrize("kind", ["batch_norm_1d", "batch_norm_2d"])
@pytest.mark.parametrize("analytic_kl", [True, False])
def test_running_statistics_move_as_in_the_users_own_forward(kind, analytic_kl):
    """After one training step the buffers equal those of the user's forward at z_T (the final posterior's
    samples), run once on a copy of the model taken before the step."""
    decoder = _decoder(kind)
    _warm_up_statistics(decoder)
    model = DecoderModel(decoder, likelihood="bernoulli", latent_dim=D)
    inference = IterativeInferenceOptimizer(model, latent_dim=D, num_steps=T, hidden_size=8,
                                            analytic_kl=analytic_kl).double()
    users = copy.deepcopy(model)
    x = _x()
    noise = torch.randn(T + 1, inference.num_samples, B, D, dtype=torch.float64)
    result = inference(x, noise=noise)
    result.loss.backward()
    z_final = DiagonalGaussian().sample(result.params, noise[-1])
    with torch.no_grad():
        users.log_joint(x, z_final)  # the user's own training forward on this batch
    ours, theirs = _statistics(decoder), _statistics(users.decoder)
    assert ours.keys() == theirs.keys() and ours
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-12, atol=1e-12)


def test_the_steps_ascend_the_batch_total_elbo_with_batch_statistics():
    """Under the run's context the λ-gradient (torch.func) is the autograd gradient of Σ_b L_b with batch
    statistics, coupling included: the gradient of one row moves when only another example's λ moves."""
    decoder = _decoder("batch_norm_1d")
    model = DecoderModel(decoder, likelihood="bernoulli", latent_dim=D)
    objective = Objective(model, DiagonalGaussian(), LatentSpace(D), train_mode=TrainModeRun(modules=decoder.modules()))
    x, noise = _x(), torch.randn(1, B, D, dtype=torch.float64)
    params = {"loc": torch.randn(B, D, dtype=torch.float64), "log_var": torch.zeros(B, D, dtype=torch.float64)}
    state = _statistics(decoder)
    with objective.train_mode:
        values, grads = objective.elbo_and_grad(params, x, noise)
        moved = dict(params, loc=torch.cat([params["loc"][:1], params["loc"][1:] + 1.0]))
        _, grads_moved = objective.elbo_and_grad(moved, x, noise)
    assert all(torch.equal(v, state[k]) for k, v in _statistics(decoder).items())  # nothing was updated
    reference = copy.deepcopy(model)
    leaves = {n: p.clone().requires_grad_() for n, p in params.items()}
    total = objective.__class__(reference, DiagonalGaussian(), LatentSpace(D)).elbo(leaves, x, noise)
    expected = torch.autograd.grad(total.sum(), list(leaves.values()))
    torch.testing.assert_close(values, total.detach())
    for got, want in zip(grads.values(), expected, strict=True):
        torch.testing.assert_close(got, want)
    assert not torch.allclose(grads["loc"][0], grads_moved["loc"][0])  # example 0 sees the others' λ


def test_eval_mode_batch_norm_is_the_affine_map_of_its_running_statistics():
    decoder = _decoder("batch_norm_1d")
    _warm_up_statistics(decoder)
    decoder.eval()
    norm = decoder[1]
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    shift = norm.bias - norm.running_mean * scale

    class Affine(nn.Module):
        def forward(self, h: torch.Tensor) -> torch.Tensor:
            return h * scale.detach() + shift.detach()

    folded = nn.Sequential(decoder[0], Affine(), decoder[2], decoder[3])
    noise = torch.randn(T + 1, 2, B, D, dtype=torch.float64)
    results = []
    for net in (decoder, folded):
        torch.manual_seed(0)
        inference = IterativeInferenceOptimizer(DecoderModel(net, likelihood="bernoulli", latent_dim=D), latent_dim=D,
                                                num_steps=T, hidden_size=8).double()
        results.append(inference.infer(_x(), noise=noise))
    torch.testing.assert_close(results[0].elbo, results[1].elbo, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(results[0].params["loc"], results[1].params["loc"], rtol=1e-10, atol=1e-10)


def test_a_frozen_model_or_a_test_time_call_in_training_mode_is_an_error_that_moves_nothing():
    decoder = _decoder("batch_norm_1d")
    model = DecoderModel(decoder, likelihood="bernoulli", latent_dim=D)
    inference = IterativeInferenceOptimizer(model, latent_dim=D, num_steps=T, hidden_size=8).double()
    state = _statistics(decoder)
    with pytest.raises(ValueError, match=r"model.decoder.1 \(BatchNorm1d\) is in training mode at test time.*"
                                         r"model.eval\(\)"):
        inference.infer(_x())
    model.requires_grad_(False)
    with pytest.raises(ValueError, match=r"model.decoder.1 \(BatchNorm1d\).*a frozen model.*model.eval\(\)"):
        inference(_x())
    assert all(torch.equal(v, state[k]) for k, v in _statistics(decoder).items())
    model.eval()
    inference(_x()).loss.backward()  # refining a frozen model in eval mode: fine
    assert all(torch.equal(v, state[k]) for k, v in _statistics(decoder).items())


def _stay(context, state):
    return context.params, state


def _dropout_run(objective, x, noise, *, train=False, context=True):
    params = {"loc": torch.zeros(B, D, dtype=torch.float64), "log_var": torch.zeros(B, D, dtype=torch.float64)}
    if train:
        params = {n: p.requires_grad_() for n, p in params.items()}
    run = objective.train_mode if context else None
    with run if run is not None else torch.no_grad():
        return refine(_stay, params, x, objective=objective, num_steps=T, noise=lambda t: noise, train=train).elbo


def test_dropout_masks_are_fixed_within_a_run_and_fresh_across_runs():
    decoder = _decoder("dropout")
    model = DecoderModel(decoder, likelihood="bernoulli", latent_dim=D)
    x, noise = _x(), torch.zeros(1, B, D, dtype=torch.float64)

    def objective():
        return Objective(model, DiagonalGaussian(), LatentSpace(D), train_mode=TrainModeRun(modules=decoder.modules()))

    first = _dropout_run(objective(), x, noise)
    assert torch.equal(first, first[:1].expand_as(first))  # λ does not move: every step sees the same network
    second = _dropout_run(objective(), x, noise)
    assert not torch.equal(first[0], second[0])  # a new run draws new masks
    trained = _dropout_run(objective(), x, noise, train=True)
    assert torch.equal(trained[-1], trained[0])  # L_T, which trains the model, has the steps' masks
    plain = _dropout_run(objective(), x, noise, context=False)
    assert not torch.equal(plain[0], plain[1])  # without the run's context the masks change (the test can fail)


def test_dropout_runs_leave_the_global_stream_as_one_draw_would():
    decoder = _decoder("dropout")
    model = DecoderModel(decoder, likelihood="bernoulli", latent_dim=D)
    x, noise = _x(), torch.zeros(1, B, D, dtype=torch.float64)
    torch.manual_seed(5)
    run = TrainModeRun(modules=decoder.modules())
    _dropout_run(Objective(model, DiagonalGaussian(), LatentSpace(D), train_mode=run), x, noise)
    after_run = torch.rand(3)
    torch.manual_seed(5)
    torch.randint(2**62, ())  # the run's seed: the only draw from the global stream
    torch.testing.assert_close(after_run, torch.rand(3), rtol=0, atol=0)


def test_infer_with_dropout_in_training_mode_warns_once():
    model = DecoderModel(_decoder("dropout"), likelihood="bernoulli", latent_dim=D)
    inference = IterativeInferenceOptimizer(model, latent_dim=D, num_steps=T, hidden_size=8).double()
    with pytest.warns(RuntimeWarning, match=r"model.decoder.1 \(Dropout\) is in training mode at test time"):
        inference.infer(_x())
    import warnings

    with warnings.catch_warnings():  # once per method
        warnings.simplefilter("error")
        inference.infer(_x())


# ---- Pyro ---------------------------------------------------------------------------------------------------------

class _PyroDecoder(nn.Module):
    def __init__(self, *, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 16), nn.BatchNorm1d(16), nn.Dropout(dropout), nn.ReLU(),
                                 nn.Linear(16, 5))


def _pyro_model(decoder):
    def model(x):
        pyro.module("decoder", decoder)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=decoder.net(z)).to_event(1), obs=x)
    return model


@pytest.mark.parametrize("elbo", [IterativeTrace_ELBO, IterativeTraceMeanField_ELBO, TraceMeanField_ELBO])
def test_pyro_guide_trains_a_model_with_batch_norm_in_training_mode(elbo):
    """The running statistics move once per svi.step, by the update of the ELBO's own model run (the user's
    loop), whatever the guide ran inside (set-up, observations, T refinement steps)."""
    pyro.clear_param_store()
    decoder = _PyroDecoder(dropout=0.1)
    norm = decoder.net[1]
    seen = []

    def record(module, inputs):  # batch norm calls that update the running statistics
        if module.training and module.track_running_stats:
            seen.append((inputs[0].detach().clone(), norm.running_mean.clone()))
    norm.register_forward_pre_hook(record)
    guide = AutoIterativeNormal(_pyro_model(decoder), num_steps=T, hidden_size=8)
    svi = SVI(_pyro_model(decoder), guide, pyro.optim.Adam({"lr": 1e-2}), elbo())
    x = torch.bernoulli(torch.full((8, 5), 0.5))
    for step in range(3):
        seen.clear()
        loss = svi.step(x)
        assert len(seen) == 1 and int(norm.num_batches_tracked) == step + 1
        inputs, mean_before = seen[0]
        expected = (1 - norm.momentum) * mean_before + norm.momentum * inputs.mean(0)
        torch.testing.assert_close(norm.running_mean, expected)
        assert torch.isfinite(torch.tensor(loss))


def test_pyro_guide_at_test_time_with_batch_norm_in_training_mode_is_an_error():
    pyro.clear_param_store()
    decoder = _PyroDecoder()
    guide = AutoIterativeNormal(_pyro_model(decoder), num_steps=T, hidden_size=8)
    x = torch.bernoulli(torch.full((8, 5), 0.5))
    guide(x)  # set up, in training (gradients on)
    state = _statistics(decoder)
    with pytest.raises(ValueError, match=r"the model's BatchNorm1d.*in training mode at test time.*pyro.module"):
        guide.median(x)
    assert all(torch.equal(v, state[k]) for k, v in _statistics(decoder).items())
    decoder.eval()
    assert guide.median(x)["z"].shape == (8, 2)
