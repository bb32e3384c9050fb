"""The inference gaps of the frozen VAE of ``frozen_refinement``: approximation and amortization gap of each method
against an AIS estimate of log p(x) (Cremer, Li & Duvenaud 2018), and the importance samples each method's posterior
needs to reach the encoder's IWAE-5000 bound.

The VAE is the one ``benchmarks/frozen_refinement.py`` trains and caches under ``--checkpoint-dir`` (the paper's
784-512-512-64 Bernoulli VAE, trained as a standard VAE for ``--vae-epochs`` epochs on all training images, then
frozen), and so is the learned optimizer (the library's defaults, ``init="encoder"``, trained on top of the frozen
VAE within half the VAE's training time); a run of either script reuses what the other trained. Rows, all on the
same frozen decoder:

* ``standard encoder``: the VAE's own encoder;
* ``E-step (diagonal)``: ``--estep-steps`` Adam steps from the encoder, the lr of ``--estep-lrs`` with the best
  mean ELBO on the validation images (binarized MNIST's validation split; Fashion-MNIST's last 100 training
  images, binarized once);
* ``E-step (mixture K=5)``: the same in the family of ``GaussianMixture(5)``, started at the encoder's λ (each
  component at the encoder's mean plus a fixed offset of one encoder standard deviation, equal weights);
* ``learned optimizer (diagonal)``: ``--learned-steps`` learned steps from the encoder;
* ``RME (K=5)``: a :class:`~learned_inference.RecursiveMixtureEncoder` (C = ``--rme-barrier``) trained on top of
  the frozen VAE for ``--rme-epochs`` epochs (its own encoders; the decoder does not change);
* ``E-step (low-rank r=2, 8)``, ``learned optimizer (low-rank r=2, 8)``: placeholders for the low-rank family of
  issue 30, which does not exist yet; recorded as pending, not measured.

Per row (on the first ``--test-size`` test images; means with standard errors over images): ELBO
(``--elbo-samples``), IWAE-``--iwae-samples``, the approximation gap (AIS log p(x) − the best ELBO of the row's
family, from Adam E-steps of ``--estep-steps`` steps over ``--estep-lrs`` started at the row's λ) and the
amortization gap (that best ELBO − the row's ELBO), and ``samples_to_bound`` (:func:`~learned_inference.gap_report`).
log p(x): AIS from the encoder's posterior (``--ais-chains`` chains, ``--ais-steps`` sigmoid-scheduled annealing
steps, ``--ais-leapfrog`` leapfrog steps per HMC transition, step sizes adapted toward 0.9 acceptance), its wall-clock
cost recorded; checked against AIS from the prior (``--ais-prior-steps`` steps) on the first ``--ais-prior-check``
images. Each dataset's evaluation is cached under ``--checkpoint-dir``, so a run with several ``--datasets`` resumes
and assembles.

Usage::

    python benchmarks/gap_report.py --threads 1 --data-path ../shared/data --quiet
    python benchmarks/gap_report.py --scale smoke --checkpoint-dir /tmp/smoke     (≈ 1 min; not a measurement)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import frozen_refinement

from learned_inference import (
    GaussianMixture,
    GradientEStep,
    RecursiveMixtureEncoder,
    StandardEncoder,
    annealed_importance_sampling,
    gap_report,
)
from learned_inference.data import binarize, load_binarized_mnist, load_fashion_mnist
from learned_inference.families import Params
from learned_inference.inference import InferenceMethod

LATENT = 64
DATASETS = ("binarized-mnist", "fashion-mnist")
ENCODER = "standard encoder"
#: rows of the low-rank family of issue 30, recorded as pending until ``LowRankGaussian`` exists
PENDING = ("E-step (low-rank r=2)", "E-step (low-rank r=8)", "learned optimizer (low-rank r=2)",
           "learned optimizer (low-rank r=8)")


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument("--vae-epochs", type=int, default=20, help="as frozen_refinement (its cached VAE is reused)")
    parser.add_argument("--test-size", type=int, default=200)
    parser.add_argument("--estep-steps", type=int, default=500)
    parser.add_argument("--estep-lrs", type=float, nargs="+", default=[0.1, 0.03, 0.01, 0.003])
    parser.add_argument("--elbo-samples", type=int, default=1000)
    parser.add_argument("--iwae-samples", type=int, default=5000)
    parser.add_argument("--max-samples", type=int, default=4096, help="largest k of the samples-to-bound search")
    parser.add_argument("--learned-steps", type=int, default=5)
    parser.add_argument("--mixture-components", type=int, default=5)
    parser.add_argument("--rme-barrier", type=float, default=0.3, help="RME's C (chosen by rme_barrier_selection)")
    parser.add_argument("--rme-epochs", type=int, default=10)
    parser.add_argument("--ais-chains", type=int, default=16)
    parser.add_argument("--ais-steps", type=int, default=1000)
    parser.add_argument("--ais-leapfrog", type=int, default=5)
    parser.add_argument("--ais-prior-check", type=int, default=20, help="images checked by AIS from the prior")
    parser.add_argument("--ais-prior-steps", type=int, default=5000)


class Run(nn.Module):
    """A method as :func:`~learned_inference.gap_report` sees it: ``infer(x)`` runs ``num_steps`` steps (default:
    the method's own) from ``start(x)`` (a λ; default: the method's own start); ``family`` is the method's."""

    def __init__(self, method: InferenceMethod, *, num_steps: int | None = None, start: Any = None) -> None:
        super().__init__()
        self.method, self.num_steps, self.start = method, num_steps, start

    @property
    def family(self) -> Any:
        return self.method.family

    def infer(self, x: Tensor) -> Any:
        return self.method.infer(x, num_steps=self.num_steps, init_params=None if self.start is None else self.start(x))


def mixture_from_encoder(encoder: InferenceMethod, family: GaussianMixture) -> Any:
    """x → the mixture λ whose components sit at the encoder's mean plus the family's fixed offsets (unit spread)
    scaled by the encoder's standard deviation, with the encoder's variances and equal weights."""
    def start(x: Tensor) -> Params:
        params = encoder.infer(x).params
        k = family.num_components
        offsets = family.initial_params(len(x), LATENT, dtype=x.dtype, device=x.device)["loc"]
        scale = torch.exp(0.5 * params["log_var"]).repeat(1, k)
        return {"loc": params["loc"].repeat(1, k) + offsets * scale, "log_var": params["log_var"].repeat(1, k),
                "logits": torch.zeros(len(x), k, dtype=x.dtype, device=x.device)}

    return start


def validation_images(args: argparse.Namespace) -> Tensor:
    """100 images for the E-steps' learning rate (never the test set)."""
    if args.dataset == "binarized-mnist":
        valid = load_binarized_mnist(args.data_path).valid
        assert valid is not None
        return valid[:100]
    return binarize(load_fashion_mnist(args.data_path).train[-100:], generator=torch.Generator().manual_seed(1))


def best_lr(args: argparse.Namespace, model: Any, make: Any, start: Any, x: Tensor) -> float:
    """The lr of ``--estep-lrs`` whose E-step ``make(lr)`` from ``start(x)`` has the best mean ELBO on ``x``."""
    scores = {}
    for lr in args.estep_lrs:
        torch.manual_seed(args.seed)
        posterior = Run(make(lr), start=start).infer(x).posterior
        scores[lr] = common.mean_elbo(model, posterior, x, samples=100, seed=args.seed + 1)
    return max(scores, key=lambda lr: scores[lr] if scores[lr] == scores[lr] else -float("inf"))


def train_rme(args: argparse.Namespace, model: Any, train: Tensor, transform: Any) -> tuple[Any, float]:
    """RME trained on top of the frozen ``model`` (its own parameters only) for ``--rme-epochs`` epochs, resumable;
    returns it and its training seconds."""
    torch.manual_seed(args.seed)
    rme = RecursiveMixtureEncoder(model, latent_dim=LATENT, num_components=args.mixture_components,
                                  barrier=args.rme_barrier)
    rme.infer(train[:2])  # sizes lazy layers
    config = {"dataset": args.dataset, "seed": args.seed, "rme": repr(rme), "vae_epochs": args.vae_epochs,
              "num_examples": len(train), "epochs": None}
    curves = common.train_resumable(
        rme, train, parameters=list(rme.parameters()), modules={"rme": rme}, epochs=args.rme_epochs, batch_size=100,
        lr=1e-3, seed=args.seed, checkpoint=common.checkpoint_file(args, "gap-rme", config), label="RME (frozen VAE)",
        progress=not args.quiet, transform=transform)
    return rme.eval(), sum(curves["seconds"])


def methods_of(args: argparse.Namespace, model: Any, train: Tensor, transform: Any,
               vae_seconds: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """The measured rows (see the module docstring) and what it took to build them."""
    encoder = StandardEncoder(model, latent_dim=LATENT)
    valid = validation_images(args)
    diagonal = best_lr(args, model, lambda lr: GradientEStep(model, latent_dim=LATENT, lr=lr,
                                                             num_steps=args.estep_steps, init="encoder"), None, valid)
    family = GaussianMixture(args.mixture_components)
    start = mixture_from_encoder(encoder, family)

    def mixture(lr: float) -> GradientEStep:
        return GradientEStep(model, latent_dim=LATENT, family=family, lr=lr, num_steps=args.estep_steps)

    mixture_lr = best_lr(args, model, mixture, start, valid)
    learned, curves = frozen_refinement.train_optimizer(args, model, train, transform, init="encoder",
                                                        budget_s=vae_seconds / 2)
    rme, rme_seconds = train_rme(args, model, train, transform)
    k = args.mixture_components
    methods = {
        ENCODER: encoder,
        "E-step (diagonal)": GradientEStep(model, latent_dim=LATENT, lr=diagonal, num_steps=args.estep_steps,
                                           init="encoder"),
        f"E-step (mixture K={k})": Run(mixture(mixture_lr), start=start),
        "learned optimizer (diagonal)": Run(learned, num_steps=args.learned_steps),
        f"RME (K={k})": rme,
    }
    built = {"e_step_lr_diagonal": diagonal, "e_step_lr_mixture": mixture_lr, "vae_training_seconds": vae_seconds,
             "learned_training_seconds": sum(curves["seconds"]), "learned_training_epochs": len(curves["seconds"]),
             "rme_training_seconds": rme_seconds, "rme_epochs": args.rme_epochs}
    return methods, built


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """One dataset's rows, AIS and its check (cached under ``--checkpoint-dir``)."""
    train, test, transform = frozen_refinement.load_data(args)
    if args.scale == "smoke":
        train = train[:1000]
    model, vae_seconds = frozen_refinement.train_vae(args, train, transform)
    methods, built = methods_of(args, model, train, transform, vae_seconds)
    x = test[: args.test_size]
    ais_options = {"num_chains": args.ais_chains, "num_steps": args.ais_steps, "num_leapfrog": args.ais_leapfrog}
    report = gap_report(model, methods, x, ais_start=ENCODER, ais_options=ais_options, e_step_steps=args.estep_steps,
                        e_step_lrs=args.estep_lrs, elbo_samples=args.elbo_samples, iwae_samples=args.iwae_samples,
                        max_samples=args.max_samples, reference=ENCODER,
                        generator=torch.Generator().manual_seed(args.seed))
    summary = report.summary()
    check = x[: args.ais_prior_check]
    started = time.perf_counter()
    prior = annealed_importance_sampling(model, check, num_chains=args.ais_chains, num_steps=args.ais_prior_steps,
                                         num_leapfrog=args.ais_leapfrog, generator=torch.Generator().manual_seed(1))
    difference = prior.log_px - report.log_px[: len(check)]
    assert report.ais is not None
    rows: dict[str, Any] = dict(summary["methods"])
    rows.update({name: {"status": "pending: the low-rank family of issue 30 (LowRankGaussian) is not built yet"}
                 for name in PENDING})
    return {
        "ais_log_px": {
            "mean": summary["log_px"], "se": summary["log_px_se"], "mc_se": summary["log_px_mc_se"],
            "seconds": report.ais_seconds, "seconds_per_image": report.ais_seconds / len(x),
            "start": ENCODER, "settings": {**ais_options, "schedule": "sigmoid", "target_acceptance": 0.9},
            "acceptance": report.ais.acceptance.mean().item(),
            "log_weight_std": report.ais.log_weight_std.mean().item(),
            "prior_check": {"images": len(check), "num_steps": args.ais_prior_steps,
                            "seconds": time.perf_counter() - started,
                            "mean_difference_prior_minus_encoder_start": difference.mean().item(),
                            "difference_se": common.standard_error(difference),
                            "prior_mc_se": prior.standard_error.mean().item()},
        },
        "bound": summary["bound"], "methods": rows, "built": built, "num_images": len(x),
        "best_iwae": max(row["iwae"] for row in summary["methods"].values()),
    }


def cached_evaluation(args: argparse.Namespace) -> dict[str, Any]:
    """:func:`evaluate`, saved under ``--checkpoint-dir`` keyed by every option that changes it."""
    keys = ("dataset", "vae_epochs", "test_size", "estep_steps", "estep_lrs", "elbo_samples", "iwae_samples",
            "max_samples", "learned_steps", "mixture_components", "rme_barrier", "rme_epochs", "ais_chains",
            "ais_steps", "ais_leapfrog", "ais_prior_check", "ais_prior_steps", "seed", "scale")
    path = common.checkpoint_file(args, "gap-report-evaluation", {key: getattr(args, key) for key in keys})
    if path.exists():
        return dict(torch.load(path))
    result = evaluate(args)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(result, path)
    return result


def plot(args: argparse.Namespace, results: dict[str, Any]) -> str:
    """One panel a dataset: per row, the approximation gap and the amortization gap stacked (standard errors as
    whiskers); pending rows are labelled, not drawn."""
    plt = common.pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.5), squeeze=False)
    for ax, (name, data) in zip(axes[0], results.items(), strict=True):
        rows = data["methods"]
        labels = list(rows)
        measured = [label for label in labels if "status" not in rows[label]]
        approximation = [rows[label].get("approximation_gap", 0.0) for label in labels]
        amortization = [rows[label].get("amortization_gap", 0.0) for label in labels]
        ax.barh(labels, approximation, xerr=[rows[label].get("approximation_gap_se", 0.0) for label in labels],
                color="tab:orange", label="approximation gap")
        ax.barh(labels, amortization, left=approximation, color="tab:green", label="amortization gap",
                xerr=[rows[label].get("amortization_gap_se", 0.0) for label in labels])
        for label in labels:
            if label not in measured:
                ax.text(0.05, label, "pending (low-rank family)", va="center", fontsize=7, color="grey")
        ax.invert_yaxis()
        ax.axvline(0, color="black", linewidth=0.5)
        ax.set_xlabel(f"nats per image (bar end: AIS log p(x) - ELBO; AIS {data['ais_log_px']['mean']:.2f})")
        ax.set_title(f"{name}: {data['num_images']} test images")
        ax.legend(fontsize=7, loc="lower right")
    return common.save_figure(args, fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark (see the module docstring) and writes its results; returns the JSON content."""
    args = common.parse_args("gap_report", __doc__.splitlines()[0], argv=argv, extra=_options)
    started = common.setup(args)
    if args.scale == "smoke":  # a functional test of the script: a tiny VAE, few images, short runs
        args.datasets, args.vae_epochs, args.test_size, args.estep_steps, args.estep_lrs = \
            ["binarized-mnist"], 1, 6, 5, [0.01]
        args.elbo_samples, args.iwae_samples, args.max_samples, args.rme_epochs = 10, 64, 64, 1
        args.ais_chains, args.ais_steps, args.ais_leapfrog, args.ais_prior_check, args.ais_prior_steps = 2, 10, 2, 2, 10
    results = {}
    for dataset in args.datasets:
        args.dataset = dataset
        results[dataset] = cached_evaluation(args)
    first = results[args.datasets[0]]
    encoder = first["methods"][ENCODER]
    learned = first["methods"]["learned optimizer (diagonal)"]
    result: dict[str, Any] = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "datasets": results, "ais_log_px": first["ais_log_px"]["mean"],
        "approximation_gap_encoder": encoder["approximation_gap"], "amortization_gap_encoder":
            encoder["amortization_gap"], "amortization_gap_learned": learned["amortization_gap"],
    }
    body: list[str] = []
    for dataset, data in results.items():
        ais = data["ais_log_px"]
        check = ais["prior_check"]
        body += [f"## {dataset}", "",
                 f"AIS log p(x) {ais['mean']:.2f} ± {ais['se']:.2f} over {data['num_images']} test images (Monte Carlo "
                 f"error per image {ais['mc_se']:.3f}; from the encoder's posterior, {ais['settings']}; "
                 f"{ais['seconds']:.0f} s, {ais['seconds_per_image']:.1f} s per image, acceptance "
                 f"{ais['acceptance']:.2f}); best IWAE of any row {data['best_iwae']:.2f}. Check: AIS from the prior "
                 f"({check['num_steps']} steps) on {check['images']} images is "
                 f"{check['mean_difference_prior_minus_encoder_start']:+.3f} ± {check['difference_se']:.3f} nats from "
                 f"it. Bound for samples to bound: IWAE-{args.iwae_samples} of the encoder, {data['bound']:.2f}.", ""]
        body += common.table(
            ["method", "ELBO", "IWAE", "approximation gap", "± s.e.", "amortization gap", "± s.e.",
             "samples to bound"],
            [(name, "pending", "", "", "", "", "", "") if "status" in row else
             (name, row["elbo"], row["iwae"], row["approximation_gap"], row["approximation_gap_se"],
              row["amortization_gap"], row["amortization_gap_se"],
              row["samples_to_bound"] if row["samples_to_bound"] is not None else f"> {args.max_samples}")
             for name, row in data["methods"].items()])
        body += ["", f"Built: {data['built']}.", ""]
    body.append("Pending rows: the low-rank family of issue 30 (r = 2, 8) is not built yet; they are placeholders.")
    common.write_results(args, result, title="Inference gaps against AIS on the frozen VAE", body=body,
                         started=started, plots=[plot(args, results)])
    return result


if __name__ == "__main__":
    main()
