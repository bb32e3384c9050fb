"""Shared plumbing of the benchmark scripts: options, metadata, result files, resumable training, plots.

Every benchmark script calls :func:`parse_args` (``--scale smoke|full``, ``--threads``, ``--seed``,
``--data-path``, ``--out``, ``--checkpoint-dir``, ``--quiet``), :func:`setup`, and finally :func:`write_results`,
which writes ``<out>/<name>.json`` (the results plus machine, versions, seed, scale, command, date and commit) and
``<out>/<name>.md`` (a summary whose first line is its only ``#`` heading). Training goes through
:func:`train_resumable`, which checkpoints after every epoch and resumes from the last one when run again with the
same configuration (the checkpoint file name is a hash of the configuration).

Scales: ``smoke`` finishes in well under a minute on one thread (tiny subsets, one or two epochs; for testing
the scripts, not for numbers), ``full`` is sized so the whole suite takes about 35 minutes on a quiet 2-core CPU;
every reduction relative to the paper is recorded in the JSON under ``"settings"`` and in the Markdown.
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from learned_inference.checkpoint import load_checkpoint, save_checkpoint
from learned_inference.encodings import Encoding
from learned_inference.inference import InferenceMethod
from learned_inference.training import fit

__all__ = [
    "RESULTS",
    "History",
    "beats_at_equal_time",
    "checkpoint_file",
    "checkpoints",
    "estimate_curve",
    "importance_scores",
    "load_mnist_subsets",
    "make_method",
    "mean_elbo",
    "median_iqr",
    "metadata",
    "parse_args",
    "provenance",
    "pyplot",
    "save_figure",
    "setup",
    "table",
    "time_methods",
    "train_model",
    "train_resumable",
    "value_at",
    "write_results",
]

RESULTS = Path(__file__).resolve().parent / "results"
SCALES = ("smoke", "full")
DEFAULT_CHECKPOINTS = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "learned_inference" / "bench"


def parse_args(
    name: str,
    description: str,
    *,
    argv: Sequence[str] | None = None,
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.Namespace:
    """The common options of every benchmark (plus ``extra(parser)``'s); ``args.name`` (the result files' name,
    ``name`` unless the script changes it), ``args.script`` (``benchmarks/<name>.py``) and ``args.argv`` are set.

    Raises:
        SystemExit: for invalid options (argparse's message names the option).
    """
    parser = argparse.ArgumentParser(prog=f"benchmarks/{name}.py", description=description)
    parser.add_argument("--scale", choices=SCALES, default="full",
                        help="smoke: tiny and fast (tests the script); full: the recorded benchmark (default)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-path", default=None, help="folder with the data files (default: search paths)")
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help="folder for <name>.json, <name>.md and plots (default benchmarks/results)")
    parser.add_argument("--checkpoint-dir", type=Path, default=DEFAULT_CHECKPOINTS,
                        help=f"training checkpoints, resumed when present (default {DEFAULT_CHECKPOINTS})")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--device", default="cpu",
                        help="where to run, e.g. cuda (default cpu): torch's default device for the run")
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    args.name = name
    args.script = f"benchmarks/{name}.py"
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def setup(args: argparse.Namespace) -> float:
    """Sets the thread count, the seed and the default device (``--device``: tensors and modules the script
    creates land there), creates ``args.out``; returns the start time (``perf_counter``)."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type != "cpu":
        torch.set_default_device(device)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    return time.perf_counter()


def provenance() -> dict[str, Any]:
    """When and from which code a result was produced: ``date`` (local time with zone), ``commit`` (the checkout's
    ``HEAD``, None outside a git checkout) and ``commit_dirty`` (whether tracked files differed from it, so that
    the commit alone does not reproduce the run; None outside a git checkout). Every result file records these."""
    root = Path(__file__).resolve().parent.parent

    def git(*command: str) -> str | None:
        try:
            done = subprocess.run(["git", *command], cwd=root, capture_output=True, text=True, check=True)
        except (OSError, subprocess.CalledProcessError):
            return None
        return done.stdout.strip()

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "commit": commit,
            "commit_dirty": None if status is None else bool(status)}


def metadata(args: argparse.Namespace) -> dict[str, Any]:
    """Machine, versions, seed, scale, threads, the command line (the script that ran, with its options), date and
    commit (:func:`provenance`) of this run."""
    import numpy

    return {
        "benchmark": args.name,
        "command": " ".join(["python", args.script, *args.argv]),
        "scale": args.scale,
        "seed": args.seed,
        "threads": args.threads,
        "device": getattr(args, "device", "cpu"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__},
        **provenance(),
    }


def write_results(
    args: argparse.Namespace, result: dict[str, Any], *, title: str, body: Sequence[str], started: float,
    plots: Sequence[str] = (),
) -> Path:
    """Writes ``<out>/<name>.json`` (``result`` plus :func:`metadata` and the elapsed seconds) and
    ``<out>/<name>.md`` (``# title``, ``body`` lines, the plots, then how it was run); returns the JSON path."""
    meta = metadata(args)
    meta["elapsed_s"] = round(time.perf_counter() - started, 2)
    payload = {**meta, **result}
    path = args.out / f"{args.name}.json"
    path.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    lines = [f"# {title}", "", *body, ""]
    lines += [f"![{p}]({p})" for p in plots]
    if args.scale != "full":
        lines += ["", f"**Scale `{args.scale}`: a functional test of the script, not a measurement.**"]
    lines += ["", f"Command: `{meta['command']}` ({meta['elapsed_s']:.0f} s, {args.threads} threads, seed "
              f"{args.seed}). Machine: {meta['machine']['platform']}, {meta['machine']['cpus']} CPUs; "
              f"Python {meta['versions']['python']}, torch {meta['versions']['torch']}. Raw numbers: "
              f"`{args.name}.json`.", ""]
    (args.out / f"{args.name}.md").write_text("\n".join(lines))
    if not args.quiet:
        print("\n".join(lines))
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """A Markdown table (numbers with 3 decimals, the first column left-aligned)."""
    def cell(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return lines


@dataclass
class History:
    """Learning curves that travel inside a checkpoint (``state_dict`` / ``load_state_dict``)."""

    curves: dict[str, list[float]] = field(default_factory=lambda: {"train_elbo": [], "seconds": []})

    def state_dict(self) -> dict[str, Any]:
        return {"curves": self.curves}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.curves = {k: list(v) for k, v in state["curves"].items()}


def checkpoint_file(args: argparse.Namespace, label: str, config: Mapping[str, Any]) -> Path:
    """``<checkpoint-dir>/<label>-<hash of config>.pt``: a changed configuration starts afresh; benchmarks that
    train the same configuration under the same label share it."""
    digest = hashlib.sha256(json.dumps(dict(config), sort_keys=True, default=str).encode()).hexdigest()[:12]
    return args.checkpoint_dir / f"{label}-{digest}.pt"


def train_resumable(
    method: InferenceMethod,
    data: Tensor,
    *,
    parameters: Sequence[torch.nn.Parameter],
    modules: Mapping[str, Any],
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    checkpoint: Path | None,
    label: str,
    progress: bool,
    transform: Callable[..., Tensor] | None = None,
    max_grad_norm: float | None = None,
) -> dict[str, list[float]]:
    """Trains ``method`` on ``forward(x).loss`` with Adam(``parameters``, ``lr``) for ``epochs`` epochs (epoch e
    shuffles with seed ``seed + e``; gradients clipped to ``max_grad_norm``), saving ``modules``, the optimizer and
    the learning curves to ``checkpoint`` after every epoch and resuming from it when it exists; returns the curves
    (train ELBO, seconds, median and largest gradient norm, per epoch; checkpoints written before the norms were
    recorded lack them).
    The seconds of epochs run before a resume are those recorded then."""
    optim = torch.optim.Adam(parameters, lr=lr)
    history = History()
    objects = {**modules, "optim": optim, "history": history}
    start = 0
    if checkpoint is not None and checkpoint.is_file():
        start = min(load_checkpoint(checkpoint, restore_rng=True, **objects)["step"], epochs)
        if progress:
            print(f"{label}: resumed from {checkpoint} at epoch {start}", file=sys.stderr)
    bar = tqdm(range(start, epochs), desc=f"training {label}", disable=not progress, initial=start, total=epochs)
    for epoch in bar:
        epoch_history = fit(method, data, epochs=1, optimizer=optim, batch_size=batch_size, seed=seed + epoch,
                            progress=False, transform=transform, max_grad_norm=max_grad_norm)
        for key in ("train_elbo", "seconds", "grad_norm", "grad_norm_max"):
            history.curves.setdefault(key, []).extend(getattr(epoch_history, key))
        bar.set_postfix(train_elbo=f"{history.curves['train_elbo'][-1]:.2f}")
        if checkpoint is not None:
            save_checkpoint(checkpoint, step=epoch + 1, **objects)
    return history.curves


def load_mnist_subsets(args: argparse.Namespace, *, num_train: int, num_test: int) -> tuple[Tensor, Tensor]:
    """The first ``num_train`` / ``num_test`` examples of statically binarized MNIST's train / test splits."""
    from learned_inference.data import load_binarized_mnist

    data = load_binarized_mnist(args.data_path)
    for option, value, available in (("num_train", num_train, len(data.train)),
                                     ("num_test", num_test, len(data.test))):
        if not 1 <= value <= available:
            raise ValueError(f"{option} must be in 1..{available}, got {value}")
    return data.train[:num_train], data.test[:num_test]


def pyplot() -> Any:
    """matplotlib's pyplot with the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(args: argparse.Namespace, fig: Any, suffix: str | None = None) -> str:
    """Saves ``fig`` as ``<out>/<name>_<suffix>.png`` (``<out>/<name>.png`` without a suffix) and closes it;
    returns the file name."""
    name = f"{args.name}.png" if suffix is None else f"{args.name}_{suffix}.png"
    fig.tight_layout()
    fig.savefig(args.out / name, dpi=120)
    pyplot().close(fig)
    return name


def standard_error(values: Tensor) -> float:
    """Standard error of the mean of ``values`` (one per test example): sample standard deviation / √n."""
    return (values.std() / len(values) ** 0.5).item()


def median_iqr(values: Sequence[float]) -> dict[str, float]:
    """Median, quartiles and extremes of ``values``."""
    t = torch.tensor(list(values), dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
    return {"median": q[1], "q25": q[0], "q75": q[2], "min": t.min().item(), "max": t.max().item(), "n": len(t)}


def make_method(
    model: Any, *, kind: str, latent_dim: int, hidden_size: int, num_steps: int = 5,
    encoding: Sequence[str | Encoding] = ("gradient", "data", "params"),
) -> InferenceMethod:
    """``"standard"``: the model's own encoder (one pass); ``"encoder-only"``: a new highway encoder for a given
    decoder; ``"iterative"``: an iterative inference model with ``encoding`` and ``num_steps`` steps."""
    from learned_inference.baselines import StandardEncoder
    from learned_inference.optimizer import IterativeInferenceOptimizer

    if kind == "standard":
        return StandardEncoder(model, latent_dim=latent_dim, init="encoder")
    if kind == "encoder-only":
        return StandardEncoder(model, latent_dim=latent_dim, init="highway", hidden_size=hidden_size)
    if kind == "iterative":
        return IterativeInferenceOptimizer(model, latent_dim=latent_dim, num_steps=num_steps, hidden_size=hidden_size,
                                           encoding=tuple(encoding))
    raise ValueError(f"kind must be 'standard', 'encoder-only' or 'iterative', got {kind!r}")


def train_model(
    args: argparse.Namespace, model: torch.nn.Module, method: InferenceMethod, data: Tensor, *, label: str,
    config: Mapping[str, Any], epochs: int, batch_size: int, lr: float, train_model_parameters: bool = True,
    transform: Callable[..., Tensor] | None = None, max_grad_norm: float | None = None,
) -> dict[str, list[float]]:
    """Trains ``method`` (and ``model`` unless ``train_model_parameters`` is False: a fixed decoder) with
    :func:`train_resumable`, checkpointed under ``--checkpoint-dir`` by ``label`` and a hash of ``config``."""
    method.infer(data[:2], num_steps=0)  # sizes lazy layers before the optimizer sees them
    if getattr(model, "encoder", None) is not None:  # an encoder that the method does not use is sized too
        with torch.no_grad():
            model.encode(data[:2])
    parameters = [*method.parameters()]
    if train_model_parameters:
        parameters = [*model.parameters(), *parameters]
    full_config = {**config, "label": label, "epochs_seed": args.seed, "batch_size": batch_size, "lr": lr,
                   "num_examples": len(data), **({} if max_grad_norm is None else {"max_grad_norm": max_grad_norm})}
    return train_resumable(
        method, data, parameters=parameters, modules={"model": model, "method": method}, epochs=epochs,
        batch_size=batch_size, lr=lr, seed=args.seed, label=label, progress=not args.quiet, transform=transform,
        max_grad_norm=max_grad_norm, checkpoint=checkpoint_file(args, label, {**full_config, "epochs": None}),
    )


@torch.no_grad()
def importance_scores(model: Any, method: InferenceMethod, x: Tensor, *, num_steps: int, samples: int,
                      seed: int) -> tuple[Tensor, Tensor]:
    """Per-example log p(x) (importance sampling) and ELBO, both from ``samples`` samples of the posterior that
    ``method`` infers in ``num_steps`` steps (seeded)."""
    from learned_inference.evaluation import elbo_estimate, importance_weighted_log_marginal

    torch.manual_seed(seed)
    posterior = method.infer(x, num_steps=num_steps).posterior
    chunk = min(samples, 100)
    return (importance_weighted_log_marginal(model, posterior, x, num_samples=samples, chunk_size=chunk),
            elbo_estimate(model, posterior, x, num_samples=samples, chunk_size=chunk))


@torch.no_grad()
def mean_elbo(model: Any, posterior: Any, x: Tensor, *, samples: int, seed: int) -> float:
    """The mean over ``x`` of ``samples``-sample ELBOs of ``posterior`` (seeded: the same noise for posteriors of the
    same shape)."""
    from learned_inference.evaluation import elbo_estimate

    torch.manual_seed(seed)
    return elbo_estimate(model, posterior, x, num_samples=samples, chunk_size=min(samples, 50)).mean().item()


def checkpoints(max_steps: int) -> list[int]:
    """The steps at which ELBO-versus-time curves are scored: every step to 20, every 5th to 100, then every 10th
    (and ``max_steps``)."""
    steps = {*range(0, 21), *range(20, 101, 5), *range(100, max_steps + 1, 10), max_steps}
    return sorted(t for t in steps if t <= max_steps)


def estimate_curve(model: Any, method: InferenceMethod, x: Tensor, *, noise: Tensor, steps: Sequence[int],
                   samples: int, seed: int) -> list[float]:
    """The mean ``samples``-sample ELBO (seeded: the same evaluation noise for every method and step) of the
    estimate ``method`` returns after each of ``steps`` (one run on ``noise``): its iterate, or its running average
    of the iterates where it averages (:class:`~learned_inference.engine.IterateAveraging`)."""
    run = method.infer(x, num_steps=steps[-1], noise=noise, record_params=True)
    assert run.trajectory is not None
    estimates = method.estimates(run.trajectory)
    return [mean_elbo(model, method.family.distribution(estimates[t]), x, samples=samples, seed=seed) for t in steps]


def time_methods(methods: dict[str, InferenceMethod], x: Tensor, *, steps: int, repeats: int) -> dict[str, dict]:
    """Interleaved timing of ``infer`` with 0 and ``steps`` steps: medians of t0 and of the per-step time."""
    samples: dict[str, dict[str, list[float]]] = {name: {"t0": [], "step": []} for name in methods}
    names = list(methods)
    for repeat in range(repeats + 1):  # the first round is the warm-up
        order = names[repeat % len(names):] + names[:repeat % len(names)]
        for name in order:
            durations = []
            for num_steps in (0, 0 if name == "encoder" else steps):
                start = time.perf_counter()
                methods[name].infer(x, num_steps=num_steps)
                durations.append(time.perf_counter() - start)
            if repeat > 0:
                samples[name]["t0"].append(durations[0])
                samples[name]["step"].append(max(durations[1] - durations[0], 0.0) / steps)
    return {name: {"t0_s": statistics.median(s["t0"]), "step_s": statistics.median(s["step"]),
                   "step_s_spread": [min(s["step"]), max(s["step"])]} for name, s in samples.items()}


def value_at(curve: Sequence[float], timing: dict[str, float], budget: float,
             steps: Sequence[int] | None = None) -> float:
    """The ELBO reached within ``budget`` seconds (-inf before the start is done): of the last step completed for a
    curve with a value per step, linearly interpolated between the checkpoint steps ``steps`` where given (the
    curve's values are at the first ``len(curve)`` of those steps, the first one 0)."""
    if budget < timing["t0_s"]:
        return float("-inf")
    if timing["step_s"] <= 0:
        return curve[-1]
    done = (budget - timing["t0_s"]) / timing["step_s"]
    if steps is None:
        return curve[min(int(done), len(curve) - 1)]
    steps = steps[: len(curve)]
    if done >= steps[-1]:
        return curve[-1]
    after = bisect.bisect_right(steps, done)
    (s0, v0), (s1, v1) = (steps[after - 1], curve[after - 1]), (steps[after], curve[after])
    return v0 + (v1 - v0) * (done - s0) / (s1 - s0)


def beats_at_equal_time(iterative: Sequence[float], optimizers: dict[str, Sequence[float]],
                        timings: dict[str, dict[str, float]], *, grid: int = 400,
                        candidate: str = "iterative", steps: Sequence[int] | None = None) -> tuple[bool, list[float]]:
    """Whether the ``candidate``'s curve (``iterative``, timed as ``timings[candidate]``) is strictly above every
    optimizer curve at every budget of the grid, up to the longest optimizer run; returns (wins, [first, last]).
    With ``steps``, every curve holds the values at those checkpoint steps (see :func:`value_at`)."""
    it = timings[candidate]
    last = (lambda c: len(c) - 1) if steps is None else (lambda c: steps[len(c) - 1])
    horizon = max(timings[n]["t0_s"] + last(c) * timings[n]["step_s"] for n, c in optimizers.items())
    first = it["t0_s"] + it["step_s"]
    budgets = [first + (horizon - first) * i / (grid - 1) for i in range(grid)] if horizon > first else [first]
    wins = all(value_at(iterative, it, b, steps) > value_at(curve, timings[n], b, steps)
               for b in budgets for n, curve in optimizers.items())
    return wins, [first, horizon]
