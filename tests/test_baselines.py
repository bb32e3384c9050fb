"""Baselines: one interface, per-example independence, convergence on pPCA, training gradients."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from learned_inference import (
    DecoderModel,
    DiagonalGaussian,
    GradientEStep,
    HighwayEncoder,
    InferenceResult,
    LatentSpace,
    SemiAmortized,
    StandardEncoder,
    elbo,
    elbo_and_grad,
    transforms,
)
from learned_inference.objectives import prior_moments
from learned_inference.zoo import ProbabilisticPCA

LATENT, DATA, STEPS, SAMPLES = 3, 8, 4, 2
DTYPE = torch.float64


def _model(seed: int = 0) -> DecoderModel:
    torch.manual_seed(seed)
    decoder = nn.Sequential(nn.Linear(LATENT, 16), nn.Tanh(), nn.Linear(16, DATA))
    return DecoderModel(decoder, likelihood="bernoulli", latent_dim=LATENT).to(DTYPE)


def _highway() -> HighwayEncoder:
    encoder = HighwayEncoder(LATENT, hidden_size=16).to(DTYPE)
    encoder(torch.zeros(1, DATA, dtype=DTYPE))  # materialize the lazy layer now: it draws random numbers
    return encoder


MODEL = _model()
PPCA = ProbabilisticPCA.random(data_dim=4, latent_dim=2)
METHODS: dict[str, Callable[[], nn.Module]] = {
    "standard": lambda: StandardEncoder(MODEL, latent_dim=LATENT, init=_highway(), num_samples=SAMPLES),
    "sgd": lambda: GradientEStep(
        MODEL, latent_dim=LATENT, optimizer=torch.optim.SGD, lr=0.05, num_samples=SAMPLES
    ),
    "momentum": lambda: GradientEStep(
        MODEL,
        latent_dim=LATENT,
        optimizer=torch.optim.SGD,
        lr=0.05,
        optimizer_options={"momentum": 0.9},
        num_samples=SAMPLES,
    ),
    "rmsprop": lambda: GradientEStep(
        MODEL, latent_dim=LATENT, optimizer=torch.optim.RMSprop, lr=0.01, num_samples=SAMPLES
    ),
    "adam-encoder": lambda: GradientEStep(
        MODEL,
        latent_dim=LATENT,
        optimizer=torch.optim.Adam,
        lr=0.05,
        init=_highway(),
        max_grad_norm=1.0,
        num_samples=SAMPLES,
    ),
    "semi-amortized": lambda: SemiAmortized(
        MODEL, latent_dim=LATENT, init=_highway(), lr=0.05, max_grad_norm=1.0, num_samples=SAMPLES
    ),
}
BUILT = {name: make() for name, make in METHODS.items()}


def _data(batch: int, seed: int, steps: int = STEPS) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.bernoulli(torch.full((batch, DATA), 0.4, dtype=DTYPE), generator=generator)
    noise = torch.randn(steps + 1, SAMPLES, batch, LATENT, dtype=DTYPE, generator=generator)
    return x, noise


def _rows(result: InferenceResult, index: torch.Tensor) -> list[torch.Tensor]:
    return [
        result.params["loc"][index],
        result.params["log_var"][index],
        result.elbo[:, index],
        result.grad_norm[:, index],
    ]


def _assert_rows_close(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for left, right in zip(a, b, strict=True):
        torch.testing.assert_close(left, right, rtol=1e-8, atol=1e-10)


# The same properties as the core's (tests/test_properties.py), for every baseline.
@pytest.mark.parametrize("name", sorted(METHODS))
@settings(max_examples=8, deadline=None)
@given(
    batch=st.integers(2, 6),
    seed=st.integers(0, 2**16),
    steps=st.integers(0, 4),
    from_init_params=st.booleans(),
    data=st.data(),
)
def test_changing_one_example_never_changes_the_others(
    name: str, batch: int, seed: int, steps: int, from_init_params: bool, data: st.DataObject
) -> None:
    method = BUILT[name]
    changed = data.draw(st.integers(0, batch - 1))
    x, noise = _data(batch, seed, steps)
    other = x.clone()
    other[changed] = 1.0 - other[changed]
    inits: list[dict[str, torch.Tensor] | None] = [None, None]
    if from_init_params:  # λ_0 given explicitly, and example j's λ_0 changed too
        init = {n: torch.randn(batch, LATENT, dtype=DTYPE) for n in ("loc", "log_var")}
        moved = {n: v.clone() for n, v in init.items()}
        moved["loc"][changed] += 1.0
        inits = [init, moved]
    first, second = (
        method.infer(inputs, num_steps=steps, noise=noise, init_params=init)
        for inputs, init in zip((x, other), inits, strict=True)
    )
    keep = torch.arange(batch) != changed
    _assert_rows_close(_rows(first, keep), _rows(second, keep))
    assert not torch.allclose(first.elbo[:, changed], second.elbo[:, changed])


@pytest.mark.parametrize("name", sorted(METHODS))
@settings(max_examples=8, deadline=None)
@given(batch=st.integers(1, 7), seed=st.integers(0, 2**16), steps=st.integers(0, 4), data=st.data())
def test_results_do_not_depend_on_batch_composition(
    name: str, batch: int, seed: int, steps: int, data: st.DataObject
) -> None:
    method = BUILT[name]
    subset = torch.tensor(
        data.draw(st.lists(st.integers(0, batch - 1), min_size=1, max_size=batch, unique=True))
    )
    x, noise = _data(batch, seed, steps)
    full = method.infer(x, num_steps=steps, noise=noise)
    part = method.infer(x[subset], num_steps=steps, noise=noise[:, :, subset])
    _assert_rows_close(_rows(full, subset), _rows(part, torch.arange(len(subset))))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_shares_the_result_contract(name: str) -> None:
    x, noise = _data(5, 0)
    result = BUILT[name].infer(x, num_steps=STEPS, noise=noise)
    assert result.elbo.shape == result.grad_norm.shape == (STEPS + 1, 5)
    assert result.posterior.batch_shape == (5,) and result.posterior.event_shape == (LATENT,)
    assert not result.loss.requires_grad and not result.params["loc"].requires_grad
    assert result.loss.item() == pytest.approx(-result.elbo[-1].mean().item())
    steps_zero = BUILT[name].infer(x, num_steps=0, noise=noise[:1])
    torch.testing.assert_close(steps_zero.elbo[0], result.elbo[0])


def test_standard_encoder_does_not_move_but_e_steps_do() -> None:
    x, noise = _data(4, 1)
    same_noise = noise[:1].expand_as(noise)
    standard = BUILT["standard"].infer(x, num_steps=STEPS, noise=same_noise)
    torch.testing.assert_close(standard.elbo, standard.elbo[:1].expand_as(standard.elbo))
    e_step = BUILT["adam-encoder"].infer(x, num_steps=STEPS, noise=same_noise)
    assert (e_step.elbo[-1] > e_step.elbo[0]).all()


def _sigma_points(dim: int) -> torch.Tensor:
    """±√D eᵢ: sample mean 0 and covariance I, so the ELBO of a linear-Gaussian model is exact."""
    eye = torch.eye(dim, dtype=DTYPE) * dim**0.5
    return torch.cat([eye, -eye])


def test_adam_e_step_reaches_the_exact_ppca_posterior() -> None:
    generator = torch.Generator().manual_seed(0)
    model = ProbabilisticPCA.random(data_dim=8, latent_dim=3, dtype=DTYPE, generator=generator)
    x = model.sample(16, generator=generator)
    steps, points = 1000, _sigma_points(3)
    noise = points[None, :, None, :].expand(steps + 1, 6, 16, 3)
    e_step = GradientEStep(
        model, latent_dim=3, optimizer=torch.optim.Adam, lr=0.05, num_steps=steps, num_samples=6
    )
    result = e_step.infer(x, noise=noise)
    loc, log_var = model.exact_posterior(x)
    # The sigma-point ELBO is the exact ELBO, so its optimum is the exact posterior.
    torch.testing.assert_close(
        result.elbo[-1], model.exact_elbo(x, result.params["loc"], result.params["log_var"])
    )
    assert (result.params["loc"] - loc).abs().max() < 1e-3
    assert (result.params["log_var"] - log_var).abs().max() < 1e-3
    torch.testing.assert_close(result.elbo[-1], model.log_marginal(x), rtol=0, atol=1e-6)


def test_delta_e_step_finds_the_posterior_mode() -> None:
    generator = torch.Generator().manual_seed(1)
    model = ProbabilisticPCA.random(data_dim=6, latent_dim=2, dtype=DTYPE, generator=generator)
    x = model.sample(8, generator=generator)
    e_step = GradientEStep(model, latent_dim=2, family="delta", lr=0.05, num_steps=600)
    result = e_step.infer(x)
    assert set(result.params) == {"loc"}
    torch.testing.assert_close(result.params["loc"], model.exact_posterior(x)[0], rtol=0, atol=1e-6)


def test_semi_amortized_steps_are_torch_sgd_with_momentum() -> None:
    encoder = _highway()
    x, noise = _data(5, 3)
    options = {"latent_dim": LATENT, "init": encoder, "max_grad_norm": 0.5, "num_samples": SAMPLES}
    semi = SemiAmortized(MODEL, lr=0.2, momentum=0.7, **options).infer(x, num_steps=STEPS, noise=noise)
    sgd = GradientEStep(  # dampening (a torch.optim option the pure transform lacks) runs torch.optim.SGD itself
        MODEL, optimizer=torch.optim.SGD, lr=0.2, optimizer_options={"momentum": 0.7, "dampening": 0.0}, **options
    )
    reference = sgd.infer(x, num_steps=STEPS, noise=noise)
    _assert_rows_close(_rows(semi, torch.arange(5)), _rows(reference, torch.arange(5)))


@pytest.mark.parametrize(("optimizer", "options"), [
    (torch.optim.SGD, {}), (torch.optim.SGD, {"momentum": 0.9}), (torch.optim.Adam, {}),
    (torch.optim.Adam, {"betas": (0.5, 0.9), "eps": 1e-6}), (torch.optim.RMSprop, {"alpha": 0.9}),
])
def test_pure_transforms_follow_torch_optim(optimizer, options) -> None:
    """The pure transforms GradientEStep runs for SGD, Adam and RMSprop take torch.optim's steps (ascent on L is
    descent on −L), to float64 rounding, over 20 steps of varying gradients."""
    build = {torch.optim.SGD: transforms.sgd, torch.optim.Adam: transforms.adam,
             torch.optim.RMSprop: transforms.rmsprop}[optimizer]
    pure = build(0.05, **options)
    params = {"loc": torch.randn(4, 3, dtype=DTYPE), "log_var": torch.randn(4, 3, dtype=DTYPE)}
    leaves = {n: p.clone().requires_grad_() for n, p in params.items()}
    reference = optimizer(list(leaves.values()), lr=0.05, **options)
    state = pure.init(params)
    for _ in range(20):
        grads = {n: torch.randn_like(p) for n, p in params.items()}
        updates, state = pure.update(grads, state, params)
        params = transforms.apply_updates(params, updates)
        for n, leaf in leaves.items():
            leaf.grad = -grads[n]
        reference.step()
    for n, leaf in leaves.items():
        torch.testing.assert_close(params[n], leaf.detach(), rtol=1e-12, atol=1e-12)


def test_chained_transforms_clip_each_example_then_step() -> None:
    step = transforms.chain(transforms.clip_by_example_norm(1.0), transforms.sgd(1.0, momentum=0.5))
    params, grads = {"loc": torch.zeros(2, 2)}, {"loc": torch.tensor([[3.0, 4.0], [0.3, 0.4]])}
    state = step.init(params)
    updates, state = step.update(grads, state, params)
    torch.testing.assert_close(updates["loc"], torch.tensor([[0.6, 0.8], [0.3, 0.4]]), rtol=0, atol=1e-6)
    updates, _ = step.update(grads, state, params)  # velocity 0.5 v + g
    torch.testing.assert_close(updates["loc"], torch.tensor([[0.9, 1.2], [0.45, 0.6]]), rtol=0, atol=1e-6)


# ---- training gradients ----


def _grads(loss: torch.Tensor, modules: list[nn.Module]) -> list[torch.Tensor]:
    params = [p for m in modules for p in m.parameters()]
    return list(torch.autograd.grad(loss, params, allow_unused=True))


def _noises(steps: int, batch: int, seed: int) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    return [torch.randn(SAMPLES, batch, LATENT, dtype=DTYPE) for _ in range(steps + 1)]


def _elbo(params: dict[str, torch.Tensor], x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return elbo(
        MODEL,
        DiagonalGaussian(),
        params,
        x,
        noise,
        space=LatentSpace(LATENT),
        prior=prior_moments(MODEL, LatentSpace(LATENT)),
    )


def _encode(encoder: HighwayEncoder, x: torch.Tensor) -> dict[str, torch.Tensor]:
    loc, log_var = encoder(x)
    return DiagonalGaussian().constrain({"loc": loc, "log_var": log_var})


def test_standard_encoder_loss_is_the_vae_loss() -> None:
    encoder = _highway()
    method = StandardEncoder(MODEL, latent_dim=LATENT, init=encoder, num_samples=SAMPLES)
    x, _ = _data(6, 4)
    (noise,) = _noises(0, 6, seed=5)
    torch.manual_seed(5)
    loss = method(x).loss
    reference = -_elbo(_encode(encoder, x), x, noise).mean()
    torch.testing.assert_close(loss, reference)
    for ours, theirs in zip(_grads(loss, [MODEL, encoder]), _grads(reference, [MODEL, encoder]), strict=True):
        torch.testing.assert_close(ours, theirs)


def _unrolled(
    encoder: HighwayEncoder,
    x: torch.Tensor,
    noises: list[torch.Tensor],
    *,
    lr: float,
    momentum: float,
    detach_steps: bool,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """λ_0 and λ_K by hand: plain momentum ascent (no clipping), optionally differentiating through it."""
    space = LatentSpace(LATENT)
    initial = _encode(encoder, x)
    params, velocity = initial, None
    for noise in noises[:-1]:
        lam = {n: p.detach() for n, p in params.items()} if detach_steps else params
        with torch.enable_grad():
            _, grads = elbo_and_grad(
                MODEL, DiagonalGaussian(), lam, x, noise, space=space, prior=prior_moments(MODEL, space)
            )
        velocity = grads if velocity is None else {n: momentum * velocity[n] + g for n, g in grads.items()}
        params = DiagonalGaussian().constrain({n: lam[n] + lr * velocity[n] for n in lam})
    return initial, params


@pytest.mark.parametrize("through_steps", [True, False])
def test_semi_amortized_gradients_match_kim_and_krishnan(through_steps: bool) -> None:
    encoder, steps, batch = _highway(), 3, 5
    method = SemiAmortized(
        MODEL,
        latent_dim=LATENT,
        init=encoder,
        num_steps=steps,
        lr=0.3,
        momentum=0.5,
        max_grad_norm=None,
        backprop_through_steps=through_steps,
        num_samples=SAMPLES,
    )
    x, _ = _data(batch, 6)
    noises = _noises(steps, batch, seed=7)
    torch.manual_seed(7)
    result = method(x)
    initial, final = _unrolled(encoder, x, noises, lr=0.3, momentum=0.5, detach_steps=not through_steps)
    # The model learns from the refined λ_K, held fixed.
    model_loss = -_elbo({n: p.detach() for n, p in final.items()}, x, noises[-1]).mean()
    torch.testing.assert_close(result.loss, model_loss)
    for ours, theirs in zip(_grads(result.loss, [MODEL]), _grads(model_loss, [MODEL]), strict=True):
        torch.testing.assert_close(ours, theirs)
    # Kim et al.: the encoder learns from L(λ_K(φ)) through the steps; Krishnan et al.: from L(λ_0(φ)).
    encoder_loss = -(_elbo(final, x, noises[-1]) if through_steps else _elbo(initial, x, noises[0])).mean()
    for ours, theirs in zip(_grads(result.loss, [encoder]), _grads(encoder_loss, [encoder]), strict=True):
        torch.testing.assert_close(ours, theirs)


def test_gradient_e_step_trains_the_model_from_the_final_posterior() -> None:
    model = _model(seed=1)
    method = GradientEStep(model, latent_dim=LATENT, lr=0.1, num_steps=5, num_samples=SAMPLES)
    x, _ = _data(4, 8)
    result = method(x)
    assert list(method.parameters()) == []
    result.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert result.loss.item() == pytest.approx(-result.elbo[-1].mean().item())


# ---- several latent variables, init_params, errors ----


class _TwoLatents(nn.Module):
    """log p(x, z) with z = {"a": [.., 2], "b": [.., 1]}: x ~ N(a₀ + a₁ + b, 1), z ~ N(0, I)."""

    def log_joint(self, x: torch.Tensor, z: dict[str, torch.Tensor]) -> torch.Tensor:
        mean = z["a"].sum(-1, keepdim=True) + z["b"]
        normal = torch.distributions.Normal(0.0, 1.0)
        return (
            normal.log_prob(x - mean).sum(-1)
            + normal.log_prob(z["a"]).sum(-1)
            + normal.log_prob(z["b"]).sum(-1)
        )


def test_several_latent_variables_round_trip_through_init_params() -> None:
    method = GradientEStep(_TwoLatents(), latent_dim={"a": 2, "b": 1}, lr=0.1, num_steps=20)
    x = torch.randn(4, 1)
    result = method.infer(x)
    assert set(result.params) == {"a", "b"} and result.params["a"]["loc"].shape == (4, 2)
    assert result.posterior["b"].batch_shape == (4,)
    again = method.infer(x, num_steps=0, init_params=result.params)
    for name in ("a", "b"):
        for part in ("loc", "log_var"):
            torch.testing.assert_close(again.params[name][part], result.params[name][part])


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: GradientEStep(MODEL, latent_dim=3, optimizer=torch.optim.LBFGS), "LBFGS"),
        (lambda: GradientEStep(MODEL, latent_dim=3, optimizer="adam"), "optimizer must be a torch.optim"),
        (lambda: GradientEStep(MODEL, latent_dim=3, lr=-1.0), "lr=-1.0"),
        (lambda: GradientEStep(MODEL, latent_dim=3, optimizer_options={"betas": 3}), "optimizer_options"),
        (lambda: GradientEStep(MODEL, latent_dim=3, max_grad_norm=0.0), "max_grad_norm"),
        (lambda: GradientEStep(MODEL, latent_dim=3, num_steps=-1), "num_steps"),
        (lambda: GradientEStep(PPCA, latent_dim=2, init="encoder"), "model.encode"),
        (lambda: StandardEncoder(MODEL, latent_dim=3, init="prior"), "init must be 'encoder'"),
        (lambda: SemiAmortized(MODEL, latent_dim=3, init="highway", momentum=1.0), "momentum"),
        (lambda: SemiAmortized(MODEL, latent_dim=3, init="highway", lr=0.0), "lr"),
    ],
)
def test_bad_options_name_the_argument(build: Callable[[], nn.Module], match: str) -> None:
    with pytest.raises((TypeError, ValueError), match=match):
        build()


def test_bad_inputs_name_the_argument() -> None:
    method = BUILT["sgd"]
    x, noise = _data(3, 0)
    with pytest.raises(ValueError, match="noise must have shape"):
        method.infer(x, num_steps=2, noise=noise)
    with pytest.raises(TypeError, match="floating-point"):
        method.infer(x.long())
    with pytest.raises(ValueError, match="init_params must have entries"):
        method.infer(x, init_params={"loc": torch.zeros(3, LATENT, dtype=DTYPE)})


def test_gradient_e_step_takes_a_gradient_transform() -> None:
    x, noise = _data(4, 3)
    options = {"latent_dim": LATENT, "num_samples": SAMPLES, "num_steps": STEPS}
    composed = GradientEStep(MODEL, optimizer=transforms.chain(transforms.clip_by_example_norm(1.0),
                                                               transforms.adam(0.05)), **options)
    reference = GradientEStep(MODEL, optimizer=torch.optim.Adam, lr=0.05, max_grad_norm=1.0, **options)
    _assert_rows_close(_rows(composed.infer(x, noise=noise), torch.arange(4)),
                       _rows(reference.infer(x, noise=noise), torch.arange(4)))
    with pytest.raises(TypeError, match="GradientTransform"):
        GradientEStep(MODEL, latent_dim=LATENT, optimizer="adam")  # type: ignore[arg-type]
