"""Refining a frozen, well-trained VAE: how much of its amortization gap the learned optimizer closes, and whether
more steps keep helping.

The user's path the library advertises first: a VAE trained the usual way (the paper's binarized-MNIST model,
784-512-512-64, highway ELU, trained as a standard VAE on all 50k training images, Adam 1e-3, batch 100), then
frozen; an ``IterativeInferenceOptimizer`` is trained on top of it (the VAE's weights do not change), for whole
epochs within half the VAE's training time (epochs × its median epoch time):

* from the VAE's encoder (``init="encoder"``) and
* from the prior (``init="prior"``),

everything else the library's defaults (:data:`CONFIGS`).

Measured on the first ``--test-size`` test images, every final ELBO with ``--elbo-samples`` samples:

* ``gap_nats``: best of an lr grid of ``--estep-steps``-step Adam E-steps from the encoder minus the encoder;
* ``gap_closed_T5`` / ``gap_closed_T20`` per init: (ELBO after T learned steps − encoder) / gap;
* ``elbo_by_steps`` per init: the mean ELBO after T = 0, 1, 2, 5, 10, 20, 50, 200 learned steps;
* ``elbo_by_steps_last_iterate``: the same with ``averaging=None`` (the last iterate instead of the default
  running average of the iterates after the trained steps);
* ELBO versus seconds against the best-lr SGD, momentum, RMSProp and Adam E-steps from the encoder (the estimate
  each method returns, scored at checkpoint steps with ``--curve-samples`` samples on the same evaluation noise for
  all; per-step cost timed interleaved in one process, medians; linear interpolation between checkpoints), and
  ``beats_best_optimizer_at_equal_time``: ahead at every budget up to the time of ``--estep-steps`` Adam steps;
* the same per second with one sample per step at test time (the same trained optimizer; its step then costs
  about what an E-step does): ``one_sample_at_test_time`` per init.

``--dataset fashion-mnist`` repeats everything on dynamically binarized Fashion-MNIST (a dataset the defaults
were not tuned on). Trained models are cached under ``--checkpoint-dir``; training resumes when interrupted.

Usage::

    python benchmarks/frozen_refinement.py --data-path ../shared/data
    python benchmarks/frozen_refinement.py --data-path ../shared/data --dataset fashion-mnist
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

from learned_inference import GradientEStep, IterateAveraging, IterativeInferenceOptimizer, StandardEncoder
from learned_inference.adapters import DecoderModel
from learned_inference.data import binarize, load_binarized_mnist, load_fashion_mnist
from learned_inference.zoo import bernoulli_vae

STEPS = (0, 1, 2, 5, 10, 20, 50, 200)


#: the configurations measured, by init: the library's defaults otherwise
CONFIGS: dict[str, dict[str, Any]] = {"encoder": {"init": "encoder"}, "prior": {"init": "prior"}}
OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any], tuple[float, ...]]] = {
    "adam": (torch.optim.Adam, {}, (0.1, 0.03, 0.01, 0.003, 0.001)),
    "rmsprop": (torch.optim.RMSprop, {}, (0.03, 0.01, 0.003, 0.001)),
    "sgd": (torch.optim.SGD, {}, (0.1, 0.03, 0.01, 0.003, 0.001)),
    "momentum": (torch.optim.SGD, {"momentum": 0.9}, (0.01, 0.003, 0.001, 0.0003)),
}


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", choices=("binarized-mnist", "fashion-mnist"), default="binarized-mnist")
    parser.add_argument("--vae-epochs", type=int, default=20)
    parser.add_argument("--test-size", type=int, default=1000)
    parser.add_argument("--elbo-samples", type=int, default=100)
    parser.add_argument("--estep-steps", type=int, default=500)
    parser.add_argument("--timing-repeats", type=int, default=5)
    parser.add_argument("--curve-samples", type=int, default=10,
                        help="samples of the ELBO at every checkpoint of the ELBO-versus-time curves (common noise)")


def load_data(args: argparse.Namespace) -> tuple[Tensor, Tensor, Any]:
    """(train, test, per-batch transform) for ``args.dataset`` (Fashion-MNIST: dynamic binarization of every
    training batch; its test set binarized once with a fixed seed)."""
    if args.dataset == "binarized-mnist":
        data = load_binarized_mnist(args.data_path)
        return data.train, data.test, None
    data = load_fashion_mnist(args.data_path)
    return data.train, binarize(data.test, generator=torch.Generator().manual_seed(0)), binarize


def train_vae(args: argparse.Namespace, train: Tensor, transform: Any) -> tuple[DecoderModel, float]:
    """The paper's VAE trained as a standard VAE (Adam 1e-3, batch 100) for ``--vae-epochs`` epochs on all of
    ``train``; returns it frozen and its training time as epochs × median epoch seconds (robust to a busy epoch)."""
    torch.manual_seed(args.seed)
    model = bernoulli_vae()
    method = StandardEncoder(model, latent_dim=64)
    method.infer(train[:2], num_steps=0)
    with torch.no_grad():
        model.encode(train[:2])
    config = {"dataset": args.dataset, "model": "bernoulli_vae", "epochs": None, "seed": args.seed, "lr": 1e-3,
              "batch_size": 100, "num_examples": len(train)}
    curves = common.train_resumable(
        method, train, parameters=list(model.parameters()), modules={"model": model}, epochs=args.vae_epochs,
        batch_size=100, lr=1e-3, seed=args.seed, checkpoint=common.checkpoint_file(args, "frozen-vae", config),
        label="VAE", progress=not args.quiet, transform=transform,
    )
    return model.requires_grad_(False), len(curves["seconds"]) * statistics.median(curves["seconds"])


def train_optimizer(
    args: argparse.Namespace, model: DecoderModel, train: Tensor, transform: Any, *, init: str, budget_s: float,
    family: Any = "diagonal_gaussian",
) -> tuple[IterativeInferenceOptimizer, dict[str, list[float]]]:
    """An optimizer with the options of ``CONFIGS[init]`` (and ``family``) trained on top of the frozen ``model`` for
    as many whole epochs as fit in ``budget_s`` (by median epoch time; at least one). Its checkpoint is keyed by the
    VAE it was trained on (dataset, training images, VAE epochs) as well as by its own options."""
    torch.manual_seed(args.seed)
    inference = IterativeInferenceOptimizer(model, latent_dim=64, data_shape=train.shape[1:], family=family,
                                            **CONFIGS[init])
    config = {"dataset": args.dataset, "init": init, "seed": args.seed, "defaults": repr(inference),
              "family": repr(inference.family), "num_examples": len(train), "vae_epochs": args.vae_epochs}
    checkpoint = common.checkpoint_file(args, f"frozen-optimizer-{init}", config)
    epochs = 1
    while True:
        curves = common.train_resumable(
            inference, train, parameters=list(inference.parameters()), modules={"inference": inference},
            epochs=epochs, batch_size=100, lr=1e-3, seed=args.seed, checkpoint=checkpoint,
            label=f"optimizer ({init})", progress=not args.quiet, transform=transform,
        )
        if (epochs + 1) * statistics.median(curves["seconds"]) > budget_s:
            return inference, curves
        epochs += 1


def elbo_by_steps(args: argparse.Namespace, model: DecoderModel, method: Any, x: Tensor) -> dict[int, float]:
    """The mean ``--elbo-samples``-sample ELBO after T steps, for every T in :data:`STEPS` (one seeded run per T)."""
    out = {}
    for steps in STEPS:
        torch.manual_seed(args.seed + 1)
        posterior = method.infer(x, num_steps=steps).posterior
        out[steps] = common.mean_elbo(model, posterior, x, samples=args.elbo_samples, seed=args.seed + 2)
    return out


def e_step_grid(args: argparse.Namespace, model: DecoderModel, x: Tensor, noise: Tensor) -> dict[str, Any]:
    """Every optimizer × lr from the encoder on common noise: one-sample ELBO curves, and the final many-sample
    ELBO of each; the best lr per optimizer by that final ELBO."""
    grid: dict[str, Any] = {}
    for name, (cls, options, rates) in OPTIMIZERS.items():
        runs = {}
        for lr in rates:
            e_step = GradientEStep(model, latent_dim=64, optimizer=cls, lr=lr, optimizer_options=options,
                                   num_steps=args.estep_steps, init="encoder")
            result = e_step.infer(x, noise=noise)
            final = common.mean_elbo(model, result.posterior, x, samples=args.elbo_samples, seed=args.seed + 2)
            runs[str(lr)] = {"curve": result.elbo.mean(1).nan_to_num(nan=-1e30, neginf=-1e30).tolist(),
                             "final": final if final == final else -1e30}
        best = max(runs, key=lambda lr: runs[lr]["final"])
        grid[name] = {"runs": runs, "best_lr": float(best), "best_final": runs[best]["final"]}
    return grid


def plot(args: argparse.Namespace, curves: dict[str, list[float]], timings: dict[str, dict[str, float]],
         encoder: float, steps: list[int]) -> list[str]:
    plt = common.pyplot()
    files = []
    for axis in ("steps", "seconds"):
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, curve in curves.items():
            t = timings[name]
            xs = steps if axis == "steps" else [t["t0_s"] + i * t["step_s"] for i in steps]
            ax.plot(xs, curve, label=name)
        ax.axhline(encoder, color="grey", linestyle="--", label="encoder")
        ax.set(xscale="symlog" if axis == "steps" else "log", xlabel="inference steps" if axis == "steps" else
               "seconds", ylabel=f"test ELBO (nats, mean of {args.curve_samples}-sample estimates)",
               title=f"Frozen VAE ({args.dataset}): ELBO vs {axis}")
        ax.set_ylim(bottom=encoder - 3, top=max(max(c) for c in curves.values()) + 0.5)
        ax.legend(fontsize=7)
        files.append(common.save_figure(args, fig, axis))
    return files


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark (see the module docstring) and writes its results; returns the JSON content."""
    args = common.parse_args("frozen_refinement", __doc__.splitlines()[0], argv=argv, extra=_options)
    if args.dataset != "binarized-mnist":
        args.name = f"frozen_refinement_{args.dataset.replace('-', '_')}"
    started = common.setup(args)
    train, test, transform = load_data(args)
    if args.scale == "smoke":  # a functional test of the script: a tiny VAE run and evaluation
        train, args.vae_epochs, args.test_size, args.estep_steps = train[:1000], 1, 20, 5
        args.elbo_samples, args.timing_repeats = 2, 1
    x = test[: args.test_size]
    model, vae_seconds = train_vae(args, train, transform)
    encoder_method = StandardEncoder(model, latent_dim=64)
    encoder = common.mean_elbo(model, encoder_method.infer(x).posterior, x, samples=args.elbo_samples,
                               seed=args.seed + 2)
    max_steps = max(args.estep_steps, max(STEPS))
    noise = torch.randn(max_steps + 1, 1, len(x), 64, generator=torch.Generator().manual_seed(args.seed + 3))
    grid = e_step_grid(args, model, x, noise[: args.estep_steps + 1])
    converged = grid["adam"]["best_final"]
    gap = converged - encoder
    per_init: dict[str, Any] = {}
    methods: dict[str, Any] = {f"{name} (lr {g['best_lr']})": GradientEStep(
        model, latent_dim=64, optimizer=OPTIMIZERS[name][0], optimizer_options=OPTIMIZERS[name][1],
        lr=g["best_lr"], init="encoder") for name, g in grid.items()}
    steps = common.checkpoints(max_steps)
    curves = {label: common.estimate_curve(model, method, x, noise=noise[: steps[-1] + 1], steps=steps,
                                           samples=args.curve_samples, seed=args.seed + 4)
              for label, method in methods.items()}
    adam = methods[next(label for label in methods if label.startswith("adam"))]
    averaged_adam = copy.deepcopy(adam)
    averaged_adam.averaging = IterateAveraging(start=5)
    averaged_run = averaged_adam.infer(x, num_steps=args.estep_steps, noise=noise[: args.estep_steps + 1])
    averaged_posterior = averaged_run.posterior
    adam_averaged_final = common.mean_elbo(model, averaged_posterior, x, samples=args.elbo_samples, seed=args.seed + 2)
    for init in CONFIGS:
        inference, training = train_optimizer(args, model, train, transform, init=init, budget_s=vae_seconds / 2)
        by_steps = elbo_by_steps(args, model, inference, x)
        last_iterate = copy.deepcopy(inference)
        last_iterate.averaging = None
        later = [by_steps[t] for t in STEPS if t >= 10]
        per_init[init] = {
            "elbo_by_steps": by_steps, "elbo_by_steps_last_iterate": elbo_by_steps(args, model, last_iterate, x),
            "training_seconds": sum(training["seconds"]), "training_epochs": len(training["seconds"]),
            "gap_closed_T5": (by_steps[5] - encoder) / gap, "gap_closed_T20": (by_steps[20] - encoder) / gap,
            "more_steps_never_hurt": min(later) >= by_steps[5] - 0.05 and min(by_steps.values()) >= by_steps[0],
        }
        paired = noise if inference.num_samples == 1 else torch.cat([noise, -noise], 1)  # its antithetic pairs
        methods[f"learned ({init})"] = inference
        curves[f"learned ({init})"] = common.estimate_curve(model, inference, x, noise=paired[: steps[-1] + 1],
                                                            steps=steps, samples=args.curve_samples,
                                                            seed=args.seed + 4)
        one_sample = copy.deepcopy(inference)
        one_sample.num_samples, one_sample.antithetic = 1, False
        methods[f"learned ({init}, one sample)"] = one_sample
        curves[f"learned ({init}, one sample)"] = common.estimate_curve(
            model, one_sample, x, noise=noise[: steps[-1] + 1], steps=steps, samples=args.curve_samples,
            seed=args.seed + 4)
    timings = common.time_methods(methods, x, steps=20, repeats=args.timing_repeats)
    optimizer_curves = {label: curve for label, curve in curves.items() if not label.startswith("learned")}
    for init in CONFIGS:
        beats, window = common.beats_at_equal_time(curves[f"learned ({init})"], optimizer_curves, timings,
                                                   candidate=f"learned ({init})", steps=steps)
        per_init[init]["beats_best_optimizer_at_equal_time"] = beats
        per_init[init]["equal_time_window_s"] = window
        label = f"learned ({init}, one sample)"
        beats, window = common.beats_at_equal_time(curves[label], optimizer_curves, timings, candidate=label,
                                                   steps=steps)
        per_init[init]["one_sample_at_test_time"] = {
            "beats_best_optimizer_at_equal_time": beats, "equal_time_window_s": window,
            "elbo_by_steps_curve": {t: curves[label][steps.index(t)] for t in STEPS if t in steps}}
    plots = plot(args, curves, timings, encoder, steps)
    result = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "gap_closed_T5": per_init["encoder"]["gap_closed_T5"], "gap_closed_T20": per_init["encoder"]["gap_closed_T20"],
        "beats_best_optimizer_at_equal_time": per_init["encoder"]["beats_best_optimizer_at_equal_time"],
        "vae_training_seconds": vae_seconds, "encoder_elbo": encoder, "best_estep": grid["adam"]["best_lr"],
        "best_estep_elbo": converged, "gap_nats": gap, "per_init": per_init, "timings": timings,
        "e_steps": {name: {"best_lr": g["best_lr"], "best_final": g["best_final"]} for name, g in grid.items()},
        "curve_steps": steps, "curves": curves, "adam_best_lr_averaged_from_step_5": adam_averaged_final,
        "configs": CONFIGS, "defaults": repr(IterativeInferenceOptimizer(model, latent_dim=64)),
    }
    rows = [[init, *[r["elbo_by_steps"][t] for t in STEPS], r["gap_closed_T5"], r["gap_closed_T20"],
             r["more_steps_never_hurt"], r["beats_best_optimizer_at_equal_time"], r["training_seconds"]]
            for init, r in per_init.items()]
    body = [
        f"Frozen VAE trained {args.vae_epochs} epochs on {len(train)} {args.dataset} images ({vae_seconds:.0f} s); "
        f"{len(x)} test images, final ELBOs with {args.elbo_samples} samples. Encoder {encoder:.2f} nats; best "
        f"{args.estep_steps}-step Adam E-step {converged:.2f} (lr {grid['adam']['best_lr']}): gap {gap:.2f} nats. "
        "Optimizers: the library's default options (update 'gated_then_natural_gradient', an antithetic pair of "
        "samples per step, T = 5 training steps; beyond step 5 the run returns the polynomial-decay average of its "
        "iterates, `IterateAveraging()`), from the encoder and from the prior.",
        "",
        *common.table(["init", *[f"T={t}" for t in STEPS], "gap closed T5", "gap closed T20", "more steps never hurt",
                       "ahead at equal time", "training s"], rows),
        "",
        "The last iterate instead (`averaging=None`): " + "; ".join(
            f"{init} " + ", ".join(f"T={t} {r['elbo_by_steps_last_iterate'][t]:.2f}" for t in STEPS if t >= 10)
            for init, r in per_init.items()) + f". The same averaging (from step 5) on the best Adam run ends at "
        f"{adam_averaged_final:.2f} (its last iterate: {grid['adam']['best_final']:.2f}).",
        "Best-lr E-steps from the encoder (final ELBO after the full run): "
        + ", ".join(f"{name} lr {g['best_lr']}: {g['best_final']:.2f}" for name, g in grid.items()) + ".",
        "Per-step cost (median, s): " + ", ".join(f"{n} {t['step_s']:.4f}" for n, t in timings.items()) + ".",
        "With one sample per step at test time (the same trained optimizers), ahead at equal time: "
        + ", ".join(f"{init} {r['one_sample_at_test_time']['beats_best_optimizer_at_equal_time']}"
                    for init, r in per_init.items()) + ".",
    ]
    common.write_results(args, result, title=f"Refining a frozen VAE ({args.dataset})", body=body, started=started,
                         plots=plots)
    return result


if __name__ == "__main__":
    main()
