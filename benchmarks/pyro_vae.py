"""Pyro's classic VAE with ``AutoIterativeNormal`` in place of its hand-written encoder guide.

The model and the encoder guide are those of Pyro's VAE example (``examples/vae/vae.py``: z_dim 50, 400 hidden
units, ``pyro.plate("data")``, sites ``latent`` and ``obs``), with one addition the AutoNormal baseline needs: the
plate can take subsample indices (``pyro.plate("data", size, subsample=idx)``), without which AutoNormal's
per-datapoint parameters would be shared by every mini-batch. The change for AutoIterativeNormal is four lines::

    + from learned_inference.integrations.pyro import AutoIterativeNormal, IterativeTrace_ELBO
    - guide = vae.guide
    + guide = AutoIterativeNormal(vae.model, num_steps=5)
    - svi = SVI(vae.model, vae.guide, optimizer, loss=Trace_ELBO())
    + svi = SVI(vae.model, guide, optimizer, loss=IterativeTrace_ELBO())

Protocol (small, for a shared 2-core CPU): binarized MNIST (``/work/shared/data/binarized_mnist.npz``), the
first 5,000 training and first 1,000 test images, batch 100, Adam 1e-3, the same number of epochs for every
guide. Test ELBO per image = −``Trace_ELBO(num_particles=10).loss`` / N on the test images with the decoder and
guide frozen. The encoder and the iterative guide infer the test images directly (amortized); AutoNormal cannot,
so its test-set parameters are fitted afterwards by SVI on the test images for the same number of epochs with the
decoder frozen (its test ELBO therefore includes that extra optimisation).

Run: ``python benchmarks/pyro_vae.py [--epochs 5]``; writes ``benchmarks/results/pyro_vae.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from torch import nn

from learned_inference.integrations.pyro import AutoIterativeNormal, IterativeTrace_ELBO

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

DATA = Path("/work/shared/data/binarized_mnist.npz")
RESULTS = Path(__file__).parent / "results"


class Decoder(nn.Module):
    def __init__(self, z_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1, self.fc21 = nn.Linear(z_dim, hidden_dim), nn.Linear(hidden_dim, 784)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc21(nn.functional.softplus(self.fc1(z))))


class Encoder(nn.Module):
    def __init__(self, z_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, hidden_dim)
        self.fc21, self.fc22 = nn.Linear(hidden_dim, z_dim), nn.Linear(hidden_dim, z_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = nn.functional.softplus(self.fc1(x.reshape(-1, 784)))
        return self.fc21(hidden), torch.exp(self.fc22(hidden))


class VAE(nn.Module):
    """Pyro's example VAE (model and encoder guide), with optional subsample indices for the data plate."""

    def __init__(self, z_dim: int = 50, hidden_dim: int = 400) -> None:
        super().__init__()
        self.encoder, self.decoder, self.z_dim = Encoder(z_dim, hidden_dim), Decoder(z_dim, hidden_dim), z_dim

    def model(self, x: torch.Tensor, idx: torch.Tensor | None = None, size: int | None = None) -> None:
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", size or x.shape[0], subsample=idx):
            z_loc = x.new_zeros(torch.Size((x.shape[0], self.z_dim)))
            z_scale = x.new_ones(torch.Size((x.shape[0], self.z_dim)))
            z = pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))
            loc_img = self.decoder(z)
            pyro.sample("obs", dist.Bernoulli(loc_img, validate_args=False).to_event(1), obs=x.reshape(-1, 784))

    def guide(self, x: torch.Tensor, idx: torch.Tensor | None = None, size: int | None = None) -> None:
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", size or x.shape[0], subsample=idx):
            z_loc, z_scale = self.encoder(x)
            pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))


def load(n_train: int, n_test: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = np.load(DATA)
    unpack = lambda a, n: torch.from_numpy(np.unpackbits(a[:n], axis=1)[:, :784].astype(np.float32))  # noqa: E731
    return unpack(data["train"], n_train), unpack(data["test"], n_test)


def batches(n: int, size: int, generator: torch.Generator) -> list[torch.Tensor]:
    return list(torch.randperm(n, generator=generator).split(size))


def fit(svi: SVI, x: torch.Tensor, *, epochs: int, batch: int, seed: int, indexed: bool) -> float:
    """Epochs of SVI over x; with ``indexed`` the model gets the subsample indices and the full size."""
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(epochs):
        for idx in batches(len(x), batch, generator):
            svi.step(x[idx], idx, len(x)) if indexed else svi.step(x[idx])
    return time.perf_counter() - start


@torch.no_grad()
def test_elbo(model, guide, x: torch.Tensor, *, indexed: bool) -> float:
    """Mean per-image ELBO on x (10 particles), in nats."""
    elbo = Trace_ELBO(num_particles=10)
    total = 0.0
    for idx in torch.arange(len(x)).split(250):
        args = (x[idx], idx, len(x)) if indexed else (x[idx],)
        total -= elbo.loss(model, guide, *args) * (len(idx) / len(x) if indexed else 1.0)  # undo N/b scaling
    return total / len(x)


def data_plate(x: torch.Tensor, idx: torch.Tensor, size: int) -> pyro.plate:
    """The subsampled data plate, for AutoNormal (its guide must use the model's indices)."""
    return pyro.plate("data", size, subsample=idx)


def frozen_decoder_adam(lr: float) -> pyro.optim.PyroOptim:
    return pyro.optim.Adam(lambda name: {"lr": 0.0 if name.startswith("decoder") else lr})


def run(args: argparse.Namespace) -> dict:
    x_train, x_test = load(args.train, args.test)
    results = {}
    for name in ("encoder", "iterative", "autonormal"):
        pyro.clear_param_store()
        pyro.set_rng_seed(args.seed)
        vae = VAE()
        indexed = name == "autonormal"
        if name == "encoder":
            guide, loss = vae.guide, Trace_ELBO()
        elif name == "iterative":
            guide, loss = AutoIterativeNormal(vae.model, num_steps=args.steps), IterativeTrace_ELBO()
        else:
            guide, loss = AutoNormal(vae.model, create_plates=data_plate), Trace_ELBO()
        svi = SVI(vae.model, guide, pyro.optim.Adam({"lr": args.lr}), loss)
        seconds = fit(svi, x_train, epochs=args.epochs, batch=args.batch, seed=args.seed, indexed=indexed)
        train_elbo = test_elbo(vae.model, guide, x_train[: args.test], indexed=False) if not indexed else None
        if indexed:  # AutoNormal cannot infer new data: fit its test-set parameters, decoder frozen
            store = pyro.get_param_store()
            for param in [name for name in store if name.startswith("AutoNormal.")]:
                del store[param]  # the training set's parameters; the decoder stays
            test_guide = AutoNormal(vae.model, create_plates=data_plate)
            refit = SVI(vae.model, test_guide, frozen_decoder_adam(args.lr), Trace_ELBO())
            seconds += fit(refit, x_test, epochs=args.epochs, batch=args.batch, seed=args.seed, indexed=True)
            value = test_elbo(vae.model, test_guide, x_test, indexed=True)
        else:
            value = test_elbo(vae.model, guide, x_test, indexed=False)
        results[name] = {"test_elbo": value, "train_subset_elbo": train_elbo, "seconds": seconds}
        print(f"{name:>10}: test ELBO {value:9.2f} nats/image  ({seconds:.0f} s)", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--train", type=int, default=5000)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--steps", type=int, default=5, help="refinement steps of AutoIterativeNormal")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu", help="torch's default device for the run, e.g. cuda (default cpu)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.device != "cpu":
        torch.set_default_device(args.device)
    results = run(args)
    record = {
        "command": "python benchmarks/pyro_vae.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
        "settings": vars(args),
        "scale": f"{args.epochs} epochs on the first {args.train} training and {args.test} test images of binarized "
                 "MNIST",
        **common.provenance(),
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "pyro": pyro.__version__,
                    "processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "note": "seconds are wall-clock on a shared, loaded 2-core machine: indicative only",
        "results": results,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "pyro_vae.json").write_text(json.dumps(record, indent=2) + "\n")
    rows = "\n".join(
        f"| {name} | {r['test_elbo']:.2f} | {r['seconds']:.0f} |" for name, r in results.items()
    )
    (RESULTS / "pyro_vae.md").write_text(
        f"# Pyro VAE: AutoIterativeNormal vs the encoder guide vs AutoNormal\n\n`{record['command']}`\n\n"
        f"{args.train} train / {args.test} test binarized-MNIST images, {args.epochs} epochs each, batch "
        f"{args.batch}, Adam {args.lr}. Test ELBO in nats per image (10 particles, higher is better). AutoNormal "
        "cannot amortize: its test-set parameters were fitted by SVI on the test images for the same number of "
        "epochs, decoder frozen (included in its time).\n\n| guide | test ELBO | seconds (shared CPU) |\n"
        f"| --- | ---: | ---: |\n{rows}\n\nMachine: {record['machine']}. {record['note']}.\n"
    )


if __name__ == "__main__":
    main()
