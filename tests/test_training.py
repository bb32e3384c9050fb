"""``fit``: the training loop of any inference method, with its options, history and argument checks."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from learned_inference.adapters import DecoderModel
from learned_inference.baselines import StandardEncoder
from learned_inference.data import iterate_batches
from learned_inference.optimizer import IterativeInferenceOptimizer
from learned_inference.training import FitHistory, fit


def _data(n: int = 256, seed: int = 0) -> torch.Tensor:
    """Binary data with structure to learn: noisy copies of 4 fixed prototypes over 12 pixels."""
    prototypes = (torch.rand(4, 12, generator=torch.Generator().manual_seed(0)) < 0.4).float()
    g = torch.Generator().manual_seed(seed + 1)
    flips = (torch.rand(n, 12, generator=g) < 0.05).float()
    return (prototypes[torch.randint(0, 4, (n,), generator=g)] + flips).remainder(2)


def _build(seed: int = 0) -> tuple[DecoderModel, IterativeInferenceOptimizer]:
    torch.manual_seed(seed)
    decoder = nn.Sequential(nn.Linear(2, 16), nn.ELU(), nn.Linear(16, 12))
    model = DecoderModel(decoder, likelihood="bernoulli", latent_dim=2)
    # three steps: the default update jumps at t = 0 and uses its momentum heads from t = 2 on
    return model, IterativeInferenceOptimizer(model, latent_dim=2, hidden_size=16, num_steps=3)


def _state(*modules: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for m in modules for p in m.parameters()]


def test_fit_improves_the_train_elbo_and_trains_model_and_method():
    data = _data()
    model, inference = _build()
    inference.infer(data[:2], num_steps=0)  # sizes the lazy layer, so the parameters can be compared
    before = _state(model, inference)
    history = fit(inference, data, epochs=6, batch_size=32, lr=1e-2, progress=False)
    assert isinstance(history, FitHistory)
    assert len(history.train_elbo) == len(history.seconds) == 6 and history.validation_elbo == []
    assert all(s > 0 for s in history.seconds)
    assert history.train_elbo[-1] > history.train_elbo[0] + 0.5, history.train_elbo
    after = _state(model, inference)
    changed = [not torch.equal(b, a) for b, a in zip(before, after, strict=True)]
    n_model = len(list(model.parameters()))
    assert all(changed[:n_model]) and all(changed[n_model:])  # the default Adam covers θ and φ


def test_validation_has_one_entry_per_epoch_and_matches_infer():
    data, held_out = _data(), _data(50, seed=1)
    _, inference = _build()
    history = fit(inference, data, epochs=3, batch_size=32, lr=1e-2, validation=held_out, seed=7, progress=False)
    assert len(history.validation_elbo) == 3
    assert history.validation_elbo[-1] > history.validation_elbo[0]
    # the last entry is the trained method's mean final-step ELBO, in chunks of batch_size, noise seeded by seed
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        manual = torch.cat([inference.infer(chunk).elbo[-1] for chunk in held_out.split(32)]).double().mean()
    assert history.validation_elbo[-1] == pytest.approx(manual.item(), rel=1e-6)


def test_validation_leaves_training_unchanged():
    data, held_out = _data(), _data(50, seed=1)
    runs = []
    for validation in (None, held_out):
        model, inference = _build()
        history = fit(inference, data, epochs=2, batch_size=32, lr=1e-2, validation=validation, progress=False)
        runs.append((history.train_elbo, _state(model, inference), torch.rand(3)))
    (elbo_a, state_a, next_a), (elbo_b, state_b, next_b) = runs
    assert elbo_a == elbo_b
    assert all(torch.equal(a, b) for a, b in zip(state_a, state_b, strict=True))
    assert torch.equal(next_a, next_b)  # the global generator continues as if there had been no validation


def test_an_explicit_optimizer_is_used_and_only_its_parameters_change():
    data = _data(64)
    model, inference = _build()
    inference.infer(data[:2], num_steps=0)
    optimizer = torch.optim.SGD(inference.parameters(), lr=1e-2, momentum=0.9)
    model_before, method_before = _state(model), _state(inference)
    fit(inference, data, epochs=1, batch_size=32, optimizer=optimizer, progress=False)
    assert all("momentum_buffer" in optimizer.state[p] for p in inference.parameters())
    # the model's parameters are not in the optimizer: unchanged
    assert all(torch.equal(b, a) for b, a in zip(model_before, _state(model), strict=True))
    assert all(not torch.equal(b, a) for b, a in zip(method_before, _state(inference), strict=True))


def _one_sgd_step(max_grad_norm: float | None) -> tuple[float, float]:
    """(norm of the parameter change, recorded gradient norm) after one full-batch SGD step with lr 1."""
    data = _data(64)
    model, inference = _build()
    inference.infer(data[:2], num_steps=0)
    before = torch.cat([p.flatten() for p in _state(model, inference)])
    optimizer = torch.optim.SGD([*model.parameters(), *inference.parameters()], lr=1.0)
    torch.manual_seed(3)
    history = fit(inference, data, epochs=1, batch_size=64, optimizer=optimizer, max_grad_norm=max_grad_norm,
                  progress=False)
    after = torch.cat([p.flatten() for p in _state(model, inference)])
    assert len(history.grad_norm) == len(history.grad_norm_max) == 1 and history.skipped_batches == [0]
    assert history.grad_norm == history.grad_norm_max  # one batch: its norm is the median and the largest
    return torch.linalg.vector_norm((after - before).double()).item(), history.grad_norm[0]


def test_the_gradient_norm_is_recorded_and_max_grad_norm_clips_it():
    step, norm = _one_sgd_step(None)  # SGD with lr 1 moves the parameters by exactly the gradient
    assert step == pytest.approx(norm, rel=1e-4) and norm > 1e-2
    clipped_step, norm_before_clipping = _one_sgd_step(1e-3)
    assert norm_before_clipping == pytest.approx(norm, rel=1e-5)  # recorded before clipping
    assert clipped_step == pytest.approx(1e-3, rel=1e-3)


class _NonFiniteFirstBatch(nn.Module):
    """A stand-in method whose loss w has gradient 1, except on its first batch, where the gradient is NaN."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.calls = 0

    def forward(self, x: torch.Tensor) -> SimpleNamespace:
        self.calls += 1
        scale = torch.tensor(float("nan") if self.calls == 1 else 1.0)
        return SimpleNamespace(loss=self.w * scale, elbo=x.new_zeros(1, len(x)))


def test_a_batch_with_a_non_finite_gradient_is_skipped_with_a_warning():
    method = _NonFiniteFirstBatch()
    optimizer = torch.optim.SGD(method.parameters(), lr=0.5)
    with pytest.warns(RuntimeWarning, match=r"epoch 1: 1 of 2 batches had a non-finite gradient and were skipped"):
        history = fit(method, _data(8), epochs=1, batch_size=4, optimizer=optimizer, progress=False)
    assert history.skipped_batches == [1] and history.grad_norm == [1.0]
    assert method.w.item() == -0.5  # only the finite batch stepped: w = 0 - 0.5 · 1


def test_an_iterable_of_batches_works_and_a_dataloader_matches_a_list():
    data = _data(96)
    histories = []
    # the loader's own generator: by default a DataLoader draws a seed from the global generator every epoch
    loader = DataLoader(TensorDataset(data), batch_size=32, generator=torch.Generator())  # yields [x] lists
    for batches in (loader, list(data.split(32))):
        _, inference = _build()
        histories.append(fit(inference, batches, epochs=2, lr=1e-2, progress=False))
    assert len(histories[0].train_elbo) == 2
    assert histories[0].train_elbo == histories[1].train_elbo


def test_a_one_shot_iterator_is_an_error_at_the_epoch_it_runs_dry():
    _, inference = _build()
    with pytest.raises(ValueError, match="data gave no batches in epoch 2"):
        fit(inference, iter(_data(64).split(32)), epochs=2, progress=False)


def test_the_seed_fixes_the_batches_and_the_transform_generator():
    data, seen = _data(50), []

    def transform(x, *, generator):
        seen.append(x)
        return torch.bernoulli(x * 0.5 + 0.25, generator=generator)

    results = []
    for seed in (3, 3, 4):
        seen.clear()
        model, inference = _build()
        history = fit(inference, data, epochs=2, batch_size=16, lr=1e-2, seed=seed, transform=transform,
                      progress=False)
        results.append((history.train_elbo, _state(model, inference), list(seen)))
    (elbo_a, state_a, seen_a), (elbo_b, state_b, seen_b), (elbo_c, _, _) = results
    assert elbo_a == elbo_b and all(torch.equal(a, b) for a, b in zip(state_a, state_b, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(seen_a, seen_b, strict=True))
    assert elbo_a != elbo_c
    # the batches are iterate_batches' with one generator seeded by seed across the epochs (as before fit existed),
    # and transform draws from that same generator
    generator = torch.Generator().manual_seed(3)
    expected = []
    for _ in range(2):
        for x in iterate_batches(data, 16, generator=generator):
            expected.append(x)
            torch.bernoulli(x * 0.5 + 0.25, generator=generator)
    assert len(seen_a) == len(expected) == 8
    assert all(torch.equal(a, b) for a, b in zip(seen_a, expected, strict=True))


class _SharedEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc, log_var = self.linear(x).chunk(2, dim=-1)
        return loc, log_var


def test_parameters_shared_by_model_and_method_go_to_the_default_adam_once(monkeypatch):
    model = DecoderModel(nn.Linear(2, 12), likelihood="bernoulli", latent_dim=2)
    model.encoder = _SharedEncoder()  # the user's model owns the encoder ...
    method = StandardEncoder(model, latent_dim=2, init=model.encoder)  # ... and the method registers it too
    model.decoder.bias.requires_grad_(False)  # frozen: left out
    shared = {id(p) for p in model.encoder.parameters()}
    assert shared <= {id(p) for p in method.parameters()}
    created = []

    class RecordingAdam(torch.optim.Adam):
        def __init__(self, params, **kwargs):
            params = list(params)
            created.append((params, kwargs))
            super().__init__(params, **kwargs)

    monkeypatch.setattr(torch.optim, "Adam", RecordingAdam)
    fit(method, _data(32), epochs=1, batch_size=16, lr=0.05, progress=False)
    (params, kwargs), = created
    ids = [id(p) for p in params]
    assert len(ids) == len(set(ids)) == 3  # decoder weight and the encoder's weight and bias, once each
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
    assert kwargs == {"lr": 0.05}


def _good() -> dict:
    _, inference = _build()
    return {"method": inference, "data": _data(16), "epochs": 1, "progress": False}


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"epochs": 0}, ValueError, "epochs must be an int >= 1"),
        ({"epochs": 2.0}, ValueError, "epochs must be an int >= 1"),
        ({"epochs": True}, ValueError, "epochs must be an int >= 1"),
        ({"batch_size": 0}, ValueError, "batch_size must be an int >= 1"),
        ({"data": torch.ones(4, 12, dtype=torch.long)}, TypeError, "data must be a floating-point tensor"),
        ({"data": torch.ones(0, 12)}, ValueError, "data must be a non-empty batch"),
        ({"data": torch.ones(12)}, ValueError, r"data must be a non-empty batch of shape \[B, \*event\]"),
        ({"data": "batches.pt"}, TypeError, "data must be a tensor .* or an iterable of tensor batches"),
        ({"data": 3}, TypeError, "data must be a tensor .* or an iterable"),
        ({"data": [[1.0, 2.0]]}, TypeError, "each batch of data must be a torch.Tensor"),
        ({"data": []}, ValueError, "data gave no batches in epoch 1"),
        ({"validation": torch.ones(4, 12, dtype=torch.int32)}, TypeError, "validation must be a floating-point"),
        ({"validation": torch.ones(0, 12)}, ValueError, "validation must be a non-empty batch"),
        ({"optimizer": "adam"}, TypeError, "optimizer must be a torch.optim.Optimizer or None, got str"),
        ({"lr": 0.0}, ValueError, "lr must be a positive number"),
        ({"lr": "0.1"}, ValueError, "lr must be a positive number"),
        ({"seed": 1.5}, TypeError, "seed must be an int"),
        ({"max_grad_norm": 0.0}, ValueError, "max_grad_norm must be a positive number or None"),
        ({"max_grad_norm": True}, ValueError, "max_grad_norm must be a positive number or None"),
        ({"method": lambda x: x}, TypeError, "method must be an inference method"),
    ],
)
def test_bad_arguments_are_errors_that_name_the_argument(change, error, message):
    with pytest.raises(error, match=message):
        fit(**{**_good(), **change})


@pytest.mark.parametrize("as_loader", [False, True])
def test_validation_of_another_width_is_named_before_any_training_step(as_loader):
    model, inference = _build()
    data = _data(32)
    inference.infer(data[:2], num_steps=0)  # sizes the lazy input layer, so that the parameters can be compared
    before = _state(model, inference)
    with pytest.raises(ValueError, match=r"validation holds examples of shape \[11\], but the training data's are "
                                         r"\[12\].*validation=data\[-1000:\]"):
        fit(inference, DataLoader(TensorDataset(data), batch_size=16) if as_loader else data, epochs=1,
            validation=_data(8)[:, :11], progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, _state(model, inference), strict=True))  # no step taken


def test_lr_with_an_explicit_optimizer_is_an_error():
    arguments = _good()
    optimizer = torch.optim.SGD(arguments["method"].parameters(), lr=0.1)
    with pytest.raises(ValueError, match="lr sets the default Adam's learning rate"):
        fit(**arguments, optimizer=optimizer, lr=1e-3)


def test_nothing_to_train_is_an_error_naming_the_optimizer_option():
    model, inference = _build()
    inference.infer(_data(2), num_steps=0)
    model.requires_grad_(False)
    inference.requires_grad_(False)
    with pytest.raises(ValueError, match=r"no parameters that require grad.*optimizer="):
        fit(inference, _data(16), epochs=1, progress=False)
