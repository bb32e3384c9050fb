"""A numerical fingerprint of every inference method (float64, fixed weights and noise).

Recorded once before the refinement loop was rewritten as one engine (``tests/data/engine_fingerprint.json``);
``tests/test_engine_fingerprint.py`` asserts that every method still gives the same test-time ELBOs and
parameters and the same training gradients (rtol 1e-10). Weights are set by parameter name (a generator
seeded with the name's CRC32), so the fingerprint does not depend on the order in which modules draw
their initial weights. Regenerate only on purpose: ``python -m tests.fingerprint``.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from learned_inference import (
    DecoderModel,
    GradientEStep,
    IterativeInferenceOptimizer,
    SemiAmortized,
    StandardEncoder,
    VAEModel,
)
from learned_inference.networks import HighwayMLP, PerVariableNetwork
from learned_inference.zoo import LinearGaussianHierarchy

PATH = Path(__file__).parent / "data" / "engine_fingerprint.json"
DTYPE = torch.float64
B, X, D, T = 4, 10, 3, 3
#: the learned optimizer's options at the time of the recording (the paper's gated update, one sample, the last
#: iterate returned)
PAPER = {"update": "gated", "num_samples": 1, "antithetic": False, "averaging": None}


def _set_weights(named: list[tuple[str, nn.Parameter]]) -> None:
    with torch.no_grad():
        for name, p in named:
            gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _tolist(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().tolist()
    if isinstance(value, dict):
        return {k: _tolist(v) for k, v in sorted(value.items())}
    return value


class _TinyVAE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(X, 2 * D)
        self.dec = nn.Sequential(nn.Linear(D, 12), nn.Tanh(), nn.Linear(12, X))

    def encode(self, x: Tensor) -> list[Tensor]:
        return list(self.enc(x).chunk(2, dim=-1))

    def decode(self, z: Tensor) -> Tensor:
        return self.dec(z)


def _data(seed: int, size: int = X) -> Tensor:
    return torch.bernoulli(torch.full((B, size), 0.4, dtype=DTYPE), generator=torch.Generator().manual_seed(seed))


def _noise(seed: int, steps: int, dim: int = D, samples: int = 1) -> Tensor:
    return torch.randn(steps + 1, samples, B, dim, dtype=DTYPE, generator=torch.Generator().manual_seed(seed))


def _record(method: nn.Module, model: nn.Module, x: Tensor, *, dim: int = D, samples: int = 1) -> dict[str, Any]:
    method.infer(x, num_steps=0, noise=_noise(9, 0, dim, samples))  # sizes lazy layers
    _set_weights([("model." + n, p) for n, p in model.named_parameters()]
                 + [("method." + n, p) for n, p in method.named_parameters() if not n.startswith("_model")])
    result = method.infer(x, num_steps=T + 2, noise=_noise(1, T + 2, dim, samples))
    trained = method(x, noise=_noise(2, method.num_steps, dim, samples))
    trained.loss.backward()
    params = {**{"model." + n: p for n, p in model.named_parameters()},
              **{"method." + n: p for n, p in method.named_parameters()}}
    grads = {n: p.grad for n, p in params.items() if p.grad is not None}
    return {"infer_elbo": _tolist(result.elbo), "infer_params": _tolist(result.params),
            "train_elbo": _tolist(trained.elbo), "loss": trained.loss.item(), "grads": _tolist(grads)}


def _decoder_model() -> DecoderModel:
    decoder = nn.Sequential(nn.Linear(D, 12), nn.Tanh(), nn.Linear(12, X)).to(DTYPE)
    return DecoderModel(decoder, likelihood="bernoulli", latent_dim=D)


def _optimizer_default() -> dict[str, Any]:
    model = _decoder_model()
    method = IterativeInferenceOptimizer(model, latent_dim=D, num_steps=T, hidden_size=8, **PAPER).to(DTYPE)
    return _record(method, model, _data(0))


def _optimizer_encoder_errors() -> dict[str, Any]:
    model = VAEModel(_TinyVAE().to(DTYPE), likelihood="bernoulli", latent_dim=D)
    method = IterativeInferenceOptimizer(model, latent_dim=D, num_steps=T, hidden_size=8, init="encoder",
                                         encoding=("gradient", "errors", "params"), num_samples=2,
                                         update="gated", antithetic=False, averaging=None).to(DTYPE)
    return _record(method, model, _data(3), samples=2)


def _optimizer_gru() -> dict[str, Any]:
    model = _decoder_model()
    method = IterativeInferenceOptimizer(model, latent_dim=D, num_steps=T, hidden_size=8, network="gru",
                                         **PAPER).to(DTYPE)
    return _record(method, model, _data(4))


def _optimizer_per_variable_hierarchical() -> dict[str, Any]:
    model = LinearGaussianHierarchy.random(data_dim=X, latent_dims=(3, 2), dtype=DTYPE,
                                           generator=torch.Generator().manual_seed(5))
    method = IterativeInferenceOptimizer(
        model, latent_dim=model.latent_dim, num_steps=T,
        network=PerVariableNetwork({"z1": HighwayMLP(hidden_size=8), "z2": HighwayMLP(hidden_size=6)}),
        encoding=("gradient", "hierarchical_errors", "params"), **PAPER,
    ).to(DTYPE)
    x = torch.randn(B, X, dtype=DTYPE, generator=torch.Generator().manual_seed(6))
    return _record(method, model, x, dim=5)


def _gradient_e_step() -> dict[str, Any]:
    model = VAEModel(_TinyVAE().to(DTYPE), likelihood="bernoulli", latent_dim=D)
    method = GradientEStep(model, latent_dim=D, lr=0.05, num_steps=T, init="encoder", max_grad_norm=2.0)
    return _record(method, model, _data(7))


def _semi_amortized(through: bool) -> Callable[[], dict[str, Any]]:
    def run() -> dict[str, Any]:
        model = _decoder_model()
        method = SemiAmortized(model, latent_dim=D, num_steps=T, init="highway", hidden_size=8,
                               backprop_through_steps=through).to(DTYPE)
        return _record(method, model, _data(8))
    return run


def _standard_encoder() -> dict[str, Any]:
    model = _decoder_model()
    method = StandardEncoder(model, latent_dim=D, init="highway", hidden_size=8).to(DTYPE)
    return _record(method, model, _data(10))


def _pyro_guide() -> dict[str, Any]:
    import pyro
    import pyro.distributions as dist
    from pyro.infer import Trace_ELBO

    from learned_inference.integrations.pyro import AutoIterativeNormal, IterativeTrace_ELBO

    def model(x: Tensor) -> None:
        scale = pyro.sample("scale", dist.LogNormal(torch.tensor(0.0, dtype=DTYPE), 1.0))
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(torch.zeros(2, dtype=DTYPE), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True).expand(-1, 3), scale).to_event(1), obs=x)

    pyro.clear_param_store()
    x = torch.randn(B, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(11))
    default = torch.get_default_dtype()
    torch.set_default_dtype(DTYPE)
    try:
        return _record_guide(model, x, AutoIterativeNormal(model, num_steps=T, hidden_size=8),
                             (("trace", Trace_ELBO()), ("iterative", IterativeTrace_ELBO())))
    finally:
        torch.set_default_dtype(default)


def _record_guide(model: Callable[..., None], x: Tensor, guide: Any, elbos: tuple) -> dict[str, Any]:
    import pyro

    pyro.set_rng_seed(0)
    guide(x)
    _set_weights(list(guide.named_parameters()))
    out: dict[str, Any] = {"median": _tolist(guide.median(x)),
                           "quantiles": _tolist(guide.quantiles([0.25, 0.75], x))}
    for name, elbo in elbos:
        for p in guide.parameters():
            p.grad = None
        pyro.set_rng_seed(1)
        loss = elbo.differentiable_loss(model, guide, x)
        loss.backward()
        out[name] = {"loss": loss.item(),
                     "grads": _tolist({n: p.grad for n, p in guide.named_parameters() if p.grad is not None})}
    return out


CASES: dict[str, Callable[[], dict[str, Any]]] = {
    "optimizer_default": _optimizer_default,
    "optimizer_encoder_errors": _optimizer_encoder_errors,
    "optimizer_gru": _optimizer_gru,
    "optimizer_per_variable_hierarchical": _optimizer_per_variable_hierarchical,
    "gradient_e_step": _gradient_e_step,
    "semi_amortized_kim": _semi_amortized(True),
    "semi_amortized_krishnan": _semi_amortized(False),
    "standard_encoder": _standard_encoder,
    "pyro_guide": _pyro_guide,
}


def fingerprint(name: str) -> dict[str, Any]:
    """The fingerprint of one case, computed now."""
    torch.manual_seed(0)
    return CASES[name]()


if __name__ == "__main__":
    PATH.parent.mkdir(exist_ok=True)
    PATH.write_text(json.dumps({name: fingerprint(name) for name in CASES}, indent=1) + "\n")
    print(f"wrote {PATH}")
