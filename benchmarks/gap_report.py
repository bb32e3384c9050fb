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
* ``E-step (low-rank r=2, 8)``: the diagonal E-step's protocol in the family of ``LowRankGaussian(r)``, started at
  the encoder's Gaussian written with a non-zero factor (:meth:`~learned_inference.LowRankGaussian.from_diagonal`);
* ``learned optimizer (low-rank r=2, 8)``: the learned optimizer's protocol with ``family=LowRankGaussian(r)``
  (trained on top of the frozen VAE within the same budget, at least one epoch).

The low-rank rows are a second pass (its own cache, so adding them did not rerun the others): a second, independent
AIS run with the same settings gives their gaps (the two AIS estimates are recorded side by side), and the encoder's
row is evaluated again in it as the reference of ``samples_to_bound`` (recorded as ``encoder_check``).

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
    LowRankGaussian,
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
#: the ranks of the low-rank rows
RANKS = (2, 8)
#: the options that change an evaluation (its cache key)
KEYS = ("dataset", "vae_epochs", "test_size", "estep_steps", "estep_lrs", "elbo_samples", "iwae_samples",
        "max_samples", "learned_steps", "mixture_components", "rme_barrier", "rme_epochs", "ais_chains", "ais_steps",
        "ais_leapfrog", "ais_prior_check", "ais_prior_steps", "seed", "scale")


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


def low_rank_methods_of(args: argparse.Namespace, model: Any, train: Tensor, transform: Any,
                        vae_seconds: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """The encoder (the reference) and the low-rank rows (see the module docstring), and what it took to build them."""
    valid = validation_images(args)
    methods: dict[str, Any] = {ENCODER: StandardEncoder(model, latent_dim=LATENT)}
    built: dict[str, Any] = {}
    for rank in RANKS:
        family = LowRankGaussian(rank)

        def e_step(lr: float, family: LowRankGaussian = family) -> GradientEStep:
            return GradientEStep(model, latent_dim=LATENT, family=family, lr=lr, num_steps=args.estep_steps,
                                 init="encoder")

        lr = best_lr(args, model, e_step, None, valid)
        learned, curves = frozen_refinement.train_optimizer(args, model, train, transform, init="encoder",
                                                            budget_s=vae_seconds / 2, family=family)
        methods[f"E-step (low-rank r={rank})"] = e_step(lr)
        methods[f"learned optimizer (low-rank r={rank})"] = Run(learned, num_steps=args.learned_steps)
        built.update({f"e_step_lr_low_rank_{rank}": lr, f"learned_training_seconds_low_rank_{rank}":
                      sum(curves["seconds"]), f"learned_training_epochs_low_rank_{rank}": len(curves["seconds"])})
    return methods, built


def _ais_options(args: argparse.Namespace) -> dict[str, int]:
    """The AIS options of ``--ais-chains``, ``--ais-steps`` and ``--ais-leapfrog``."""
    return {"num_chains": args.ais_chains, "num_steps": args.ais_steps, "num_leapfrog": args.ais_leapfrog}


def _report(args: argparse.Namespace, model: Any, methods: dict[str, Any], x: Tensor) -> Any:
    """:func:`~learned_inference.gap_report` of ``methods`` with the benchmark's settings (AIS from the encoder)."""
    return gap_report(model, methods, x, ais_start=ENCODER, ais_options=_ais_options(args),
                      e_step_steps=args.estep_steps,
                      e_step_lrs=args.estep_lrs, elbo_samples=args.elbo_samples, iwae_samples=args.iwae_samples,
                      max_samples=args.max_samples, reference=ENCODER,
                      generator=torch.Generator().manual_seed(args.seed))


def _ais_record(args: argparse.Namespace, report: Any) -> dict[str, Any]:
    summary = report.summary()
    return {"mean": summary["log_px"], "se": summary["log_px_se"], "mc_se": summary["log_px_mc_se"],
            "seconds": report.ais_seconds, "seconds_per_image": report.ais_seconds / len(report.log_px),
            "start": ENCODER, "settings": {**_ais_options(args), "schedule": "sigmoid", "target_acceptance": 0.9},
            "acceptance": report.ais.acceptance.mean().item(),
            "log_weight_std": report.ais.log_weight_std.mean().item()}


def _data_and_model(args: argparse.Namespace) -> tuple[Any, Tensor, Tensor, Any, float]:
    train, test, transform = frozen_refinement.load_data(args)
    if args.scale == "smoke":
        train = train[:1000]
    model, vae_seconds = frozen_refinement.train_vae(args, train, transform)
    return model, train, test[: args.test_size], transform, vae_seconds


def evaluate_low_rank(args: argparse.Namespace) -> dict[str, Any]:
    """One dataset's low-rank rows with the encoder's as reference, against a second AIS run."""
    model, train, x, transform, vae_seconds = _data_and_model(args)
    methods, built = low_rank_methods_of(args, model, train, transform, vae_seconds)
    report = _report(args, model, methods, x)
    rows = dict(report.summary()["methods"])
    return {"ais_log_px": _ais_record(args, report), "encoder_check": rows.pop(ENCODER), "bound": report.bound,
            "methods": rows, "built": built}


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """One dataset's rows (but the low-rank ones), AIS and its check."""
    model, train, x, transform, vae_seconds = _data_and_model(args)
    methods, built = methods_of(args, model, train, transform, vae_seconds)
    report = _report(args, model, methods, x)
    summary = report.summary()
    check = x[: args.ais_prior_check]
    started = time.perf_counter()
    prior = annealed_importance_sampling(model, check, num_chains=args.ais_chains, num_steps=args.ais_prior_steps,
                                         num_leapfrog=args.ais_leapfrog, generator=torch.Generator().manual_seed(1))
    difference = prior.log_px - report.log_px[: len(check)]
    return {
        "ais_log_px": {
            **_ais_record(args, report),
            "prior_check": {"images": len(check), "num_steps": args.ais_prior_steps,
                            "seconds": time.perf_counter() - started,
                            "mean_difference_prior_minus_encoder_start": difference.mean().item(),
                            "difference_se": common.standard_error(difference),
                            "prior_mc_se": prior.standard_error.mean().item()},
        },
        "bound": summary["bound"], "methods": dict(summary["methods"]), "built": built, "num_images": len(x),
    }


def cached(args: argparse.Namespace, label: str, evaluation: Any) -> dict[str, Any]:
    """``evaluation(args)``, saved under ``--checkpoint-dir`` keyed by every option that changes it."""
    path = common.checkpoint_file(args, label, {key: getattr(args, key) for key in KEYS})
    if path.exists():
        return dict(torch.load(path))
    result = evaluation(args)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(result, path)
    return result


def dataset_results(args: argparse.Namespace) -> dict[str, Any]:
    """Both passes of one dataset, merged: the low-rank rows join the others, each pass's AIS is kept."""
    result = cached(args, "gap-report-evaluation", evaluate)
    low_rank = cached(args, "gap-report-low-rank", evaluate_low_rank)
    encoder = result["methods"][ENCODER]
    result["methods"].update(low_rank["methods"])
    result["built"].update(low_rank["built"])
    result["ais_log_px_low_rank_pass"] = low_rank["ais_log_px"]
    result["encoder_check"] = {"elbo_difference": low_rank["encoder_check"]["elbo"] - encoder["elbo"],
                               "iwae_difference": low_rank["encoder_check"]["iwae"] - encoder["iwae"],
                               "bound": low_rank["bound"]}
    result["best_iwae"] = max(row["iwae"] for row in result["methods"].values())
    return result


def total_gap(row: dict[str, Any]) -> float:
    """AIS log p(x) − the row's ELBO: its approximation plus amortization gap."""
    return float(row["approximation_gap"] + row["amortization_gap"])


def plot(args: argparse.Namespace, results: dict[str, Any]) -> str:
    """One panel a dataset: per row, the approximation gap and the amortization gap stacked (standard errors as
    whiskers)."""
    plt = common.pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.5), squeeze=False)
    for ax, (name, data) in zip(axes[0], results.items(), strict=True):
        rows = data["methods"]
        labels = list(rows)
        approximation = [rows[label]["approximation_gap"] for label in labels]
        ax.barh(labels, approximation, xerr=[rows[label]["approximation_gap_se"] for label in labels],
                color="tab:orange", label="approximation gap")
        ax.barh(labels, [rows[label]["amortization_gap"] for label in labels], left=approximation,
                color="tab:green", label="amortization gap",
                xerr=[rows[label]["amortization_gap_se"] for label in labels])
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
        results[dataset] = dataset_results(args)
    first = results[args.datasets[0]]
    encoder = first["methods"][ENCODER]
    learned = first["methods"]["learned optimizer (diagonal)"]
    result: dict[str, Any] = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "datasets": results, "ais_log_px": first["ais_log_px"]["mean"],
        "approximation_gap_encoder": encoder["approximation_gap"], "amortization_gap_encoder":
            encoder["amortization_gap"], "amortization_gap_learned": learned["amortization_gap"],
        "total_gap_learned": {dataset: {name.removeprefix("learned optimizer ").strip("()"): total_gap(row)
                                        for name, row in data["methods"].items() if name.startswith("learned")}
                              for dataset, data in results.items()},
    }
    body: list[str] = []
    for dataset, data in results.items():
        ais, second, encoder_check = data["ais_log_px"], data["ais_log_px_low_rank_pass"], data["encoder_check"]
        check = ais["prior_check"]
        body += [f"## {dataset}", "",
                 f"AIS log p(x) {ais['mean']:.2f} ± {ais['se']:.2f} over {data['num_images']} test images (Monte Carlo "
                 f"error per image {ais['mc_se']:.3f}; from the encoder's posterior, {ais['settings']}; "
                 f"{ais['seconds']:.0f} s, {ais['seconds_per_image']:.1f} s per image, acceptance "
                 f"{ais['acceptance']:.2f}); best IWAE of any row {data['best_iwae']:.2f}. Check: AIS from the prior "
                 f"({check['num_steps']} steps) on {check['images']} images is "
                 f"{check['mean_difference_prior_minus_encoder_start']:+.3f} ± {check['difference_se']:.3f} nats from "
                 f"it. Bound for samples to bound: IWAE-{args.iwae_samples} of the encoder, {data['bound']:.2f}.", "",
                 f"The low-rank rows' pass: its own AIS run (same settings) {second['mean']:.2f} ± {second['se']:.2f} "
                 f"({second['mean'] - ais['mean']:+.3f} from the first; {second['seconds_per_image']:.1f} s per "
                 f"image), "
                 f"its encoder bound {encoder_check['bound']:.2f}; the encoder evaluated again there: ELBO "
                 f"{encoder_check['elbo_difference']:+.3f}, IWAE {encoder_check['iwae_difference']:+.3f} from the "
                 f"first pass.", ""]
        body += common.table(
            ["method", "ELBO", "IWAE", "approximation gap", "± s.e.", "amortization gap", "± s.e.", "total gap",
             "samples to bound"],
            [(name, row["elbo"], row["iwae"], row["approximation_gap"], row["approximation_gap_se"],
              row["amortization_gap"], row["amortization_gap_se"], total_gap(row),
              row["samples_to_bound"] if row["samples_to_bound"] is not None else f"> {args.max_samples}")
             for name, row in data["methods"].items()])
        body += ["", f"Built: {data['built']}.", ""]
    common.write_results(args, result, title="Inference gaps against AIS on the frozen VAE", body=body,
                         started=started, plots=[plot(args, results)])
    return result


if __name__ == "__main__":
    main()
