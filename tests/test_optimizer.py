"""The IterativeInferenceOptimizer contract (DESIGN.md section 3)."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from learned_inference import (
    DecoderModel,
    InferenceResult,
    IterateAveraging,
    IterativeInferenceOptimizer,
    LatentSpace,
    VAEModel,
    elbo,
    elbo_and_grad,
    prior_moments,
)
from learned_inference.context import RunConstants, StepContext
from learned_inference.encodings import Data, HierarchicalErrors, LogSignGradient
from learned_inference.networks import HighwayMLP
from learned_inference.objectives import Objective
from tests.conftest import mlp_decoder

D, X, B, T = 3, 10, 6, 4


def _setup(**options):
    model = DecoderModel(mlp_decoder(D, X), likelihood="bernoulli", latent_dim=D)
    inference = IterativeInferenceOptimizer(model, latent_dim=D, num_steps=T, hidden_size=16, **options).double()
    x = torch.bernoulli(torch.full((B, X), 0.4, dtype=torch.float64))
    noise = torch.randn(T + 1, inference.num_samples, B, D, dtype=torch.float64)
    inference.infer(x, num_steps=0)  # sizes the lazy input layer
    return model, inference, x, noise


def _reference_losses(inference, x, noise):
    """Naive training losses built as one graph: (update-network loss, model loss)."""
    model, family, space = inference.model, inference.family, inference.space
    prior = prior_moments(model, space)
    params = family.initial_params(B, D, dtype=x.dtype, device=None)
    bptt = inference.backprop_through_steps
    state, update_state, phi_loss = None, None, 0.0
    for t in range(T):
        lam = params if bptt else {k: v.detach() for k, v in params.items()}
        if not bptt and update_state is not None:  # the momentum is carried as a constant, like λ
            update_state = {k: v.detach() for k, v in update_state.items()}
        with torch.no_grad():
            values, grads = elbo_and_grad(model, family, {k: v.detach() for k, v in lam.items()}, x, noise[t],
                                          space=space, prior=prior)
        context = StepContext(x=x, params=lam, grads=grads, elbo=values, healthy=torch.isfinite(values), t=t,
                              noise=noise[t], objective=Objective(model, family, space, prior))
        features = inference.encoding(context)
        hidden, state = inference.network(features, state)
        proposal, update_state = inference.update(hidden, context, update_state)
        params = family.constrain(proposal)
        model.requires_grad_(False)
        phi_loss = phi_loss - elbo(model, family, params, x, noise[t + 1], space=space, prior=prior).mean() / T
        model.requires_grad_(True)
    final = {k: v.detach() for k, v in params.items()}
    model_loss = -elbo(model, family, final, x, noise[T], space=space, prior=prior).mean()
    return phi_loss, model_loss


@pytest.mark.parametrize(("network", "update"), [("highway", "gated"), ("gru", "gated"), ("lstm", "gated"),
                                                 ("highway", "natural_gradient"), ("gru", "natural_gradient")])
def test_loss_backward_gives_the_paper_training_gradients(network, update):
    model, inference, x, noise = _setup(network=network, update=update)
    result = inference(x, noise=noise)
    result.loss.backward()
    ours = {n: p.grad.clone() for n, p in [*inference.named_parameters(), *model.named_parameters()]}
    inference.zero_grad()
    model.zero_grad()
    phi_loss, model_loss = _reference_losses(inference, x, noise)
    (phi_loss + model_loss).backward()
    for name, p in [*inference.named_parameters(), *model.named_parameters()]:
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-7, atol=1e-10, msg=name)
    torch.testing.assert_close(result.loss, phi_loss.detach(), rtol=1e-9, atol=1e-9)


class _CountingData(Data):
    """The data encoding, recording the step at which it is computed."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[int] = []

    def __call__(self, context):
        self.steps.append(context.t)
        return super().__call__(context)


class _WholeInputHighway(HighwayMLP):
    """A highway network that overrides forward, so it sees every feature at every step (nothing hoisted)."""

    def forward(self, features, state=None):
        return self.after_input(self.input(features), state)


@pytest.mark.parametrize("network", ["highway", "gru"])
def test_the_data_share_of_the_input_layer_is_computed_once_per_run(network):
    data = _CountingData()
    _, inference, x, noise = _setup(network=network, encoding=("gradient", data, "params"))
    data.steps.clear()
    inference(x, noise=noise).loss.backward()
    inference.infer(x, num_steps=T, noise=noise)
    assert data.steps == [0, 0]


def test_hoisting_the_data_share_changes_no_number():
    """λ, the loss and every gradient are those of the network applied to all features at every step."""
    results = []
    for network_type in (HighwayMLP, _WholeInputHighway):
        torch.manual_seed(0)
        model = DecoderModel(mlp_decoder(D, X), likelihood="bernoulli", latent_dim=D).double()
        inference = IterativeInferenceOptimizer(model, latent_dim=D, num_steps=T, data_shape=(X,),
                                                network=network_type(hidden_size=16)).double()
        x = torch.bernoulli(torch.full((B, X), 0.4, dtype=torch.float64))
        noise = torch.randn(T + 1, inference.num_samples, B, D, dtype=torch.float64)
        result = inference(x, noise=noise)
        result.loss.backward()
        grads = {n: p.grad for n, p in [*inference.named_parameters(), *model.named_parameters()]}
        results.append((result.params, result.loss.detach(), grads, inference.infer(x, noise=noise).params))
    (params, loss, grads, tested), (params_ref, loss_ref, grads_ref, tested_ref) = results
    torch.testing.assert_close(params, params_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tested, tested_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads, grads_ref, rtol=1e-10, atol=1e-12)


def test_run_constants_gate_captures_gradients_only_while_capturing():
    weight = torch.randn(3, 2, requires_grad=True)
    constants = RunConstants(capture=True)
    shared = constants.get("p", lambda: torch.ones(4, 2) @ weight.t())
    assert constants.get("p", lambda: pytest.fail("computed twice")) is shared
    with constants.capturing_gradients():
        (grad,) = torch.autograd.grad((2 * shared).sum(), weight, allow_unused=True, retain_graph=True)
    assert grad is None and torch.equal(constants.captured[0], torch.full((4, 3), 2.0))
    (shared.sum() + (constants.captured[0] * constants.gated[0]).sum()).backward()  # passes through, then the sum
    torch.testing.assert_close(weight.grad, torch.full((3, 2), 3.0 * 4))


def test_result_shapes_and_types():
    _, inference, x, noise = _setup()
    result = inference(x, noise=noise)
    assert isinstance(result, InferenceResult)
    assert result.elbo.shape == (T + 1, B) and result.grad_norm.shape == (T + 1, B)
    assert set(result.params) == {"loc", "log_var"} and result.params["loc"].shape == (B, D)
    assert result.posterior.batch_shape == (B,) and result.posterior.event_shape == (D,)
    assert result.loss.shape == () and result.loss.requires_grad
    assert not result.params["loc"].requires_grad


@pytest.mark.parametrize("steps", [0, 1, 7, 30])
def test_infer_runs_any_number_of_steps_without_a_graph(steps):
    _, inference, x, _ = _setup()
    result = inference.infer(x, num_steps=steps)
    assert result.elbo.shape == (steps + 1, B)
    assert not result.loss.requires_grad and not result.elbo.requires_grad
    assert torch.isfinite(result.elbo).all()


def test_frozen_pretrained_model_only_refines():
    model, inference, x, _ = _setup()
    model.requires_grad_(False)
    inference(x).loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in inference.parameters())


def test_design_contract_snippet_trains():
    model = DecoderModel(nn.Sequential(nn.Linear(2, 32), nn.ELU(), nn.Linear(32, X)), likelihood="bernoulli",
                         latent_dim=2)
    inference = IterativeInferenceOptimizer(model, latent_dim=2, num_steps=3, hidden_size=32)
    optim = torch.optim.Adam([*model.parameters(), *inference.parameters()], lr=1e-2)
    data = torch.bernoulli(torch.rand(1, X).expand(256, X))
    first = None
    for _ in range(60):
        optim.zero_grad()
        result = inference(data[torch.randint(0, 256, (32,))])
        result.loss.backward()
        optim.step()
        first = result.loss.item() if first is None else first
    assert result.loss.item() < first - 1.0
    posterior = inference.infer(data[:8], num_steps=20).posterior
    assert posterior.batch_shape == (8,)


class _TinyVAE(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(X, 2 * D)
        self.dec = mlp_decoder(D, X, dtype=torch.float32)

    def encode(self, x):
        return list(self.enc(x).chunk(2, dim=-1))

    def decode(self, z):
        return self.dec(z)


def test_encoder_initialisation_starts_at_encode_and_trains_the_encoder():
    vae = _TinyVAE().double()
    model = VAEModel(vae, likelihood="bernoulli", latent_dim=D)
    inference = IterativeInferenceOptimizer(model, latent_dim=D, num_steps=2, hidden_size=16, init="encoder").double()
    x = torch.bernoulli(torch.full((B, X), 0.4, dtype=torch.float64))
    noise = torch.randn(3, inference.num_samples, B, D, dtype=torch.float64)
    result = inference(x, noise=noise)
    loc, log_var = vae.encode(x)
    expected = elbo(model, inference.family, {"loc": loc, "log_var": log_var}, x, noise[0], space=LatentSpace(D),
                    prior=prior_moments(model, LatentSpace(D)))
    torch.testing.assert_close(result.elbo[0], expected.detach())
    result.loss.backward()
    assert vae.enc.weight.grad is not None and vae.enc.weight.grad.abs().sum() > 0


class _TwoLatentModel(nn.Module):
    """log p(x, z1, z2) with z2 -> z1 -> x; z is a dict."""

    def __init__(self):
        super().__init__()
        self.top = nn.Linear(1, 2)
        self.dec = nn.Linear(2, X)

    def log_joint(self, x, z):
        z1, z2 = z["z1"], z["z2"]
        log_p2 = torch.distributions.Normal(0.0, 1.0).log_prob(z2).sum(-1)
        log_p1 = torch.distributions.Normal(self.top(z2), 1.0).log_prob(z1).sum(-1)
        logits = self.dec(z1)
        log_px = -nn.functional.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none")
        return log_px.sum(-1) + log_p1 + log_p2


def test_dict_latents_flow_through_inference():
    model = _TwoLatentModel()
    inference = IterativeInferenceOptimizer(model, latent_dim={"z1": 2, "z2": 1}, num_steps=2, hidden_size=16,
                                            num_samples=3)
    x = torch.bernoulli(torch.full((B, X), 0.5))
    result = inference(x)
    result.loss.backward()
    assert set(result.params) == {"z1", "z2"}
    assert result.params["z1"]["loc"].shape == (B, 2) and result.params["z2"]["log_var"].shape == (B, 1)
    assert result.posterior["z2"].batch_shape == (B,) and result.posterior["z2"].event_shape == (1,)
    again = inference.infer(x, num_steps=1, init_params=result.params)
    assert again.elbo.shape == (2, B)


def test_second_order_differentiates_through_the_gradient_input():
    model, first, x, noise = _setup(network="gru")
    second = IterativeInferenceOptimizer(model, latent_dim=D, num_steps=T, hidden_size=16, network="gru",
                                         second_order=True).double()
    second.infer(x, num_steps=0)
    second.load_state_dict(first.state_dict())
    first(x, noise=noise).loss.backward()
    second(x, noise=noise).loss.backward()
    difference = sum((a.grad - b.grad).abs().sum() for a, b in zip(first.parameters(), second.parameters(),
                                                                   strict=True))
    assert torch.isfinite(difference) and difference > 1e-8


def _graph_size(loss):
    """Number of autograd nodes reachable from ``loss``."""
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return len(seen)


@pytest.mark.parametrize("network", ["highway", "gru"])
def test_training_graph_left_after_forward_is_constant_in_num_steps(network):
    """The update network's step gradients are taken inside forward() (per step when feed-forward, once at the end
    when backpropagating through the steps), so the graph ``loss`` keeps is the model's final-step term only;
    peak memory during forward() is measured by ``benchmarks/memory.py``."""
    sizes = []
    for steps in (2, 16):
        _, inference, x, _ = _setup(network=network)
        inference.num_steps = steps
        sizes.append(_graph_size(inference(x).loss))
    assert sizes[1] == sizes[0]


def test_state_dict_and_pickle_round_trip():
    _, inference, x, noise = _setup()
    restored = IterativeInferenceOptimizer(inference.model, latent_dim=D, num_steps=T, hidden_size=16).double()
    restored.load_state_dict(inference.state_dict())
    torch.testing.assert_close(restored.infer(x, noise=noise).elbo, inference.infer(x, noise=noise).elbo)
    clone = pickle.loads(pickle.dumps(inference))
    torch.testing.assert_close(clone.infer(x, noise=noise).elbo, inference.infer(x, noise=noise).elbo)


def test_model_is_not_a_submodule():
    model, inference, _, _ = _setup()
    model_ids = {id(p) for p in model.parameters()}
    assert not model_ids & {id(p) for p in inference.parameters()}
    assert not any(k.startswith("model") or k.startswith("_model") for k in inference.state_dict())


class _NoLogJoint(nn.Module):
    pass


class _Unsummed(nn.Module):
    def log_joint(self, x, z):
        return -(x - z.sum(-1, keepdim=True)).square()


class _BatchMean(nn.Module):
    def log_joint(self, x, z):
        return -(x.sum(-1) - z.sum(-1)).square().mean(-1)


def test_model_without_log_joint_is_rejected_at_construction():
    with pytest.raises(TypeError, match="log_joint"):
        IterativeInferenceOptimizer(_NoLogJoint(), latent_dim=2)


@pytest.mark.parametrize(("model", "hint"), [(_Unsummed(), "unreduced"), (_BatchMean(), "reduced over the batch")])
def test_wrong_log_joint_shape_names_the_expected_shape(model, hint):
    inference = IterativeInferenceOptimizer(model, latent_dim=2, hidden_size=8)
    with pytest.raises(ValueError, match=r"must return shape \[2, 4\]") as info:  # S = 2 samples by default
        inference.infer(torch.zeros(4, 5))
    assert hint in str(info.value)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"latent_dim": 0}, "latent_dim"),
        ({"latent_dim": 2, "num_steps": -1}, "num_steps"),
        ({"latent_dim": 2, "update": "adam"}, "update"),
        ({"latent_dim": 2, "encoding": "gradients"}, "encoding"),
        ({"latent_dim": 2, "network": "transformer"}, "network"),
        ({"latent_dim": 2, "family": "mixture"}, "family"),
        ({"latent_dim": 2, "second_order": True}, "backprop_through_steps"),
    ],
)
def test_bad_options_get_clear_errors(options, match):
    model = DecoderModel(nn.Linear(2, 5), likelihood="bernoulli", latent_dim=2)
    with pytest.raises(ValueError, match=match):
        IterativeInferenceOptimizer(model, **options)


@pytest.mark.parametrize("encoding", [LogSignGradient, HierarchicalErrors])
@pytest.mark.parametrize("eps", [0.0, -1e-8, float("nan")])
def test_a_non_positive_eps_is_named_with_its_cause_and_fix(encoding, eps):
    with pytest.raises(ValueError, match=rf"{encoding.__name__}\(eps={eps!r}\): eps must be > 0\. .*log\(\|g\| \+ ε\)"
                                         r".*exactly 0.*eps=1e-8"):
        encoding(eps=eps)


def test_encoder_init_needs_an_encoder():
    with pytest.raises(ValueError, match=r"model.encode"):
        IterativeInferenceOptimizer(_Unsummed(), latent_dim=2, init="encoder")
    model = DecoderModel(nn.Linear(2, 5), likelihood="bernoulli", latent_dim=2)
    inference = IterativeInferenceOptimizer(model, latent_dim=2, hidden_size=8, init="encoder")
    with pytest.raises(AttributeError, match="pass encoder="):
        inference.infer(torch.ones(3, 5))


def test_lazy_layer_is_sized_on_the_first_call_even_without_steps():
    model = DecoderModel(nn.Linear(2, 5), likelihood="bernoulli", latent_dim=2)
    inference = IterativeInferenceOptimizer(model, latent_dim=2, hidden_size=8)
    inference.infer(torch.ones(3, 5), num_steps=0)
    assert inference.network.input.weight.shape == (8, 2 * 2 * 2 + 5 + 2 * 2)


def test_integer_data_is_rejected_with_a_hint():
    model = DecoderModel(nn.Linear(2, 5), likelihood="bernoulli", latent_dim=2)
    inference = IterativeInferenceOptimizer(model, latent_dim=2, hidden_size=8)
    with pytest.raises(TypeError, match="floating-point"):
        inference.infer(torch.ones(3, 5, dtype=torch.long))


def test_default_averaging_starts_after_the_trained_steps():
    """By default a run longer than ``num_steps`` returns the polynomial-decay average of the iterates from step
    ``num_steps`` on; up to ``num_steps`` (and in training) nothing changes; ``averaging=None`` gives the last."""
    torch.manual_seed(0)
    _, inference, x, _ = _setup()
    assert inference.averaging == IterateAveraging() and "averaging=IterateAveraging(start=None" in repr(inference)
    noise = torch.randn(4 * T + 1, inference.num_samples, B, D, dtype=torch.float64)
    long = inference.infer(x, num_steps=4 * T, noise=noise, record_params=True)
    expected = IterateAveraging(start=T).running(long.trajectory)[-1]
    torch.testing.assert_close(long.params, expected, rtol=0, atol=0)
    torch.testing.assert_close(inference.estimates(long.trajectory)[-1], expected, rtol=0, atol=0)
    assert not torch.equal(long.params["loc"], long.trajectory[-1]["loc"])
    short = inference.infer(x, num_steps=T, noise=noise[: T + 1])
    torch.testing.assert_close(short.params, long.trajectory[T], rtol=0, atol=0)
    inference.averaging = None
    last = inference.infer(x, num_steps=4 * T, noise=noise)
    torch.testing.assert_close(last.params, long.trajectory[-1], rtol=0, atol=0)
    assert inference.estimates(long.trajectory)[-1] is long.trajectory[-1]
    with pytest.raises(TypeError, match="averaging must be an IterateAveraging or None"):
        IterativeInferenceOptimizer(inference.model, latent_dim=D, averaging="polyak")  # type: ignore[arg-type]


def test_the_learned_optimizer_takes_every_initial_estimate():
    """λ₀ is one strategy for every method (learned_inference.initial): the optimizer starts from a built highway
    encoder (which then trains with it) or a callable, as the baselines do."""
    model = DecoderModel(torch.nn.Linear(3, 8), likelihood="bernoulli", latent_dim=3)
    x = torch.bernoulli(torch.full((5, 8), 0.5))
    built = IterativeInferenceOptimizer(model, latent_dim=3, hidden_size=8, init="highway")
    built(x).loss.backward()
    assert built.encoder is not None and any(p.grad is not None for p in built.encoder.parameters())
    assert any(name.startswith("encoder.") for name in built.state_dict())
    fixed = IterativeInferenceOptimizer(model, latent_dim=3, hidden_size=8,
                                        init=lambda x: (torch.ones(len(x), 3), torch.zeros(len(x), 3)))
    assert torch.equal(fixed.init(x)["loc"], torch.ones(5, 3))
    with pytest.raises(ValueError, match="init must be 'prior', 'encoder', 'highway', or a callable"):
        IterativeInferenceOptimizer(model, latent_dim=3, init="zeros")
