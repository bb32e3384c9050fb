"""Mixture posteriors on binarized images: standard VAE, non-recursive mixture encoder, RME, semi-amortized,
iterative, and RME refined by the learned optimizer (issue 14).

Per dataset (statically binarized MNIST, Larochelle split; Fashion-MNIST binarized dynamically per batch, its test
set once with a fixed seed), every method trains its own copy of the paper's Bernoulli VAE decoder
(784-512-512-64, ELU, highway; the same architecture and epochs for all) jointly with its inference model:

* ``standard`` — the VAE's own Gaussian encoder;
* ``mixture_encoder`` — one highway network giving a K = 5 Gaussian mixture, trained on the mixture's ELBO;
* ``rme2`` / ``rme`` — :class:`~learned_inference.RecursiveMixtureEncoder` with M = 2 and M = 5;
* ``semi_amortized`` — the VAE's encoder + 5 SVI steps, differentiated through (Kim et al. 2018);
* ``iterative`` — :class:`~learned_inference.IterativeInferenceOptimizer`, 5 learned steps from the prior;
* ``rme_refined`` — the trained RME (M = 5) and its decoder frozen, a learned optimizer over the M = 5 mixture
  trained on top (``init_params`` = RME's λ) for ``--refine-epochs``, 5 steps at test time.

Reported: test −log p(x) (IWAE, ``--iwae-samples`` on the first ``--test-size`` test images), ELBO (100 samples),
the gap split (approximation gap = log p(x) − ELBO of a converged Adam E-step in the method's family; amortization
gap = that E-step's ELBO − the method's), training seconds per example, test-time seconds per example
(interleaved, median of ``--timing-repeats``), and parameter counts (inference and decoder); a figure of the gap
split (``mixture_comparison.png``). Resumable: training checkpoints and each method's evaluation under
``--checkpoint-dir``, so datasets may run in separate processes (``--datasets``) and one run with all of them
assembles the results and re-times test-time inference (run that one on an otherwise idle machine).

Run:

* ``--scale smoke``: a functional test on 200 training and 20 test images of binarized MNIST (≈ 10 s).
* Reduced: ``python benchmarks/mixture_comparison.py --threads 2 --epochs 5 --train-size 10000 --test-size 500
  --iwae-samples 1000 --estep-steps 100`` (estimated 20–30 min a dataset).
* Full (the issue's settings): ``python benchmarks/mixture_comparison.py --threads 2``. Measured on binarized MNIST
  with one thread while another one-thread job shared the 2-core machine: 1.5 h of training for the six
  methods (5.3 ms per example-epoch together), 20 min for the refiner, 35 min of evaluation (IWAE k = 5000 and
  300-step E-steps on 1000 images); interrupted runs resume from ``--checkpoint-dir``. The datasets may run as two
  processes (``--datasets binarized_mnist`` / ``--datasets fashion_mnist``, one thread each), then one run with
  both assembles the results from the saved evaluations.

RME's barrier C (``--rme-barrier``, default the class's 1 nat; one value for all datasets or one per dataset) is a
hyperparameter it is sensitive to (``docs/mixtures.md``): choose it on held-out images with
``benchmarks/rme_barrier_selection.py``, which trains RME under the same checkpoints, so the chosen C is not
trained twice.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common
from learned_inference import (
    GaussianMixture,
    GradientEStep,
    IterativeInferenceOptimizer,
    RecursiveMixtureEncoder,
    SemiAmortized,
    StandardEncoder,
)
from learned_inference.data import binarize, load_binarized_mnist, load_fashion_mnist
from learned_inference.evaluation import elbo_estimate, importance_weighted_log_marginal
from learned_inference.inference import InferenceMethod, InferenceResult
from learned_inference.zoo import bernoulli_vae

LATENT = 64
METHODS = ("standard", "mixture_encoder", "rme2", "rme", "semi_amortized", "iterative")
DATASETS = ("binarized_mnist", "fashion_mnist")
COMPARED = (("standard", "rme"), ("mixture_encoder", "rme"), ("rme", "rme_refined"), ("semi_amortized", "rme"),
            ("standard", "iterative"))
"""Pairs (a, b) whose paired difference in test -log p(x) is reported (the issue's claims, and the paper's)."""


class RefineFrom(nn.Module):
    """A learned optimizer started from another (frozen) method's λ: ``forward(x)`` = ``refiner(x, init_params=
    start.infer(x).params)``, so that the refiner trains on top of it with the usual loop."""

    def __init__(self, refiner: IterativeInferenceOptimizer, start: InferenceMethod) -> None:
        super().__init__()
        self.refiner = refiner
        object.__setattr__(self, "_start", start)  # frozen and not a submodule: not trained, not saved twice

    def forward(self, x: Tensor) -> InferenceResult:
        return self.refiner(x, init_params=self.__dict__["_start"].infer(x).params)

    def infer(self, x: Tensor, **options: Any) -> InferenceResult:
        return self.refiner.infer(x, init_params=self.__dict__["_start"].infer(x).params, **options)


def add_options(parser: argparse.ArgumentParser) -> None:
    """The script's options (also those of ``rme_barrier_selection``, which trains the same rows)."""
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--refine-epochs", type=int, default=5)
    parser.add_argument("--train-size", type=int, default=50_000)
    parser.add_argument("--test-size", type=int, default=1000)
    parser.add_argument("--iwae-samples", type=int, default=5000)
    parser.add_argument("--estep-steps", type=int, default=300)
    parser.add_argument("--timing-repeats", type=int, default=5)
    parser.add_argument("--rme-barrier", type=float, nargs="+", default=[1.0],
                        help="RME's barrier C in nats, one for all datasets or one per dataset of --datasets "
                             "(default the class's 1; benchmarks/rme_barrier_selection.py chooses it)")


def load(args: argparse.Namespace, name: str) -> tuple[Tensor, Tensor, Any]:
    """(train, test, per-batch transform) of one dataset."""
    if name == "binarized_mnist":
        data = load_binarized_mnist(args.data_path)
        return data.train[:args.train_size], data.test[:args.test_size], None
    data = load_fashion_mnist(args.data_path)
    test = binarize(data.test[:args.test_size], generator=torch.Generator().manual_seed(0))
    return data.train[:args.train_size], test, binarize


def build(kind: str, model: Any, *, barrier: float) -> InferenceMethod:
    """The inference method of a row (on a fresh copy of the VAE); ``barrier``: RME's C."""
    if kind == "standard":
        return StandardEncoder(model, latent_dim=LATENT, init="encoder")
    if kind == "mixture_encoder":
        return StandardEncoder(model, latent_dim=LATENT, family=GaussianMixture(5), init="highway")
    if kind in ("rme2", "rme"):
        return RecursiveMixtureEncoder(model, latent_dim=LATENT, num_components=2 if kind == "rme2" else 5,
                                       barrier=barrier)
    if kind == "semi_amortized":
        return SemiAmortized(model, latent_dim=LATENT, num_steps=5, init="encoder")
    if kind == "iterative":
        return IterativeInferenceOptimizer(model, latent_dim=LATENT, num_steps=5)
    raise ValueError(f"unknown method {kind!r}")


def train_method(args: argparse.Namespace, name: str, kind: str, train: Tensor, transform: Any, *,
                 barrier: float) -> tuple[Any, InferenceMethod, dict[str, list[float]]]:
    """A row's VAE and inference method trained jointly (resumed from ``--checkpoint-dir``), frozen, with the
    learning curves; ``barrier``: RME's C."""
    torch.manual_seed(args.seed)
    model = bernoulli_vae()
    method = build(kind, model, barrier=barrier)
    curves = common.train_model(args, model, method, train, label=f"mixture-{name}-{kind}",
                                config={"dataset": name, "kind": kind, "method": repr(method)},
                                epochs=args.epochs, batch_size=100, lr=1e-3, transform=transform)
    return model.requires_grad_(False), method.eval(), curves


def per_dataset(args: argparse.Namespace, values: list[Any], option: str) -> dict[str, Any]:
    """An option's ``values`` by dataset of ``--datasets``: one value for all of them, or one each, in order."""
    if len(values) not in (1, len(args.datasets)):
        raise SystemExit(f"{option}: give it once for all datasets or once per dataset of --datasets "
                         f"({len(args.datasets)}); got {len(values)}")
    return dict(zip(args.datasets, values * len(args.datasets) if len(values) == 1 else values, strict=True))


def barriers(args: argparse.Namespace) -> dict[str, float]:
    """RME's C per dataset (``--rme-barrier``)."""
    return per_dataset(args, args.rme_barrier, "--rme-barrier")


def count(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


@torch.no_grad()
def scored_inference(args: argparse.Namespace, model: Any, method: Any, x: Tensor) -> tuple[Tensor, InferenceResult]:
    """IWAE log p(x) of each image (``--iwae-samples``, proposal: the method's posterior) and the method's result,
    from the seed ``--seed``."""
    torch.manual_seed(args.seed)
    result = method.infer(x)
    log_px = importance_weighted_log_marginal(model, result.posterior, x, num_samples=args.iwae_samples,
                                              chunk_size=min(args.iwae_samples, 100))
    return log_px, result


@torch.no_grad()
def evaluate(args: argparse.Namespace, model: Any, method: Any, family: Any, test: Tensor) -> dict[str, Tensor]:
    """Per test image: IWAE log p(x), the method's ELBO (100 samples) and the ELBO of a converged Adam E-step in
    the method's family started from the method's λ (for the gap split)."""
    log_px, result = scored_inference(args, model, method, test)
    elbo = elbo_estimate(model, result.posterior, test, num_samples=100)
    e_step = GradientEStep(model, latent_dim=LATENT, family=family, lr=1e-2, num_steps=args.estep_steps,
                           num_samples=2)
    converged = elbo_estimate(model, e_step.infer(test, init_params=result.params).posterior, test, num_samples=100)
    return {"log_px": log_px, "elbo": elbo, "converged_elbo": converged}


def cached_evaluation(args: argparse.Namespace, name: str, kind: str, model: Any, method: Any,
                      test: Tensor, *, barrier: float) -> dict[str, Tensor]:
    """:func:`evaluate`, saved under ``--checkpoint-dir`` keyed by the trained method and the evaluation settings
    (RME's C for the RME rows), so that datasets evaluated by separate runs are assembled (and re-timed) by one run
    without recomputing."""
    config = {"dataset": name, "kind": kind, "method": repr(method), "seed": args.seed, "per_image": True,
              **{key: getattr(args, key) for key in ("epochs", "refine_epochs", "train_size", "test_size",
                                                     "iwae_samples", "estep_steps")},
              **({"rme_barrier": barrier} if kind.startswith("rme") else {})}
    path = common.checkpoint_file(args, f"mixture-{name}-{kind}-evaluation", config)
    if path.exists():
        return dict(torch.load(path))
    family = method.refiner.family if isinstance(method, RefineFrom) else method.family
    values = evaluate(args, model, method, family, test)
    torch.save(values, path)
    return values


def summary(values: dict[str, Tensor]) -> dict[str, float]:
    """Test means: −log p(x) (with its standard error over images), ELBO, and the gap split."""
    log_px, elbo, converged = values["log_px"], values["elbo"], values["converged_elbo"]
    return {"nll": -log_px.mean().item(), "nll_sem": common.standard_error(log_px),
            "elbo": elbo.mean().item(), "approximation_gap": (log_px - converged).mean().item(),
            "amortization_gap": (converged - elbo).mean().item()}


def paired_differences(log_px: dict[str, Tensor]) -> dict[str, dict[str, float]]:
    """For each pair of :data:`COMPARED`, (a, b): mean over test images of −log p_a(x) − (−log p_b(x)) (positive:
    b ahead) and its paired standard error."""
    differences = {}
    for a, b in COMPARED:
        difference = log_px[b] - log_px[a]
        differences[f"nll_{a}_minus_{b}"] = {"mean": difference.mean().item(),
                                             "sem": common.standard_error(difference)}
    return differences


def time_per_example(methods: dict[str, Any], x: Tensor, *, repeats: int) -> dict[str, float]:
    """Interleaved test-time inference: median seconds per example of ``infer(x)`` (one warm-up round)."""
    seconds: dict[str, list[float]] = {name: [] for name in methods}
    names = list(methods)
    for repeat in range(repeats + 1):
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:
            start = time.perf_counter()
            methods[name].infer(x)
            if repeat:
                seconds[name].append((time.perf_counter() - start) / len(x))
    return {name: statistics.median(values) for name, values in seconds.items()}


def run_dataset(args: argparse.Namespace, name: str) -> dict[str, Any]:
    train, test, transform = load(args, name)
    rows: dict[str, dict[str, Any]] = {}
    trained: dict[str, Any] = {}
    barrier = barriers(args)[name]
    for kind in METHODS:
        model, method, curves = train_method(args, name, kind, train, transform, barrier=barrier)
        trained[kind] = (model, method)
        encoder = model.encoder if kind in ("standard", "semi_amortized") else None
        rows[kind] = {"train_s_per_example": sum(curves["seconds"]) / (len(curves["seconds"]) * len(train)),
                      "inference_parameters": count(method) + count(encoder),
                      "decoder_parameters": count(model.decoder)}
    model, rme = trained["rme"]
    refiner = IterativeInferenceOptimizer(model, latent_dim=LATENT, family=GaussianMixture(5), num_steps=5,
                                          data_shape=train.shape[1:])
    refine = RefineFrom(refiner, rme)
    curves = common.train_resumable(
        refine, train, parameters=list(refiner.parameters()), modules={"refiner": refiner},  # type: ignore[arg-type]
        epochs=args.refine_epochs, batch_size=100, lr=1e-3, seed=args.seed, label=f"mixture-{name}-rme_refined",
        checkpoint=common.checkpoint_file(args, f"mixture-{name}-rme_refined", {"epochs": None, "rme": repr(rme)}),
        progress=not args.quiet, transform=transform)
    trained["rme_refined"] = (model, refine)
    rows["rme_refined"] = {"train_s_per_example": rows["rme"]["train_s_per_example"]
                           + sum(curves["seconds"]) / (len(curves["seconds"]) * len(train)),
                           "inference_parameters": rows["rme"]["inference_parameters"] + count(refiner),
                           "decoder_parameters": rows["rme"]["decoder_parameters"]}
    log_px = {}
    for kind, (model, method) in trained.items():
        values = cached_evaluation(args, name, kind, model, method, test, barrier=barrier)
        rows[kind].update(summary(values))
        log_px[kind] = values["log_px"]
    timing = time_per_example({kind: method for kind, (_, method) in trained.items()}, test[:100],
                              repeats=args.timing_repeats)
    for kind, value in timing.items():
        rows[kind]["test_s_per_example"] = value
    return {"rows": rows, **{f"nll_{kind}": row["nll"] for kind, row in rows.items()},
            "paired_differences": paired_differences(log_px),
            "rme_faster_than_semi_amortized": timing["rme"] < timing["semi_amortized"]}


def plot_gaps(args: argparse.Namespace, results: dict[str, Any]) -> str:
    """One panel a dataset, one bar a method: test −log p(x), then the approximation gap, then the amortization
    gap, stacked (the bar ends at −ELBO)."""
    plt = common.pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2), squeeze=False)
    for ax, (name, data) in zip(axes[0], results.items(), strict=True):
        kinds = list(data["rows"])
        nll = [data["rows"][kind]["nll"] for kind in kinds]
        approximation = [data["rows"][kind]["approximation_gap"] for kind in kinds]
        amortization = [data["rows"][kind]["amortization_gap"] for kind in kinds]
        ax.barh(kinds, nll, color="tab:blue", label="test -log p(x) (IWAE)")
        ax.barh(kinds, approximation, left=nll, color="tab:orange", label="approximation gap")
        ax.barh(kinds, amortization, left=[a + b for a, b in zip(nll, approximation, strict=True)],
                color="tab:green", label="amortization gap")
        ends = [a + b + c for a, b, c in zip(nll, approximation, amortization, strict=True)]
        ax.set_xlim(min(nll) - 5, max(ends) + 2)
        ax.invert_yaxis()
        ax.set_xlabel("nats per image (bar end: -ELBO)")
        ax.set_title(name)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3)
    return common.save_figure(args, fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = common.parse_args("mixture_comparison", __doc__.splitlines()[0], argv=argv, extra=add_options)
    started = common.setup(args)
    if args.scale == "smoke":
        args.datasets, args.epochs, args.refine_epochs = ["binarized_mnist"], 1, 1
        args.train_size, args.test_size, args.iwae_samples, args.estep_steps = 200, 20, 50, 5
        args.timing_repeats = 1
    results = {name: run_dataset(args, name) for name in args.datasets}
    settings = {key: getattr(args, key) for key in ("epochs", "refine_epochs", "train_size", "test_size",
                                                    "iwae_samples", "estep_steps", "timing_repeats")}
    settings["rme_barrier"] = barriers(args)
    result: dict[str, Any] = {"settings": settings, "datasets": results}
    if "binarized_mnist" in results:
        result.update({k: v for k, v in results["binarized_mnist"].items()
                       if k.startswith("nll_") or k == "rme_faster_than_semi_amortized"})
    body: list[str] = []
    for name, data in results.items():
        body += [f"## {name}", ""]
        body += common.table(
            ["method", "test -log p(x)", "± s.e.", "ELBO", "approx. gap", "amort. gap", "train s/ex", "test s/ex",
             "inference params", "decoder params"],
            [(kind, r["nll"], r["nll_sem"], r["elbo"], r["approximation_gap"], r["amortization_gap"],
              f"{r['train_s_per_example']:.2e}", f"{r['test_s_per_example']:.2e}", r["inference_parameters"],
              r["decoder_parameters"]) for kind, r in data["rows"].items()])
        body += ["", *common.table(["paired difference in test -log p(x) (positive: second ahead)", "nats",
                                    "± paired s.e."],
                                   [(f"{key[4:].replace('_minus_', ' - ')}", d["mean"], d["sem"])
                                    for key, d in data["paired_differences"].items()]), ""]
    body.append(f"Settings: {settings}.")
    common.write_results(args, result, title="Mixture posteriors and RME on binarized images", body=body,
                         started=started, plots=[plot_gaps(args, results)])
    return result


if __name__ == "__main__":
    main()
