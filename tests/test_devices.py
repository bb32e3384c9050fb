"""Devices and precision (issue 27): what follows the data's device and dtype, host synchronisation, autocast.

On the CPU: the refinement step path synchronises with the host a fixed, small number of times per call (counted
by patching the tensor methods that read a value back: the count does not grow with the number of steps);
bf16 and fp16 autocast give update-network and model gradients close to float32; float16 data is refused with the
fix; what the library creates follows a module's device (checked on the ``meta`` device) and dtype. The tests
marked ``cuda`` run where CUDA exists and are skipped here with the reason.
"""

from __future__ import annotations

import collections
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from torch import nn

from learned_inference import DecoderModel, IterativeInferenceOptimizer, VAEModel, fit
from learned_inference.checkpoint import load_checkpoint, save_checkpoint
from tests.conftest import mlp_decoder

D, X, B = 4, 20, 8
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run where one exists)")

#: the tensor methods that read a value back to the host (a synchronisation on a GPU)
_READ_BACK = ("__bool__", "item", "tolist", "__int__", "__float__", "__index__", "nonzero")


@contextmanager
def _host_reads() -> Iterator[collections.Counter]:
    """Counts the calls of the read-back methods inside, by the library file and line that made them."""
    counts: collections.Counter = collections.Counter()
    original = {name: getattr(torch.Tensor, name) for name in _READ_BACK}

    def counting(name: str):
        def method(self, *args, **kwargs):
            frame = traceback.extract_stack(limit=3)[0]
            counts[f"{name} at {frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}"] += 1
            return original[name](self, *args, **kwargs)
        return method

    for name in _READ_BACK:
        setattr(torch.Tensor, name, counting(name))
    try:
        yield counts
    finally:
        for name, method in original.items():
            setattr(torch.Tensor, name, method)


def _inference(dtype: torch.dtype = torch.float64, device: str = "cpu") -> IterativeInferenceOptimizer:
    model = DecoderModel(mlp_decoder(D, X, dtype=dtype), likelihood="bernoulli", latent_dim=D).to(device)
    return IterativeInferenceOptimizer(model, latent_dim=D, num_steps=3, hidden_size=16).to(device=device, dtype=dtype)


def _x(dtype: torch.dtype = torch.float64, device: str = "cpu") -> torch.Tensor:
    return torch.bernoulli(torch.full((B, X), 0.4, dtype=dtype, device=device))


@pytest.mark.parametrize("train", [False, True])
def test_refinement_steps_read_nothing_back_to_the_host(train):
    inference, x = _inference(), _x()
    inference(x)  # the first call's model checks read values back, once
    counts = {}
    for steps in (2, 12):
        with _host_reads() as reads:
            if train:
                inference.num_steps = steps
                inference(x).loss.backward()
            else:
                inference.infer(x, num_steps=steps)
        counts[steps] = reads
    assert counts[2] == counts[12], counts  # no read-back per step
    assert sum(counts[12].values()) <= 5, counts[12]  # a few per call: the data's checks, the health report


def _gradients(autocast_dtype: torch.dtype | None, *, scaler: bool = False) -> list[torch.Tensor]:
    torch.manual_seed(0)
    inference = _inference(torch.float32)
    x = _x(torch.float32)
    inference.infer(x, num_steps=0)
    noise = torch.randn(4, inference.num_samples, B, D, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        loss = inference(x, noise=noise).loss
    parameters = [*inference.parameters(), *inference.model.parameters()]
    if scaler:
        grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
        grad_scaler.scale(loss).backward()
        optim = torch.optim.SGD(parameters, lr=0.0)
        grad_scaler.unscale_(optim)
    else:
        loss.backward()
    return [p.grad.clone() for p in parameters]


@pytest.mark.parametrize(("dtype", "per_tensor", "overall"),
                         [(torch.bfloat16, 0.08, 0.02), (torch.float16, 0.03, 0.003)])
def test_autocast_gradients_match_float32(dtype, per_tensor, overall):
    """Relative error against float32 of each parameter's gradient (update network and model) and of all of them
    together: bf16 keeps 8 bits of mantissa (errors of a few percent), fp16 keeps 11; with fp16 the GradScaler's
    scale is undone exactly (the engine's per-step products are taken unweighted, then weighted in float32)."""
    reference = _gradients(None)
    want_all = torch.cat([g.flatten() for g in reference])
    for scaler in ((False, True) if dtype == torch.float16 else (False,)):
        got = _gradients(dtype, scaler=scaler)
        for g, want in zip(got, reference, strict=True):
            assert torch.isfinite(g).all()
            assert (g - want).norm() <= per_tensor * want.norm() + 1e-6, (dtype, scaler)
        got_all = torch.cat([g.flatten() for g in got])
        assert (got_all - want_all).norm() <= overall * want_all.norm(), (dtype, scaler)


def test_float16_data_is_refused_naming_what_to_use():
    inference = _inference(torch.float32)
    with pytest.raises(TypeError, match=r"x is float16.*65504.*torch.autocast.*bfloat16"):
        inference.infer(_x(torch.float16))


def test_bfloat16_end_to_end_trains():
    inference, x = _inference(torch.bfloat16), _x(torch.bfloat16)
    result = inference(x)
    result.loss.backward()
    assert result.elbo.dtype == torch.bfloat16 and torch.isfinite(result.elbo).all()
    reference = _inference(torch.float64).infer(_x(torch.float64), num_steps=0).elbo
    assert torch.isfinite(reference).all()
    assert all(torch.isfinite(p.grad).all() for p in inference.parameters() if p.grad is not None)


class _VAE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc, self.dec = nn.Linear(X, 2 * D), nn.Linear(D, X)

    def encode(self, x):
        return list(self.enc(x).chunk(2, -1))

    def decode(self, z):
        return self.dec(z)


@pytest.mark.parametrize("wrap", ["vae", "decoder"])
def test_the_prior_follows_the_models_device_and_dtype(wrap):
    vae = _VAE().to(device="meta", dtype=torch.float64)
    model = (VAEModel(vae, likelihood="bernoulli", latent_dim=D) if wrap == "vae"
             else DecoderModel(vae.dec, likelihood="bernoulli", latent_dim=D))
    prior = model.prior()
    assert prior.mean.device.type == "meta" and prior.mean.dtype == torch.float64


def test_fit_with_a_device_moves_batches_from_a_dataloader():
    data = torch.bernoulli(torch.full((32, X), 0.4))
    histories = []
    for device in (None, "cpu"):
        torch.manual_seed(0)
        inference = _inference(torch.float32)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=16)
        histories.append(fit(inference, loader, epochs=2, lr=1e-2, progress=False, device=device).train_elbo)
    assert histories[0] == histories[1]


def test_checkpoints_hold_the_cuda_states_only_where_cuda_is_used(tmp_path):
    inference = _inference()
    inference.infer(_x(), num_steps=0)
    save_checkpoint(tmp_path / "c.pt", step=1, inference=inference)
    payload = load_checkpoint(tmp_path / "c.pt", restore_rng=True, inference=inference)
    assert ("cuda" in payload["rng"]) == (torch.cuda.is_available() and torch.cuda.is_initialized())


def test_an_eval_mode_cudnn_rnn_gets_an_error_naming_the_fix():
    """cuDNN differentiates RNNs only in training mode; the message (raised where CUDA meets it) names the fix."""

    class CudnnLike(DecoderModel):
        def log_joint(self, x, z):
            if torch.is_grad_enabled() and z.requires_grad:  # as cuDNN's RNN backward does in eval mode
                raise RuntimeError("cudnn RNN backward can only be called in training mode")
            return super().log_joint(x, z)

    model = CudnnLike(mlp_decoder(D, X), likelihood="bernoulli", latent_dim=D)
    inference = IterativeInferenceOptimizer(model, latent_dim=D, hidden_size=8).double()
    with pytest.raises(ValueError, match=r"cuDNN recurrent layer.*rnn.train\(\).*cudnn.flags\(enabled=False\)"):
        inference.infer(_x())


# ---- on a GPU ------------------------------------------------------------------------------------------------------

@cuda
def test_cuda_training_step_and_infer_with_every_option():
    inference, x = _inference(torch.float32, "cuda"), _x(torch.float32, "cuda")
    optim = torch.optim.Adam([*inference.parameters(), *inference.model.parameters()], lr=1e-3)
    optim.zero_grad()
    inference(x).loss.backward()
    optim.step()
    for options in ({}, {"tol": 1e-3}, {"keep_best": True}, {"record_params": True},
                    {"noise": torch.randn(6, inference.num_samples, B, D, device="cuda")}):
        result = inference.infer(x, num_steps=5, **options)
        assert result.elbo.device.type == "cuda" and torch.isfinite(result.elbo).all(), options


@cuda
def test_cuda_refinement_steps_do_not_synchronise():
    inference, x = _inference(torch.float32, "cuda"), _x(torch.float32, "cuda")
    inference(x)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError):  # a call synchronises a few times (data checks, health report) ...
            inference.infer(x, num_steps=5)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    with _host_reads() as few:
        inference.infer(x, num_steps=2)
    with _host_reads() as many:
        inference.infer(x, num_steps=12)
    assert few == many  # ... and never per step


@cuda
def test_cuda_fit_from_a_cpu_dataloader_and_checkpoint_round_trip(tmp_path):
    inference = _inference(torch.float32, "cuda")
    data = torch.bernoulli(torch.full((64, X), 0.4))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=16, pin_memory=True)
    history = fit(inference, loader, epochs=2, lr=1e-2, progress=False, device="cuda", validation=data[:16])
    assert all(map(torch.isfinite, torch.tensor(history.train_elbo)))
    save_checkpoint(tmp_path / "c.pt", step=2, inference=inference)
    restored = _inference(torch.float32, "cuda")
    restored.infer(_x(torch.float32, "cuda"), num_steps=0)
    payload = load_checkpoint(tmp_path / "c.pt", restore_rng=True, inference=restored)
    assert "cuda" in payload["rng"]
    for a, b in zip(inference.state_dict().values(), restored.state_dict().values(), strict=True):
        assert torch.equal(a, b)


@cuda
def test_cuda_pyro_guide_builds_on_the_datas_device():
    pyro = pytest.importorskip("pyro")
    import pyro.distributions as dist
    from pyro.infer import SVI

    from learned_inference.integrations.pyro import AutoIterativeNormal, IterativeTrace_ELBO

    decoder = nn.Linear(2, 5).cuda()

    def model(x):
        pyro.module("decoder", decoder)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(torch.zeros(2, device="cuda"), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x)

    pyro.clear_param_store()
    guide = AutoIterativeNormal(model, num_steps=3, hidden_size=8)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), IterativeTrace_ELBO())
    x = torch.bernoulli(torch.full((8, 5), 0.5, device="cuda"))
    for _ in range(2):
        svi.step(x)
    assert all(p.device.type == "cuda" for p in guide.parameters())
    assert guide.median(x)["z"].device.type == "cuda"


@cuda
def test_cuda_lightning_bf16_mixed():
    lightning = pytest.importorskip("lightning")
    from learned_inference.integrations.lightning import IterativeInferenceModule

    inference = _inference(torch.float32)
    x = _x(torch.float32).repeat(4, 1)
    inference.infer(x[:2], num_steps=0)
    module = IterativeInferenceModule(inference)
    trainer = lightning.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_epochs=1,
                                logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(module, torch.utils.data.DataLoader(x, batch_size=8))
    assert all(torch.isfinite(p).all() for p in inference.parameters())


@cuda
def test_cuda_ddp_with_nccl_on_one_rank(tmp_path):
    import torch.distributed as dist

    from learned_inference import ModelWithInference

    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        inference, x = _inference(torch.float32, "cuda"), _x(torch.float32, "cuda")
        joint = nn.parallel.DistributedDataParallel(ModelWithInference(inference, example_input=x))
        joint(x).loss.backward()
        assert all(p.grad is not None for p in joint.parameters() if p.requires_grad)
    finally:
        dist.destroy_process_group()


@cuda
def test_cuda_lstm_decoder_runs_with_its_rnn_in_training_mode():
    class LSTMDecoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.out = nn.LSTM(D, 16, batch_first=True), nn.Linear(16, X)

        def forward(self, z):
            h, _ = self.rnn(z.unsqueeze(1).expand(-1, 3, -1))
            return self.out(h[:, -1])

    decoder = LSTMDecoder().cuda().eval()
    model = DecoderModel(decoder, likelihood="bernoulli", latent_dim=D)
    inference = IterativeInferenceOptimizer(model, latent_dim=D, hidden_size=8).cuda()
    x = _x(torch.float32, "cuda")
    with pytest.raises(ValueError, match="cuDNN recurrent layer"):
        inference.infer(x)
    decoder.rnn.train()  # the fix the message names
    inference = IterativeInferenceOptimizer(model, latent_dim=D, hidden_size=8).cuda()
    assert torch.isfinite(inference.infer(x).elbo).all()
