"""The first-run experiment: a standard VAE against an iterative-inference VAE with the same decoder.

Both models get the same decoder architecture, optimizer, data order and number of epochs. The standard VAE
infers with one encoder pass; the iterative one refines λ from the prior with a learned optimizer for
``num_steps`` steps (no encoder). Afterwards, on held-out data: the ELBO (many samples), the importance-weighted
−log p(x), the time per epoch, the iterative model's ELBO over inference steps against Adam and SGD E-steps on the
same decoder, and reconstructions over the steps. :func:`run_demo` writes ``report.md``, ``results.json`` and
plots (with matplotlib) to a folder.

Example:
    >>> import tempfile
    >>> from learned_inference.data import load_digits
    >>> summary = run_demo(load_digits(), epochs=1, report_dir=tempfile.mkdtemp(), progress=False,
    ...                    hidden_size=16, latent_dim=4, eval_samples=10, plots=False, log=lambda line: None)
    >>> sorted(summary["models"])
    ['iterative', 'standard']
"""

from __future__ import annotations

import json
import math
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from learned_inference.adapters import DecoderModel
from learned_inference.baselines import GradientEStep, StandardEncoder
from learned_inference.data import Splits
from learned_inference.evaluation import elbo_estimate, importance_weighted_log_marginal
from learned_inference.inference import InferenceMethod
from learned_inference.optimizer import IterativeInferenceOptimizer
from learned_inference.training import fit
from learned_inference.zoo import bernoulli_vae, highway_decoder

__all__ = ["run_demo"]


def _evaluate(model: DecoderModel, method: InferenceMethod, x: Tensor, *, num_steps: int, samples: int) -> dict:
    posterior = method.infer(x, num_steps=num_steps).posterior
    chunk = min(samples, 100)
    return {
        "test_elbo": elbo_estimate(model, posterior, x, num_samples=samples, chunk_size=chunk).mean().item(),
        "test_nll": -importance_weighted_log_marginal(model, posterior, x, num_samples=samples,
                                                      chunk_size=chunk).mean().item(),
    }


def _step_curves(model: DecoderModel, inference: IterativeInferenceOptimizer, x: Tensor, steps: int) -> dict:
    """Mean test ELBO after each step: the learned optimizer and E-steps (best learning rate of a small grid)."""
    trajectory = inference.infer(x, num_steps=steps, record_params=True).trajectory
    assert trajectory is not None  # asked for
    family = inference.family
    curves = {"iterative": [elbo_estimate(model, family.distribution(params), x, num_samples=1).mean().item()
                            for params in inference.estimates(trajectory)]}  # what a run of t steps returns
    for name, optimizer, rates in (("adam", torch.optim.Adam, (0.3, 0.1, 0.03)),
                                   ("sgd", torch.optim.SGD, (0.3, 0.1, 0.03))):
        runs = {lr: GradientEStep(model, latent_dim=inference.space.total_dim, optimizer=optimizer, lr=lr,
                                  num_steps=steps).infer(x).elbo.mean(1) for lr in rates}
        best = max(runs, key=lambda lr: runs[lr][-1].item())
        curves[f"{name} (lr {best})"] = runs[best].tolist()
    return curves


def _reconstructions(model: DecoderModel, inference: IterativeInferenceOptimizer, x: Tensor, steps: int) -> Tensor:
    """E[x | z = μ_t] for t = 0..steps, ``[steps + 1, N, D]``, from one run's recorded trajectory."""
    trajectory = inference.infer(x, num_steps=steps, record_params=True).trajectory
    assert trajectory is not None  # asked for
    with torch.no_grad():
        return torch.stack([model.likelihood_mean(params["loc"]) for params in trajectory])


def _plot(report: Path, summary: dict, reconstructions: Tensor, x: Tensor) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, curve in summary["inference_curves"].items():
        ax.plot(range(len(curve)), curve, label=name)
    ax.axhline(summary["models"]["standard"]["test_elbo"], color="grey", linestyle="--", label="standard encoder")
    ax.set(xlabel="inference step", ylabel="test ELBO (nats)", title="ELBO over inference steps")
    low = min(min(curve[2:] or curve) for curve in summary["inference_curves"].values())
    ax.set_ylim(bottom=min(low, summary["models"]["standard"]["test_elbo"]) - 5)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(report / "elbo_over_steps.png", dpi=120)
    files.append("elbo_over_steps.png")

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, curves in summary["learning_curves"].items():
        ax.plot(range(1, len(curves["train_elbo"]) + 1), curves["train_elbo"], label=name)
    ax.set(xlabel="epoch", ylabel="train ELBO (nats)", title="Learning curves")
    ax.legend()
    fig.tight_layout()
    fig.savefig(report / "learning_curves.png", dpi=120)
    files.append("learning_curves.png")

    side = math.isqrt(x.shape[1])
    if side * side == x.shape[1]:
        steps, n = reconstructions.shape[0], reconstructions.shape[1]
        fig, axes = plt.subplots(n, steps + 1, figsize=(1.1 * (steps + 1), 1.1 * n))
        for i in range(n):
            axes[i, 0].imshow(x[i].reshape(side, side).numpy(), cmap="gray")
            for t in range(steps):
                axes[i, t + 1].imshow(reconstructions[t, i].reshape(side, side).numpy(), cmap="gray", vmin=0, vmax=1)
        for t, a in enumerate(axes[0]):
            a.set_title("data" if t == 0 else f"t={t - 1}", fontsize=7)
        for a in axes.flat:
            a.axis("off")
        fig.tight_layout()
        fig.savefig(report / "reconstructions.png", dpi=120)
        files.append("reconstructions.png")
    plt.close("all")
    return files


def _markdown(summary: dict, plots: list[str]) -> str:
    models = summary["models"]
    lines = [
        "# learned-inference demo",
        "",
        f"Data: {summary['data']} ({summary['num_train']} train / {summary['num_test']} test). "
        f"{summary['epochs']} epochs each, same decoder, Adam lr {summary['lr']}, seed {summary['seed']}. "
        f"Held-out metrics with {summary['eval_samples']} importance samples. Command: `{summary['command']}`.",
        "",
        "| model | test ELBO | test -log p(x) | s / epoch | inference steps |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, m in models.items():
        lines.append(f"| {name} | {m['test_elbo']:.3f} | {m['test_nll']:.3f} | {m['seconds_per_epoch']:.3f} | "
                     f"{m['inference_steps']} |")
    lines += ["", f"Iterative ahead on ELBO by {summary['elbo_gain']:.3f} nats and on -log p(x) by "
              f"{summary['nll_gain']:.3f} nats.", ""]
    lines += [f"![{p}]({p})" for p in plots]
    lines += ["", f"Machine: {summary['machine']}; torch {summary['torch']}.", ""]
    return "\n".join(lines)


def run_demo(
    data: Splits,
    *,
    data_name: str = "binarized digits (scikit-learn)",
    epochs: int = 100,
    num_steps: int = 5,
    latent_dim: int = 8,
    hidden_size: int = 64,
    batch_size: int = 100,
    lr: float = 1e-3,
    seed: int = 0,
    eval_samples: int = 1000,
    curve_steps: int = 20,
    report_dir: str | Path = "demo-report",
    progress: bool = True,
    plots: bool = True,
    command: str = "learned-inference demo",
    transform: Callable[..., Tensor] | None = None,
    log: Callable[[str], None] = print,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Trains both models, evaluates them on ``data.test`` and writes the report; returns the summary.

    Args:
        data: train and test splits (binary data for the Bernoulli models).
        data_name: how the report names the data.
        epochs: training epochs of each model.
        num_steps: the iterative model's inference steps T (training and test).
        latent_dim: the size of z.
        hidden_size: units per hidden layer (decoder, encoder and update network).
        batch_size: training batch size.
        lr: Adam's learning rate.
        seed: seeds initialisation, data order and evaluation noise.
        eval_samples: importance samples k for the test ELBO and −log p(x).
        curve_steps: steps of the ELBO-over-steps comparison with E-steps.
        report_dir: the folder for ``report.md``, ``results.json`` and plots.
        progress: show progress bars.
        plots: draw plots (needs matplotlib).
        command: the command line recorded in the report.
        transform: applied to every training batch (e.g. :func:`~learned_inference.data.binarize`).
        log: where the summary table goes.
        device: where the models train and the test data is evaluated (e.g. ``"cuda"``); training batches move
            there from ``data.train`` as :func:`~learned_inference.training.fit` moves them.
    """
    data_dim = data.train.shape[1]
    report = Path(report_dir)
    report.mkdir(parents=True, exist_ok=True)

    device = torch.device(device)
    test = data.test.to(device)
    torch.manual_seed(seed)
    standard_model = bernoulli_vae(data_dim=data_dim, latent_dim=latent_dim, hidden_size=hidden_size).to(device)
    standard = StandardEncoder(standard_model, latent_dim=latent_dim).to(device)
    standard.infer(test[:2])  # sizes the encoder's lazy layer before the optimizer sees it
    torch.manual_seed(seed)
    iterative_model = DecoderModel(highway_decoder(latent_dim=latent_dim, data_dim=data_dim, hidden_size=hidden_size),
                                   likelihood="bernoulli", latent_dim=latent_dim).to(device)
    iterative = IterativeInferenceOptimizer(iterative_model, latent_dim=latent_dim, num_steps=num_steps,
                                            hidden_size=hidden_size).to(device)
    runs = {"standard": (standard_model, standard), "iterative": (iterative_model, iterative)}
    summary: dict[str, Any] = {
        "data": data_name, "num_train": len(data.train), "num_test": len(data.test), "epochs": epochs, "lr": lr,
        "seed": seed, "eval_samples": eval_samples, "command": command, "models": {}, "learning_curves": {},
        "machine": f"{platform.platform()}, {torch.get_num_threads()} threads", "torch": torch.__version__,
    }
    for name, (model, method) in runs.items():
        history = fit(method, data.train, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, progress=progress,
                      label=name, transform=transform, device=device)  # Adam over the model's and the method's
        steps = num_steps if name == "iterative" else 0
        torch.manual_seed(seed + 1)
        metrics = _evaluate(model, method, test, num_steps=steps, samples=eval_samples)
        metrics.update(seconds_per_epoch=sum(history.seconds) / epochs, inference_steps=steps)
        summary["models"][name] = metrics
        summary["learning_curves"][name] = {"train_elbo": history.train_elbo, "seconds": history.seconds}
    models = summary["models"]
    summary["elbo_gain"] = models["iterative"]["test_elbo"] - models["standard"]["test_elbo"]
    summary["nll_gain"] = models["standard"]["test_nll"] - models["iterative"]["test_nll"]
    torch.manual_seed(seed + 2)
    summary["inference_curves"] = _step_curves(iterative_model, iterative, test, curve_steps)
    shown = test[:6]
    files = []
    if plots:
        reconstructions = _reconstructions(iterative_model, iterative, shown, num_steps)
        files = _plot(report, summary, reconstructions.cpu(), shown.cpu())
    (report / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    (report / "report.md").write_text(_markdown(summary, files))
    log(_table(summary))
    log(f"report written to {report.resolve()}")
    return summary


def _table(summary: dict) -> str:
    rows = [f"{'model':<10} {'test ELBO':>10} {'-log p(x)':>10} {'s/epoch':>8} {'steps':>6}"]
    for name, m in summary["models"].items():
        rows.append(f"{name:<10} {m['test_elbo']:>10.3f} {m['test_nll']:>10.3f} {m['seconds_per_epoch']:>8.3f} "
                    f"{m['inference_steps']:>6}")
    return "\n".join(rows)
