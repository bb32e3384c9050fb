"""dtype agnosticism: float64 end to end, and autocast(bf16, CPU) with the λ-gradient path in float32."""

from __future__ import annotations

import torch

from learned_inference import DecoderModel, IterativeInferenceOptimizer, ModelWithInference
from tests.conftest import mlp_decoder

D, X, B, T = 3, 10, 6, 3


def _joint(dtype: torch.dtype) -> tuple[ModelWithInference, torch.Tensor]:
    model = DecoderModel(mlp_decoder(D, X, dtype=dtype), likelihood="bernoulli", latent_dim=D)
    inference = IterativeInferenceOptimizer(model, latent_dim=D, num_steps=T, hidden_size=16).to(dtype)
    x = torch.bernoulli(torch.full((B, X), 0.4, dtype=dtype))
    return ModelWithInference(inference, example_input=x), x


def _train(joint: ModelWithInference, x: torch.Tensor, *, steps: int, autocast: bool) -> list[float]:
    """Adam steps; returns the batch-mean final ELBO before each step."""
    optim = torch.optim.Adam(joint.parameters(), lr=1e-2)
    elbos = []
    for _ in range(steps):
        optim.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            result = joint(x)
        result.loss.backward()
        optim.step()
        elbos.append(result.elbo[-1].mean().item())
    return elbos


def test_float64_flows_through_every_output_and_gradient():
    joint, x = _joint(torch.float64)
    result = joint(x)
    result.loss.backward()
    tensors = [result.elbo, result.loss, result.grad_norm, *result.params.values(), result.posterior.mean]
    assert all(t.dtype == torch.float64 for t in tensors)
    for name, p in joint.named_parameters():
        assert p.grad.dtype == torch.float64 and bool(torch.isfinite(p.grad).all()), name


def test_autocast_bf16_runs_the_network_in_bf16_and_the_gradient_path_in_float32():
    joint, x = _joint(torch.float32)
    seen: dict[str, torch.dtype] = {}
    network = joint.inference.network
    network.register_forward_pre_hook(lambda _m, args: seen.__setitem__("features", args[0].dtype))
    network.register_forward_hook(lambda _m, _a, out: seen.__setitem__("hidden", out[0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = joint(x)
    assert seen == {"features": torch.float32, "hidden": torch.bfloat16}  # autocast is on, yet encodings are f32
    assert result.elbo.dtype == result.params["loc"].dtype == torch.float32
    result.loss.backward()
    for name, p in joint.named_parameters():
        assert p.grad.dtype == torch.float32 and bool(torch.isfinite(p.grad).all()), name


def test_autocast_bf16_training_improves_the_elbo_like_float32():
    gains = {}
    for autocast in (False, True):
        torch.manual_seed(0)
        joint, x = _joint(torch.float32)
        elbos = _train(joint, x, steps=30, autocast=autocast)
        gains[autocast] = sum(elbos[-5:]) / 5 - sum(elbos[:5]) / 5
    assert gains[False] > 0.5 and gains[True] > 0.5 * gains[False], gains
