"""VAEs from other libraries wrap in at most 3 lines, as ``docs/recipes.md`` documents (issue 16).

The recipes page needs pythae and a clone of AntixK's PyTorch-VAE, so ``tests/test_docs.py`` skips it. Here its
python blocks run, verbatim and in order, against stand-ins registered as the modules ``pythae.models`` and
``models``: small networks with the same constructor signatures, method signatures and return types (pythae's
``ModelOutput`` objects; PyTorch-VAE's ``[mu, log_var]`` lists, ``Tanh`` images and ``mse + kld_weight · KLD`` loss),
batch norm included. The tests also check that the wrapped models compute what the original libraries'
losses mean.
"""

from __future__ import annotations

import ast
import re
import sys
import types
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from learned_inference import IterativeInferenceOptimizer, VAEModel
from learned_inference.likelihoods import log_var_from_squared_error

PAGE = Path(__file__).resolve().parents[1] / "docs" / "recipes.md"


# ---- stand-ins -------------------------------------------------------------------------------------------------

class ModelOutput(OrderedDict):
    """pythae's ``ModelOutput``: an ordered dict whose entries are also attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class VAEConfig:
    """pythae's ``VAEConfig`` (the fields the recipe uses)."""

    def __init__(self, input_dim=None, latent_dim=10, reconstruction_loss="mse"):
        self.input_dim, self.latent_dim, self.reconstruction_loss = input_dim, latent_dim, reconstruction_loss


class _PythaeEncoder(nn.Module):
    def __init__(self, config, hidden=32):
        super().__init__()
        size = int(torch.tensor(config.input_dim).prod())
        self.layers = nn.Sequential(nn.Linear(size, hidden), nn.BatchNorm1d(hidden), nn.ReLU())
        self.embedding = nn.Linear(hidden, config.latent_dim)
        self.log_var = nn.Linear(hidden, config.latent_dim)

    def forward(self, x):
        h = self.layers(x.reshape(x.shape[0], -1))
        return ModelOutput(embedding=self.embedding(h), log_covariance=self.log_var(h))


class _PythaeDecoder(nn.Module):
    def __init__(self, config, hidden=32):
        super().__init__()
        self.input_dim = config.input_dim
        size = int(torch.tensor(config.input_dim).prod())
        self.layers = nn.Sequential(nn.Linear(config.latent_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                                    nn.Linear(hidden, size), nn.Sigmoid())

    def forward(self, z):
        return ModelOutput(reconstruction=self.layers(z).reshape((z.shape[0], *self.input_dim)))


class VAE(nn.Module):
    """pythae's ``VAE``: ``encoder``/``decoder`` submodules returning ``ModelOutput``; no encode/decode methods."""

    def __init__(self, model_config, encoder=None, decoder=None):
        super().__init__()
        self.model_config, self.latent_dim = model_config, model_config.latent_dim
        self.encoder = encoder or _PythaeEncoder(model_config)
        self.decoder = decoder or _PythaeDecoder(model_config)

    def forward(self, inputs, **kwargs):
        x = inputs["data"]
        out = self.encoder(x)
        mu, log_var = out.embedding, out.log_covariance
        z = mu + torch.exp(0.5 * log_var) * torch.randn_like(mu)
        recon_x = self.decoder(z)["reconstruction"]
        loss, recon_loss, kld = self.loss_function(recon_x, x, mu, log_var)
        return ModelOutput(recon_loss=recon_loss, reg_loss=kld, loss=loss, recon_x=recon_x, z=z)

    def loss_function(self, recon_x, x, mu, log_var):
        """pythae's VAE loss: per example ½·Σ squared error ("mse") or Σ BCE ("bce"), plus the KL; batch mean."""
        flat_recon, flat_x = recon_x.reshape(x.shape[0], -1), x.reshape(x.shape[0], -1)
        if self.model_config.reconstruction_loss == "mse":
            recon = 0.5 * F.mse_loss(flat_recon, flat_x, reduction="none").sum(dim=-1)
        else:
            recon = F.binary_cross_entropy(flat_recon, flat_x, reduction="none").sum(dim=-1)
        kld = -0.5 * torch.sum(1 + log_var - mu.pow(2) - log_var.exp(), dim=-1)
        return (recon + kld).mean(dim=0), recon.mean(dim=0), kld.mean(dim=0)


class VanillaVAE(nn.Module):
    """AntixK's ``VanillaVAE``: conv encoder with batch norm, ``encode -> [mu, log_var]``, ``decode -> Tanh``."""

    def __init__(self, in_channels, latent_dim, hidden_dims=None, **kwargs):
        super().__init__()
        self.latent_dim = latent_dim
        channels = hidden_dims or [8, 8]
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, channels[0], 4, stride=4), nn.BatchNorm2d(channels[0]), nn.LeakyReLU(),
            nn.Conv2d(channels[0], channels[1], 4, stride=4), nn.BatchNorm2d(channels[1]), nn.LeakyReLU(),
        )
        self.fc_mu = nn.Linear(channels[1] * 16, latent_dim)
        self.fc_var = nn.Linear(channels[1] * 16, latent_dim)
        self.decoder_input = nn.Linear(latent_dim, channels[1] * 16)
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(channels[1], channels[0], 4, stride=4), nn.BatchNorm2d(channels[0]), nn.LeakyReLU(),
            nn.ConvTranspose2d(channels[0], in_channels, 4, stride=4), nn.Tanh(),
        )
        self.channels = channels

    def encode(self, input):
        result = torch.flatten(self.encoder(input), start_dim=1)
        return [self.fc_mu(result), self.fc_var(result)]

    def decode(self, z):
        return self.decoder(self.decoder_input(z).view(-1, self.channels[1], 4, 4))

    def reparameterize(self, mu, logvar):
        return torch.randn_like(mu) * torch.exp(0.5 * logvar) + mu

    def forward(self, input, **kwargs):
        mu, log_var = self.encode(input)
        return [self.decode(self.reparameterize(mu, log_var)), input, mu, log_var]

    def loss_function(self, *args, **kwargs):
        recons, input, mu, log_var = args[:4]
        kld_weight = kwargs["M_N"]
        recons_loss = F.mse_loss(recons, input)
        kld_loss = torch.mean(-0.5 * torch.sum(1 + log_var - mu ** 2 - log_var.exp(), dim=1), dim=0)
        loss = recons_loss + kld_weight * kld_loss
        return {"loss": loss, "Reconstruction_Loss": recons_loss.detach(), "KLD": -kld_loss.detach()}


@pytest.fixture
def stand_ins(monkeypatch):
    """``pythae.models`` and ``models`` (AntixK's package) as the recipes import them."""
    pythae, pythae_models, antixk = (types.ModuleType(n) for n in ("pythae", "pythae.models", "models"))
    pythae_models.VAE, pythae_models.VAEConfig = VAE, VAEConfig
    pythae.models = pythae_models
    antixk.VanillaVAE = VanillaVAE
    for name, module in (("pythae", pythae), ("pythae.models", pythae_models), ("models", antixk)):
        monkeypatch.setitem(sys.modules, name, module)


# ---- the recipes page ------------------------------------------------------------------------------------------

def _sections() -> dict[str, list[str]]:
    """The python blocks of each ``## `` section of the recipes page, in order."""
    sections: dict[str, list[str]] = {}
    for part in re.split(r"^## ", PAGE.read_text(encoding="utf-8"), flags=re.MULTILINE)[1:]:
        title = part.splitlines()[0].strip()
        sections[title] = re.findall(r"^```python\n(.*?)^```", part, flags=re.MULTILINE | re.DOTALL)
    return sections


RECIPES = {"pythae": "pythae", "AntixK's PyTorch-VAE": "antixk"}
JOINT = "Training a VAE with batch norm jointly"


def test_the_page_has_a_recipe_per_library():
    assert set(_sections()) == {*RECIPES, JOINT}
    assert all(len(_sections()[title]) == 3 for title in RECIPES)  # the model, the wrap, using it


@pytest.mark.parametrize("title", list(RECIPES), ids=list(RECIPES.values()))
def test_the_wrap_is_at_most_three_lines(title):
    wrap = _sections()[title][1]
    statements = [node for node in ast.parse(wrap).body if not isinstance(node, ast.Import | ast.ImportFrom)]
    lines = sum(node.end_lineno - node.lineno + 1 for node in statements)
    assert lines <= 3, wrap
    assert any("VAEModel(" in ast.unparse(node) for node in statements)


@pytest.mark.parametrize("title", list(RECIPES), ids=list(RECIPES.values()))
def test_the_recipe_runs_as_documented(title, stand_ins):
    torch.manual_seed(0)
    namespace: dict = {}
    for number, block in enumerate(_sections()[title], 1):
        exec(compile(block, f"{PAGE}:{title}:block {number}", "exec"), namespace)
    result, x = namespace["result"], namespace["x"]
    assert result.elbo.shape == (6, x.shape[0]) and torch.isfinite(result.elbo).all()
    assert not namespace["vae"].training  # the recipe put it in eval mode


@pytest.mark.parametrize("title", list(RECIPES), ids=list(RECIPES.values()))
def test_without_eval_the_batch_norm_is_named(title, stand_ins):
    """The recipes' ``vae.eval()`` matters: in training mode the first call names the batch norm and the fix."""
    namespace: dict = {}
    exec(compile(_sections()[title][0], str(PAGE), "exec"), namespace)
    vae = namespace["vae"]
    options = ({"likelihood": "bernoulli-probs", "latent_dim": 16, "encode": vae.encoder, "decode": vae.decoder}
               if title == "pythae" else {"likelihood": "gaussian", "latent_dim": 128})
    model = VAEModel(vae, **options)
    named = r"model.vae.decoder.(layers.)?\d+ \(BatchNorm\dd\) is in training mode.*model.eval"
    with pytest.raises(ValueError, match=named):
        IterativeInferenceOptimizer(model, latent_dim=options["latent_dim"], hidden_size=8).infer(namespace["x"])


def test_the_joint_training_recipe_runs_against_the_real_pythae():
    """The batch-norm recipe, verbatim, with pythae itself: it trains in training mode, moves each batch norm's
    running statistics once per training step, and infers in eval mode."""
    pytest.importorskip("pythae.models.nn.benchmarks.mnist")
    torch.manual_seed(0)
    namespace: dict = {}
    blocks = _sections()[JOINT]
    exec(compile(blocks[0], f"{PAGE}:{JOINT}:block 1", "exec"), namespace)
    norms = [m for m in namespace["vae"].modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms
    for number, block in enumerate(blocks[1:], 2):
        exec(compile(block, f"{PAGE}:{JOINT}:block {number}", "exec"), namespace)
    assert all(int(m.num_batches_tracked) == len(namespace["loader"]) for m in norms)
    result = namespace["result"]
    assert torch.isfinite(result.elbo).all() and not namespace["vae"].training


# ---- the wrapped models mean what the libraries' losses mean ---------------------------------------------------

def _loss_offset(model, vae, x, loss, scale):
    """scale · (−ELBO at the encoder's λ, with the decoder at z = μ) − the library's loss at z = μ, per example."""
    mu, log_var = vae.encode(x) if hasattr(vae, "encode") else model.encode(x)
    kl = 0.5 * (log_var.exp() + mu.square() - 1 - log_var).sum(-1)
    return scale * (-model.log_likelihood(x, mu) + kl) - loss(mu, log_var)


def test_the_antixk_gaussian_matches_its_training_loss():
    """With σ² from log_var_from_squared_error, −ELBO · kld_weight and the loss differ by one constant."""
    torch.manual_seed(0)
    vae, weight = VanillaVAE(in_channels=3, latent_dim=8).double().eval(), 0.00025
    log_var = log_var_from_squared_error(kl_weight=weight, reduction="mean", event_size=3 * 64 * 64)
    model = VAEModel(vae, likelihood="gaussian", latent_dim=8, log_var=log_var)
    x = torch.rand(5, 3, 64, 64, dtype=torch.float64)

    def loss(mu, log_var):  # per example: the library's loss_function on one example at a time, z = μ
        return torch.stack([vae.loss_function(vae.decode(mu[i:i + 1]), x[i:i + 1], mu[i:i + 1], log_var[i:i + 1],
                                              M_N=weight)["loss"] for i in range(len(x))])

    offset = _loss_offset(model, vae, x, loss, scale=weight)
    torch.testing.assert_close(offset, offset[:1].expand_as(offset))  # the same constant for every example
    wrong = VAEModel(vae, likelihood="gaussian", latent_dim=8, log_var=0.0)  # the variance the mapping replaces
    wrong_offset = _loss_offset(wrong, vae, x, loss, scale=weight)
    assert (wrong_offset - wrong_offset[0]).abs().max() > 1e-6  # the check can fail


def test_the_pythae_mse_gaussian_matches_its_training_loss():
    torch.manual_seed(0)
    vae = VAE(VAEConfig(input_dim=(1, 6, 6), latent_dim=4)).double().eval()
    model = VAEModel(vae, likelihood="gaussian", latent_dim=4, encode=vae.encoder, decode=vae.decoder,
                     log_var=log_var_from_squared_error(error_weight=0.5))
    x = torch.rand(5, 1, 6, 6, dtype=torch.float64)

    def loss(mu, log_var):
        recon = vae.decoder(mu).reconstruction
        return torch.stack([vae.loss_function(recon[i:i + 1], x[i:i + 1], mu[i:i + 1], log_var[i:i + 1])[0]
                            for i in range(len(x))])

    offset = _loss_offset(model, vae, x, loss, scale=1.0)
    torch.testing.assert_close(offset, offset[:1].expand_as(offset))


def test_a_separate_encoder_module_is_registered_once():
    """encode=/decode= modules inside the VAE are not registered twice; others are, so they train and save."""
    vae = VAE(VAEConfig(input_dim=(1, 6, 6), latent_dim=4))
    model = VAEModel(vae, likelihood="bernoulli-probs", latent_dim=4, encode=vae.encoder, decode=vae.decoder)
    assert sorted(model.state_dict()) == sorted(f"vae.{k}" for k in vae.state_dict())
    outside = _PythaeEncoder(VAEConfig(input_dim=(1, 6, 6), latent_dim=4))
    model = VAEModel(vae, likelihood="bernoulli-probs", latent_dim=4, encode=outside, decode=vae.decoder)
    assert {id(p) for p in outside.parameters()} <= {id(p) for p in model.parameters()}
