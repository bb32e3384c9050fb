"""RME's barrier C chosen on held-out images: each C trains RME (M = 5) with its decoder exactly as
``mixture_comparison`` does, and the C with the lowest validation −log p(x) is the one to report on the test set.

Held out (never trained on, never the test set): binarized MNIST's validation split (Larochelle), and for
Fashion-MNIST the training images after the first ``--train-size`` (binarized once with a fixed seed). Scored by
IWAE log p(x) with ``--iwae-samples`` on the first ``--valid-size`` of them, beside the standard VAE of
``mixture_comparison`` (same checkpoints: its trained rows are reused, and a C chosen here is trained once for
both scripts), with paired differences and their standard errors.

Run: ``python benchmarks/rme_barrier_selection.py --threads 1 --datasets fashion_mnist --barriers 0.3 1 3``
(each new C: ≈ 26 min of training at one thread on the full settings, a C already trained by
``mixture_comparison`` is reused; validation ≈ 30 s a model; separate processes, one C each, train in parallel and
a final run over all of them assembles), then
``python benchmarks/mixture_comparison.py --datasets ... --rme-barrier <chosen C per dataset>``. The recorded run:
``--datasets binarized_mnist fashion_mnist --barriers 0.3 1 --barriers 0.1 0.3 1 3``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common
from benchmarks.mixture_comparison import add_options, load, per_dataset, scored_inference, train_method
from learned_inference.data import binarize, load_binarized_mnist, load_fashion_mnist


def _selection_options(parser: argparse.ArgumentParser) -> None:
    add_options(parser)
    parser.add_argument("--barriers", type=float, nargs="+", action="append",
                        help="the values of C to train and compare, in nats: one list for all datasets, or the option "
                             "once per dataset of --datasets, in order (default 0.3 1 3)")
    parser.add_argument("--valid-size", type=int, default=1000, help="held-out images scored")
    parser.set_defaults(iwae_samples=1000)


def held_out(args: argparse.Namespace, name: str) -> Tensor:
    """The first ``--valid-size`` held-out images of a dataset (binarized)."""
    if name == "binarized_mnist":
        valid = load_binarized_mnist(args.data_path).valid
        assert valid is not None
        return valid[:args.valid_size]
    images = load_fashion_mnist(args.data_path).train[args.train_size:args.train_size + args.valid_size]
    if len(images) < args.valid_size:
        raise SystemExit(f"--train-size {args.train_size} leaves {len(images)} Fashion-MNIST training images to hold "
                         f"out, fewer than --valid-size {args.valid_size}")
    return binarize(images, generator=torch.Generator().manual_seed(1))


def grids(args: argparse.Namespace) -> dict[str, list[float]]:
    """The values of C per dataset (``--barriers``, given once for all datasets or once per dataset)."""
    return per_dataset(args, args.barriers or [[0.3, 1.0, 3.0]], "--barriers")


def run_dataset(args: argparse.Namespace, name: str, barriers: list[float]) -> dict[str, Any]:
    train, _, transform = load(args, name)
    valid = held_out(args, name)
    model, method, _ = train_method(args, name, "standard", train, transform, barrier=0.0)
    standard, _ = scored_inference(args, model, method, valid)
    rows: dict[str, dict[str, float]] = {"standard": {"nll": -standard.mean().item(),
                                                      "nll_sem": common.standard_error(standard)}}
    for barrier in barriers:
        model, method, _ = train_method(args, name, "rme", train, transform, barrier=barrier)
        log_px, result = scored_inference(args, model, method, valid)
        difference = log_px - standard
        rows[f"rme_C={barrier:g}"] = {
            "barrier": barrier, "nll": -log_px.mean().item(), "nll_sem": common.standard_error(log_px),
            "nll_standard_minus_rme": difference.mean().item(),
            "nll_standard_minus_rme_sem": common.standard_error(difference),
            "smallest_mean_weight": result.params["logits"].exp().mean(0).min().item()}
    best = min((row for key, row in rows.items() if key != "standard"), key=lambda row: row["nll"])
    return {"rows": rows, "selected_barrier": best["barrier"]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = common.parse_args("rme_barrier_selection", __doc__.splitlines()[0], argv=argv, extra=_selection_options)
    started = common.setup(args)
    if args.scale == "smoke":
        args.datasets, args.epochs, args.barriers = ["binarized_mnist"], 1, [[0.3, 1.0]]
        args.train_size, args.test_size, args.valid_size, args.iwae_samples = 200, 20, 20, 20
    barriers = grids(args)
    results = {name: run_dataset(args, name, barriers[name]) for name in args.datasets}
    settings = {key: getattr(args, key) for key in ("epochs", "train_size", "valid_size", "iwae_samples")}
    settings["barriers"] = barriers
    result: dict[str, Any] = {"settings": settings, "datasets": results,
                              "selected_barrier": results[args.datasets[0]]["selected_barrier"]}
    body: list[str] = []
    for name, data in results.items():
        body += [f"## {name}: selected C = {data['selected_barrier']:g}", ""]
        body += common.table(
            ["model", "held-out -log p(x)", "± s.e.", "standard - RME (paired)", "± paired s.e.",
             "smallest mean mixing weight"],
            [(key, row["nll"], row["nll_sem"], row.get("nll_standard_minus_rme", ""),
              row.get("nll_standard_minus_rme_sem", ""), row.get("smallest_mean_weight", ""))
             for key, row in data["rows"].items()])
        body.append("")
    body.append(f"Settings: {settings}.")
    common.write_results(args, result, title="RME's barrier C chosen on held-out images", body=body, started=started)
    return result


if __name__ == "__main__":
    main()
