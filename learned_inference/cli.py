"""The ``learned-inference`` command: ``demo``, ``train`` and ``bench``.

* ``learned-inference demo``: trains a standard VAE and an iterative-inference VAE (same decoder) on the embedded
  binarized digits (no files, no network), prints a table and writes a report folder with plots.
  ``--data binarized-mnist --path ../shared/data`` (or ``mnist``, ``fashion-mnist``) runs it on real data.
* ``learned-inference train``: trains an iterative-inference VAE and checkpoints every epoch; run it again with
  the same ``--checkpoint`` to resume.
* ``learned-inference bench NAME``: runs ``benchmarks/NAME.py`` of a source checkout.

Example:
    >>> from learned_inference.cli import build_parser
    >>> build_parser().parse_args(["demo", "--epochs", "3"]).epochs
    3
"""

from __future__ import annotations

import argparse
import runpy
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from learned_inference.adapters import DecoderModel
from learned_inference.checkpoint import load_checkpoint, save_checkpoint
from learned_inference.data import (
    Splits,
    binarize,
    load_binarized_mnist,
    load_digits,
    load_fashion_mnist,
    load_mnist,
)
from learned_inference.demo import run_demo
from learned_inference.optimizer import IterativeInferenceOptimizer
from learned_inference.training import fit
from learned_inference.zoo import highway_decoder

__all__ = ["build_parser", "load_named_data", "main"]

DATASETS: dict[str, Callable[[str | None], Splits]] = {
    "digits": lambda path: load_digits(),
    "binarized-mnist": load_binarized_mnist,
    "mnist": load_mnist,
    "fashion-mnist": load_fashion_mnist,
}


def load_named_data(name: str, path: str | None) -> tuple[Splits, Callable[..., Tensor] | None]:
    """The dataset called ``name`` and the per-batch transform it needs (dynamic binarization for grey images)."""
    data = DATASETS[name](path)
    return data, (binarize if name in ("mnist", "fashion-mnist") else None)


def _demo(args: argparse.Namespace) -> int:
    data, transform = load_named_data(args.data, args.path)
    if transform is not None:  # evaluate on one fixed binarization of the test set
        data = Splits(train=data.train, test=transform(data.test, generator=torch.Generator().manual_seed(0)))
    test = data.test if args.test_size is None else data.test[: args.test_size]
    data = Splits(train=data.train, test=test, valid=data.valid)
    run_demo(
        data, data_name=args.data, epochs=args.epochs, num_steps=args.steps, latent_dim=args.latent_dim,
        hidden_size=args.hidden_size, seed=args.seed, eval_samples=args.eval_samples, report_dir=args.report,
        progress=not args.quiet, transform=transform, command="learned-inference " + " ".join(args.argv),
        device=args.device,
    )
    return 0


def _train(args: argparse.Namespace) -> int:
    data, transform = load_named_data(args.data, args.path)
    torch.manual_seed(args.seed)
    dim = data.train.shape[1]
    device = torch.device(args.device)
    model = DecoderModel(highway_decoder(latent_dim=args.latent_dim, data_dim=dim, hidden_size=args.hidden_size),
                         likelihood="bernoulli", latent_dim=args.latent_dim).to(device)
    inference = IterativeInferenceOptimizer(model, latent_dim=args.latent_dim, num_steps=args.steps,
                                            hidden_size=args.hidden_size).to(device)
    inference.infer(data.train[:2].to(device), num_steps=0)  # sizes the lazy input layer before the optimizer sees it
    optim = torch.optim.Adam([*model.parameters(), *inference.parameters()], lr=args.lr)
    checkpoint = Path(args.checkpoint)
    start = 0
    if checkpoint.is_file():
        start = load_checkpoint(checkpoint, restore_rng=True, model=model, inference=inference, optim=optim)["step"]
        print(f"resumed from {checkpoint} at epoch {start}")
    for epoch in range(start, args.epochs):
        history = fit(inference, data.train, epochs=1, optimizer=optim, batch_size=args.batch_size,
                      seed=args.seed + epoch, progress=not args.quiet, label=f"epoch {epoch + 1}", transform=transform,
                      device=device)
        save_checkpoint(checkpoint, step=epoch + 1, model=model, inference=inference, optim=optim)
        print(f"epoch {epoch + 1}/{args.epochs}: train ELBO {history.train_elbo[0]:.3f} "
              f"({history.seconds[0]:.1f} s), checkpoint {checkpoint}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    candidates = [Path.cwd() / "benchmarks", Path(__file__).resolve().parents[1] / "benchmarks"]
    for folder in candidates:
        script = folder / f"{args.name}.py"
        if script.is_file():
            sys.argv = [str(script), *args.options]
            runpy.run_path(str(script), run_name="__main__")
            return 0
    available = sorted({p.stem for f in candidates if f.is_dir() for p in f.glob("*.py")})
    raise SystemExit(f"no benchmark named {args.name!r} in {[str(c) for c in candidates]}; "
                     f"available: {available or 'none (benchmarks ship with a source checkout)'}")


def _add_data_options(parser: argparse.ArgumentParser, *, epochs: int, latent_dim: int, hidden_size: int) -> None:
    parser.add_argument("--data", choices=sorted(DATASETS), default="digits",
                        help="dataset (default: the embedded binarized digits)")
    parser.add_argument("--path", default=None, help="file or folder with the data (default: search paths)")
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--steps", type=int, default=5, help="inference steps T (default 5)")
    parser.add_argument("--latent-dim", type=int, default=latent_dim)
    parser.add_argument("--hidden-size", type=int, default=hidden_size)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--device", default="cpu", help="where to train, e.g. cuda or cuda:1 (default cpu)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``learned-inference`` command."""
    parser = argparse.ArgumentParser(prog="learned-inference", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="standard vs iterative VAE, with a report folder")
    _add_data_options(demo, epochs=100, latent_dim=8, hidden_size=64)
    demo.add_argument("--eval-samples", type=int, default=1000, help="importance samples for -log p(x)")
    demo.add_argument("--test-size", type=int, default=None, help="evaluate on the first N test examples")
    demo.add_argument("--report", default="demo-report", help="report folder (default demo-report)")
    train = commands.add_parser("train", help="train an iterative-inference VAE with resumable checkpoints")
    _add_data_options(train, epochs=50, latent_dim=64, hidden_size=512)
    train.add_argument("--checkpoint", default="checkpoint.pt", help="checkpoint file (resumed if it exists)")
    train.add_argument("--batch-size", type=int, default=100)
    train.add_argument("--lr", type=float, default=1e-3)
    bench = commands.add_parser("bench", help="run benchmarks/NAME.py (source checkout)")
    bench.add_argument("name")
    bench.add_argument("options", nargs=argparse.REMAINDER, help="passed to the benchmark script")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``learned-inference`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    return {"demo": _demo, "train": _train, "bench": _bench}[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
