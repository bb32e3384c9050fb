"""The paper's pictures drawn from this library's models (Figs. 1, 3, 4 and 11 of Marino et al. 2018).

* ``figures_surface.png`` (Figs. 1, 3): a decoder with a 2-D latent space is trained jointly with an iterative
  inference model (T = 5) on binarized MNIST; a highway encoder is then trained on the fixed decoder. For a few
  test images, the ELBO as a function of the posterior mean μ (log σ² held at the converged E-step's value;
  expected log-likelihood from fixed noise samples, analytic KL) is drawn as contours, with the encoder's
  estimate, the trajectory of an Adam E-step and the trajectory of the iterative model (both from the prior,
  common noise), and the converged E-step's optimum.
* ``figures_reconstructions.png`` (Fig. 4): E[x | z = μ_t] over the iterative model's inference steps, for the
  64-d binarized-MNIST model of ``inference_comparison`` (same settings and checkpoint: trained once if both run).
* ``figures_gradients.png`` (Fig. 11): for that model on test images, the mean norm of the λ-gradient and the mean
  relative ELBO improvement (L_t − L_0) / |L_0| over 16 inference steps (the paper shows RCV1, which is not
  available here).

Usage::

    python benchmarks/figures.py --scale smoke --out /tmp/bench   # functional test (< 1 min)
    python benchmarks/figures.py                                # full: writes benchmarks/results/
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import inference_comparison

from learned_inference.adapters import DecoderModel
from learned_inference.baselines import GradientEStep
from learned_inference.inference import InferenceMethod
from learned_inference.objectives import elbo, prior_moments
from learned_inference.zoo import highway_decoder

NAME = "figures"
SETTINGS: dict[str, dict[str, Any]] = {
    "smoke": {"num_train": 200, "num_test": 20, "epochs": 1, "hidden_size": 32, "batch_size": 50, "lr": 1e-3,
              "train_steps": 5, "examples": 2, "grid": 15, "surface_samples": 4, "trajectory_steps": 5,
              "estep_lr": 0.2, "converged_steps": 30, "reconstruction_steps": (0, 1, 2, 5),
              "gradient_steps": 4},
    "full": {"num_train": 10000, "num_test": 500, "epochs": 5, "hidden_size": 256, "batch_size": 100, "lr": 1e-3,
             "train_steps": 5, "examples": 3, "grid": 80, "surface_samples": 16, "trajectory_steps": 20,
             "estep_lr": 0.2, "converged_steps": 300, "reconstruction_steps": (0, 1, 2, 3, 4, 5, 10, 16),
             "gradient_steps": 16},
}


def trajectory(method: InferenceMethod, x: Tensor, noise: Tensor, steps: int) -> Tensor:
    """μ_t for t = 0..steps, ``[steps + 1, B, D]``, recorded by one run on the given noise."""
    recorded = method.infer(x, num_steps=steps, noise=noise[: steps + 1], record_params=True).trajectory
    assert recorded is not None  # asked for
    return torch.stack([params["loc"] for params in recorded])


@torch.no_grad()
def elbo_surface(model: DecoderModel, x: Tensor, log_var: Tensor, centre: Tensor, *, grid: int, samples: int,
                 span: float, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """ELBO of N(μ, diag(exp(log_var))) over a ``grid`` × ``grid`` square of μ of half-width ``span``."""
    from learned_inference.families import DiagonalGaussian
    from learned_inference.latent_space import LatentSpace

    u = torch.linspace(-span, span, grid)
    gx, gy = torch.meshgrid(centre[0] + u, centre[1] + u, indexing="xy")
    loc = torch.stack([gx.flatten(), gy.flatten()], -1)
    space = LatentSpace(2)
    params = {"loc": loc, "log_var": log_var.expand_as(loc)}
    noise = torch.randn(samples, 1, 2, generator=torch.Generator().manual_seed(seed)).expand(samples, len(loc), 2)
    values = elbo(model, DiagonalGaussian(), params, x.expand(len(loc), -1), noise, space=space,
                  prior=prior_moments(model, space))
    return gx, gy, values.reshape(grid, grid)


def _surface_figure(args: argparse.Namespace, s: dict[str, Any], train: Tensor, test: Tensor) -> tuple[str, dict]:
    torch.manual_seed(args.seed)
    model = DecoderModel(highway_decoder(latent_dim=2, data_dim=784, hidden_size=s["hidden_size"]),
                         likelihood="bernoulli", latent_dim=2)
    iterative = common.make_method(model, kind="iterative", latent_dim=2, hidden_size=s["hidden_size"],
                                   num_steps=s["train_steps"])
    config = {"hidden_size": s["hidden_size"], "latent_dim": 2, "train_steps": s["train_steps"]}
    common.train_model(args, model, iterative, train, label="mnist2d-iterative", config=config, epochs=s["epochs"],
                       batch_size=s["batch_size"], lr=s["lr"])
    for p in model.parameters():
        p.requires_grad_(False)
    encoder = common.make_method(model, kind="encoder-only", latent_dim=2, hidden_size=s["hidden_size"])
    common.train_model(args, model, encoder, train, label="mnist2d-encoder", config={**config, "epochs": s["epochs"]},
                       epochs=s["epochs"], batch_size=s["batch_size"], lr=s["lr"], train_model_parameters=False)
    x = test[: s["examples"]]
    steps = s["trajectory_steps"]
    samples = iterative.num_samples  # the E-step uses the same samples per step, so both follow the same noise
    noise = torch.randn(steps + 1, samples, len(x), 2, generator=torch.Generator().manual_seed(args.seed + 2))
    estep = GradientEStep(model, latent_dim=2, optimizer=torch.optim.Adam, lr=s["estep_lr"], num_samples=samples)
    paths = {"E-step (Adam)": trajectory(estep, x, noise, steps), "iterative": trajectory(iterative, x, noise, steps)}
    encoded = encoder.infer(x, num_steps=0).params["loc"]
    optimum = GradientEStep(model, latent_dim=2, optimizer=torch.optim.Adam, lr=0.05,
                            num_steps=s["converged_steps"]).infer(x).params

    plt = common.pyplot()
    fig, axes = plt.subplots(1, len(x), figsize=(4.2 * len(x), 4))
    final_elbo = {}
    for i, ax in enumerate(axes):
        points = torch.cat([paths["iterative"][:, i], paths["E-step (Adam)"][:, i], encoded[i:i + 1],
                            optimum["loc"][i:i + 1]])
        centre = optimum["loc"][i]
        span = max(1.0, float((points - centre).abs().max()) * 1.15)
        gx, gy, surface = elbo_surface(model, x[i:i + 1], optimum["log_var"][i], centre, grid=s["grid"],
                                       samples=s["surface_samples"], span=span, seed=args.seed + 3)
        top = surface.max().item()
        levels = [top - d for d in (256, 128, 64, 32, 16, 8, 4, 2, 1, 0.5)] + [top + 1e-3]
        ax.contourf(gx.numpy(), gy.numpy(), surface.clamp(min=top - 256).numpy(), levels=levels, cmap="viridis")
        for (name, path), colour in zip(paths.items(), ("white", "red"), strict=True):
            ax.plot(path[:, i, 0].numpy(), path[:, i, 1].numpy(), "o-", color=colour, markersize=3, label=name)
        ax.plot(*encoded[i].tolist(), "s", color="orange", markersize=8, label="encoder")
        ax.plot(*optimum["loc"][i].tolist(), "*", color="black", markersize=12, label="optimum")
        ax.set(xlabel="μ₁", ylabel="μ₂", title=f"test image {i}")
        final_elbo[str(i)] = {"max_on_grid": top}
    axes[0].legend(fontsize=7, loc="lower left")
    return common.save_figure(args, fig, "surface"), final_elbo


def _mnist64_figures(args: argparse.Namespace, test: Tensor, s: dict[str, Any]) -> tuple[list[str], dict]:
    settings = inference_comparison.SETTINGS[args.scale]
    train, _ = common.load_mnist_subsets(args, num_train=settings["num_train"], num_test=1)
    model, iterative, _ = inference_comparison.trained_iterative_mnist(args, settings, train)
    latent = settings["latent_dim"]
    plt = common.pyplot()
    steps = s["reconstruction_steps"]
    x = test[:8]
    noise = torch.randn(max(steps) + 1, iterative.num_samples, len(x), latent,
                        generator=torch.Generator().manual_seed(args.seed + 4))
    with torch.no_grad():
        means = [model.likelihood_mean(iterative.infer(x, num_steps=t, noise=noise[: t + 1]).params["loc"])
                 for t in steps]
    fig, axes = plt.subplots(len(x), len(steps) + 1, figsize=(0.9 * (len(steps) + 1), 0.9 * len(x)))
    for i in range(len(x)):
        for j, image in enumerate([*(m[i] for m in means), x[i]]):
            axes[i, j].imshow(image.reshape(28, 28).numpy(), cmap="gray", vmin=0, vmax=1)
            axes[i, j].axis("off")
    for j, label in enumerate([*(f"t={t}" for t in steps), "data"]):
        axes[0, j].set_title(label, fontsize=7)
    files = [common.save_figure(args, fig, "reconstructions")]

    torch.manual_seed(args.seed + 5)
    run = iterative.infer(test, num_steps=s["gradient_steps"])
    grad_norm = run.grad_norm.mean(1)
    relative = ((run.elbo - run.elbo[0]) / run.elbo[0].abs()).mean(1)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8, 3.2))
    ax1.plot(grad_norm.tolist(), "o-")
    ax1.set(xlabel="inference step", ylabel="mean ‖∇λ L‖", title="gradient magnitude", yscale="log")
    ax2.plot((100 * relative).tolist(), "o-")
    ax2.set(xlabel="inference step", ylabel="relative ELBO improvement (%)", title="(L_t - L_0) / |L_0|")
    files.append(common.save_figure(args, fig, "gradients"))
    return files, {"gradient_norm": grad_norm.tolist(), "relative_improvement": relative.tolist(),
                   "model_settings": settings}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Draws the figures (see the module docstring); returns the JSON content."""
    args = common.parse_args(NAME, __doc__.splitlines()[0], argv=argv)
    started = common.setup(args)
    s = SETTINGS[args.scale]
    train, test = common.load_mnist_subsets(args, num_train=s["num_train"], num_test=s["num_test"])
    surface_file, surface = _surface_figure(args, s, train, test)
    files, numbers = _mnist64_figures(args, test, s)
    result = {"settings": {k: v for k, v in s.items()}, "files": [surface_file, *files], "surface": surface,
              **numbers, "final_relative_improvement": numbers["relative_improvement"][-1]}
    body = [
        f"Surface (Figs. 1, 3): 2-D latent decoder ({s['hidden_size']} units) and iterative model (T = "
        f"{s['train_steps']}) trained jointly for {s['epochs']} epochs on the first {s['num_train']} training "
        f"images, encoder then trained on the fixed decoder; ELBO over μ from {s['surface_samples']} fixed noise "
        f"samples with log σ² at the converged E-step's value; {s['trajectory_steps']} steps of Adam (lr "
        f"{s['estep_lr']}) and of the iterative model from the prior.",
        "",
        "Reconstructions (Fig. 4) and gradient magnitudes / relative ELBO improvement (Fig. 11, on binarized "
        "MNIST rather than RCV1): the 64-d model of `inference_comparison` "
        f"({numbers['model_settings']['num_train']} images, {numbers['model_settings']['epochs']} epochs). Mean "
        f"relative improvement after {s['gradient_steps']} steps: {100 * result['final_relative_improvement']:.1f}%.",
    ]
    common.write_results(args, result, title="Figures from the paper, redrawn", body=body, started=started,
                         plots=result["files"])
    return result


if __name__ == "__main__":
    main()
