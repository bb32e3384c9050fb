"""The real pythae package, and an AntixK-style convolutional VAE, trained the way their users train them.

pythae (a test dependency) builds its VAE with its default MLP networks and with its MNIST benchmark convolutional
networks (batch norm in encoder and decoder). Each is first trained a few steps with pythae's own loss, in
training mode, then wrapped with the recipe of ``docs/recipes.md`` and (a) refined frozen, in eval mode, and
(b) trained jointly with the learned optimizer, in training mode (batch norm with the batch's statistics). The
AntixK-style VAE (conv + BatchNorm2d + LeakyReLU encoder, transposed convs decoder, ``encode -> [mu, log_var]``)
is written here as that repository writes its models.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from learned_inference import GradientEStep, IterativeInferenceOptimizer, VAEModel
from learned_inference.data import load_binarized_mnist
from learned_inference.likelihoods import log_var_from_squared_error

pythae_models = pytest.importorskip("pythae.models")
mnist_nets = pytest.importorskip("pythae.models.nn.benchmarks.mnist")

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
LATENT = 8


def _images(count: int, *, seed: int = 0) -> torch.Tensor:
    """Binarized MNIST images ``[count, 1, 28, 28]`` (random bits when ../shared/data is absent)."""
    if (SHARED / "binarized_mnist.npz").exists():
        return load_binarized_mnist(SHARED).train[:count].float().reshape(count, 1, 28, 28)
    return torch.bernoulli(torch.rand(count, 1, 28, 28, generator=torch.Generator().manual_seed(seed)))


def _pythae_vae(nets: str):
    config = pythae_models.VAEConfig(input_dim=(1, 28, 28), latent_dim=LATENT, reconstruction_loss="bce")
    if nets == "mlp":
        return pythae_models.VAE(config)
    return pythae_models.VAE(config, encoder=mnist_nets.Encoder_Conv_VAE_MNIST(config),
                             decoder=mnist_nets.Decoder_Conv_AE_MNIST(config))


def _batch_norms(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.fixture(scope="module", params=["mlp", "conv"])
def trained_pythae(request):
    """A pythae VAE after 3 steps of pythae's own training loss (training mode, batch of 16)."""
    torch.manual_seed(0)
    vae = _pythae_vae(request.param)
    optim = torch.optim.Adam(vae.parameters(), lr=1e-3)
    x = _images(48)
    for step in range(3):
        optim.zero_grad()
        vae({"data": x[16 * step:16 * (step + 1)]}).loss.backward()
        optim.step()
    return request.param, vae, x


def _wrap(vae) -> VAEModel:
    """The recipe's wrap (docs/recipes.md, pythae): BCE on the decoder's sigmoid output."""
    return VAEModel(vae, likelihood="bernoulli-probs", latent_dim=LATENT, encode=vae.encoder, decode=vae.decoder)


def test_pythae_vae_refined_frozen(trained_pythae):
    _, vae, x = trained_pythae
    vae = copy.deepcopy(vae).eval().requires_grad_(False)
    model = _wrap(vae)
    batch = x[:8]
    inference = IterativeInferenceOptimizer(model, latent_dim=LATENT, num_steps=2, hidden_size=32, init="encoder")
    optim = torch.optim.Adam(inference.parameters(), lr=1e-3)
    for _ in range(2):  # the update network alone learns; the VAE is frozen
        optim.zero_grad()
        inference(batch).loss.backward()
        optim.step()
    result = inference.infer(batch, num_steps=4)
    assert torch.isfinite(result.elbo).all() and result.elbo.shape == (5, 8)
    # the same frozen model, refined by gradient steps from its encoder: the ELBO rises (refinement has a gap to close)
    e_step = GradientEStep(model, latent_dim=LATENT, num_steps=30, lr=5e-2, init="encoder")
    elbo = e_step.infer(batch).elbo
    assert elbo[-1].mean() > elbo[0].mean() + 0.1


def test_pythae_vae_trained_jointly_in_training_mode(trained_pythae):
    nets, vae, x = trained_pythae
    vae = copy.deepcopy(vae).train()
    model = _wrap(vae)
    norms = _batch_norms(vae)
    assert bool(norms) == (nets == "conv")  # pythae's benchmark nets use batch norm, its MLPs do not
    tracked = [int(m.num_batches_tracked) for m in norms]
    inference = IterativeInferenceOptimizer(model, latent_dim=LATENT, num_steps=2, hidden_size=32, init="encoder")
    optim = torch.optim.Adam([*vae.parameters(), *inference.parameters()], lr=1e-3)
    before = copy.deepcopy(vae.decoder.state_dict())
    for step in range(2):
        optim.zero_grad()
        result = inference(x[8 * step:8 * (step + 1)])
        result.loss.backward()
        optim.step()
        assert torch.isfinite(result.loss) and result.healthy.all()
    assert [int(m.num_batches_tracked) for m in norms] == [n + 2 for n in tracked]  # once per training step
    assert any(not torch.equal(v, before[k]) for k, v in vae.decoder.state_dict().items() if "weight" in k)
    with pytest.raises(ValueError, match=r"is in training mode at test time.*model.eval\(\)") if norms else \
            _no_error():
        inference.infer(x[:4])


class _no_error:  # noqa: N801 (a context manager used like pytest.raises)
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class AntixKStyleVAE(nn.Module):
    """A VAE written as AntixK's PyTorch-VAE writes ``VanillaVAE``: conv blocks with BatchNorm2d and LeakyReLU,
    ``encode -> [mu, log_var]``, a transposed-conv decoder with a Tanh output, ``mse + kld_weight · KLD`` loss."""

    def __init__(self, in_channels: int = 1, latent_dim: int = LATENT, hidden_dims: tuple[int, ...] = (8, 16)):
        super().__init__()
        modules, channels = [], in_channels
        for h_dim in hidden_dims:
            modules.append(nn.Sequential(nn.Conv2d(channels, h_dim, 3, stride=2, padding=1), nn.BatchNorm2d(h_dim),
                                         nn.LeakyReLU()))
            channels = h_dim
        self.encoder = nn.Sequential(*modules)
        self.last = hidden_dims[-1]
        self.fc_mu = nn.Linear(self.last * 49, latent_dim)
        self.fc_var = nn.Linear(self.last * 49, latent_dim)
        self.decoder_input = nn.Linear(latent_dim, self.last * 49)
        reversed_dims = list(reversed(hidden_dims))
        modules = [nn.Sequential(nn.ConvTranspose2d(reversed_dims[i], reversed_dims[i + 1], 3, stride=2, padding=1,
                                                    output_padding=1),
                                 nn.BatchNorm2d(reversed_dims[i + 1]), nn.LeakyReLU())
                   for i in range(len(reversed_dims) - 1)]
        self.decoder = nn.Sequential(*modules)
        self.final_layer = nn.Sequential(
            nn.ConvTranspose2d(reversed_dims[-1], reversed_dims[-1], 3, stride=2, padding=1, output_padding=1),
            nn.BatchNorm2d(reversed_dims[-1]), nn.LeakyReLU(),
            nn.Conv2d(reversed_dims[-1], in_channels, 3, padding=1), nn.Tanh())

    def encode(self, input: torch.Tensor) -> list[torch.Tensor]:
        result = torch.flatten(self.encoder(input), start_dim=1)
        return [self.fc_mu(result), self.fc_var(result)]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.final_layer(self.decoder(self.decoder_input(z).view(-1, self.last, 7, 7)))

    def forward(self, input: torch.Tensor) -> list[torch.Tensor]:
        mu, log_var = self.encode(input)
        z = torch.randn_like(mu) * torch.exp(0.5 * log_var) + mu
        return [self.decode(z), input, mu, log_var]

    def loss_function(self, recons, input, mu, log_var, *, kld_weight: float) -> torch.Tensor:
        kld = torch.mean(-0.5 * torch.sum(1 + log_var - mu ** 2 - log_var.exp(), dim=1), dim=0)
        return F.mse_loss(recons, input) + kld_weight * kld


def test_antixk_style_vae_trains_jointly_after_its_own_training():
    torch.manual_seed(0)
    vae, weight = AntixKStyleVAE(), 0.00025
    x = _images(32) * 2 - 1  # the Tanh output's range
    optim = torch.optim.Adam(vae.parameters(), lr=1e-3)
    for step in range(2):  # its own loop
        optim.zero_grad()
        vae.loss_function(*vae(x[16 * step:16 * (step + 1)]), kld_weight=weight).backward()
        optim.step()
    log_var = log_var_from_squared_error(kl_weight=weight, reduction="mean", event_size=28 * 28)
    model = VAEModel(vae, likelihood="gaussian", latent_dim=LATENT, log_var=log_var)
    inference = IterativeInferenceOptimizer(model, latent_dim=LATENT, num_steps=2, hidden_size=32, init="encoder")
    optim = torch.optim.Adam([*vae.parameters(), *inference.parameters()], lr=1e-3)
    norms = _batch_norms(vae)
    tracked = [int(m.num_batches_tracked) for m in norms]
    for step in range(2):  # then jointly, still in training mode
        optim.zero_grad()
        result = inference(x[8 * step:8 * (step + 1)])
        result.loss.backward()
        optim.step()
        assert torch.isfinite(result.loss) and result.healthy.all()
    assert [int(m.num_batches_tracked) for m in norms] == [n + 2 for n in tracked]
    vae.eval()
    refined = inference.infer(x[:8], num_steps=3)
    assert torch.isfinite(refined.elbo).all()
