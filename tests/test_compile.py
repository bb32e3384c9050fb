"""``torch.compile``: a compiled update network, or a compiled training forward, trains exactly like eager."""

from __future__ import annotations

import copy

import pytest
import torch

from learned_inference import DecoderModel, IterativeInferenceOptimizer, ModelWithInference

D, X, B, T = 3, 12, 8, 3


def _pair():
    """(eager, copy) of the same model and optimizer, with a batch and noise."""
    torch.manual_seed(0)
    decoder = torch.nn.Sequential(torch.nn.Linear(D, 16), torch.nn.Tanh(), torch.nn.Linear(16, X))
    model = DecoderModel(decoder, likelihood="bernoulli", latent_dim=D)
    inference = IterativeInferenceOptimizer(model, latent_dim=D, num_steps=T, hidden_size=16)
    x = torch.bernoulli(torch.full((B, X), 0.4))
    noise = torch.randn(T + 1, 2, B, D)
    inference.infer(x, num_steps=0)
    twin = copy.deepcopy(ModelWithInference(inference))  # one deepcopy: the copy uses the copied model
    return (model, inference), (twin.model, twin.inference), x, noise


def _train_step(model, inference, x, noise):
    result = inference(x, noise=noise)
    result.loss.backward()
    grads = {f"model.{n}": p.grad for n, p in model.named_parameters()}
    grads.update({f"inference.{n}": p.grad for n, p in inference.named_parameters()})
    return result, grads


def _assert_same_training(eager, compiled, x, noise):
    expected, expected_grads = _train_step(*eager, x, noise)
    result, grads = _train_step(*compiled, x, noise)
    torch.testing.assert_close(result.elbo, expected.elbo, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result.loss, expected.loss, rtol=1e-5, atol=1e-5)
    assert sorted(grads) == sorted(expected_grads)
    for name, grad in expected_grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_compiled_update_network_trains_and_infers_like_eager():
    eager, (model, inference), x, noise = _pair()
    keys = list(inference.state_dict())
    inference.network.compile()
    assert list(inference.state_dict()) == keys  # checkpoints stay interchangeable with eager ones
    _assert_same_training(eager, (model, inference), x, noise)
    torch.testing.assert_close(
        inference.infer(x, noise=noise).elbo, eager[1].infer(x, noise=noise).elbo, rtol=1e-5, atol=1e-5
    )


@pytest.mark.slow
def test_compiled_training_forward_trains_like_eager():
    """``inference.compile()``: the per-step ELBO, λ-gradient, encodings and update, compiled in pieces."""
    eager, (model, inference), x, noise = _pair()
    inference.compile()
    _assert_same_training(eager, (model, inference), x, noise)
