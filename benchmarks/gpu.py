"""Throughput on one GPU: training steps (standard VAE vs iterative T = 5) and test-time refinement steps (learned
vs Adam), at batch 128 and 1024, in fp32, TF32 and bf16 autocast, with peak memory.

The reference model of the benchmark protocol (binarized-MNIST shape: 784-512-512-64, ELU highway networks,
Bernoulli likelihood, N(0, I) prior). Speed does not depend on the pixel values, so the data are random bits
(Bernoulli(0.2), about MNIST's ink density) on the device: no data file is read, and nothing is trained to
convergence (the networks keep their initial weights; the optimizers step with learning rate 0, so every repeat
times the same computation).

Measured per (precision, batch), interleaved (the variants alternate within each repeat; the first repeat is the
warm-up), with ``torch.cuda.synchronize()`` around every timed call; medians and spreads of:

* a **training step** (forward, ``loss.backward()``, optimizer step): the standard VAE (its encoder, one ELBO
  evaluation) and the iterative model with T = 5 learned steps (``IterativeInferenceOptimizer``);
* a **test-time refinement step**: ``infer(x, num_steps=20)`` minus ``infer(x, num_steps=0)``, over 20, for the
  learned step and for an Adam E-step (``GradientEStep``);
* peak memory (``torch.cuda.max_memory_allocated``) of each variant's call.

The issue's targets are recorded as booleans: a T = 5 training step at most 3 times a standard one at batch 1024,
and a learned test step at most 1.3 times an Adam step. On a CPU (``--device cpu``) the script runs too (the
smoke test does), with no memory figures and no TF32.

Run on the GPU machine: ``python benchmarks/gpu.py --device cuda`` (about 2 minutes on one H100); writes
``benchmarks/results/gpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common
from learned_inference import DecoderModel, GradientEStep, IterativeInferenceOptimizer, StandardEncoder
from learned_inference.zoo import bernoulli_vae, highway_decoder

NAME = "gpu"
#: (batch sizes, repeats, hidden units, latent size, data size, refinement steps) per scale
SCALES = {"full": ((128, 1024), 10, 512, 64, 784, 20), "smoke": ((8, 16), 2, 32, 4, 20, 3)}
PRECISIONS = ("fp32", "tf32", "bf16")
TRAIN_STEPS = 5


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def _precision(name: str, device: torch.device) -> Iterator[None]:
    """fp32 (TF32 off), TF32 matmuls and convolutions (CUDA only), or bf16 autocast (TF32 off)."""
    cuda = device.type == "cuda"
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) if cuda else None
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = name == "tf32"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if name == "bf16" else nullcontext()
    try:
        with autocast:
            yield
    finally:
        if saved is not None:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _models(device: torch.device, *, hidden: int, latent: int, data: int) -> dict[str, Any]:
    """The standard VAE and the iterative model (each with its own decoder), and the test-time methods."""
    torch.manual_seed(0)
    vae = bernoulli_vae(data_dim=data, latent_dim=latent, hidden_size=hidden).to(device)
    standard = StandardEncoder(vae, latent_dim=latent, init="encoder").to(device)
    decoder = DecoderModel(highway_decoder(latent_dim=latent, data_dim=data, hidden_size=hidden),
                           likelihood="bernoulli", latent_dim=latent).to(device)
    iterative = IterativeInferenceOptimizer(decoder, latent_dim=latent, num_steps=TRAIN_STEPS,
                                            hidden_size=hidden).to(device)
    adam = GradientEStep(decoder, latent_dim=latent, optimizer=torch.optim.Adam, lr=0.05)
    return {"vae": vae, "standard": standard, "decoder": decoder, "iterative": iterative, "adam": adam}


def _train_step(method: Any, parameters: Sequence[torch.nn.Parameter]) -> Callable[[torch.Tensor], None]:
    optimizer = torch.optim.Adam(parameters, lr=0.0)  # the full update's cost, the same weights every repeat

    def step(x: torch.Tensor) -> None:
        optimizer.zero_grad()
        method(x).loss.backward()
        optimizer.step()
    return step


def _timed(call: Callable[[], Any], device: torch.device) -> tuple[float, int | None]:
    """Seconds of one call (synchronised) and its peak memory in bytes (None on a CPU)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _synchronize(device)
    start = time.perf_counter()
    call()
    _synchronize(device)
    seconds = time.perf_counter() - start
    return seconds, (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None)


def _measure(models: dict[str, Any], x: torch.Tensor, *, precision: str, repeats: int, steps: int,
             device: torch.device) -> dict[str, Any]:
    """Interleaved medians for one (precision, batch)."""
    calls: dict[str, Callable[[], Any]] = {
        "train_standard": lambda: train["standard"](x),
        "train_iterative": lambda: train["iterative"](x),
        "test_learned_0": lambda: models["iterative"].infer(x, num_steps=0),
        "test_learned": lambda: models["iterative"].infer(x, num_steps=steps),
        "test_adam_0": lambda: models["adam"].infer(x, num_steps=0),
        "test_adam": lambda: models["adam"].infer(x, num_steps=steps),
    }
    train = {"standard": _train_step(models["standard"], [*models["vae"].parameters(),
                                                          *models["standard"].parameters()]),
             "iterative": _train_step(models["iterative"], [*models["decoder"].parameters(),
                                                            *models["iterative"].parameters()])}
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    memory: dict[str, int | None] = {}
    names = list(calls)
    with _precision(precision, device):
        for repeat in range(repeats + 1):  # repeat 0 warms up
            for name in names[repeat % len(names):] + names[:repeat % len(names)]:
                duration, peak = _timed(calls[name], device)
                if repeat:
                    seconds[name].append(duration)
                    memory[name] = peak if memory.get(name) is None else max(memory[name] or 0, peak or 0)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    learned_step = max(median["test_learned"] - median["test_learned_0"], 0.0) / steps
    adam_step = max(median["test_adam"] - median["test_adam_0"], 0.0) / steps
    batch = x.shape[0]
    return {
        "examples_per_s": {
            "train_standard": batch / median["train_standard"],
            f"train_iterative_T{TRAIN_STEPS}": batch / median["train_iterative"],
            "test_learned_step": batch / learned_step if learned_step else None,
            "test_adam_step": batch / adam_step if adam_step else None,
        },
        "seconds": {name: {"median": median[name], "min": min(v), "max": max(v)} for name, v in seconds.items()},
        "peak_memory_mb": {name: None if peak is None else round(peak / 2**20, 1) for name, peak in memory.items()},
        "train_ratio": median["train_iterative"] / median["train_standard"],
        "test_step_ratio": learned_step / adam_step if adam_step else None,
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = common.parse_args(NAME, __doc__.splitlines()[0], argv=argv, extra=_options)
    started = common.setup(args)
    device = torch.device(args.device)
    batches, repeats, hidden, latent, data, steps = SCALES[args.scale]
    precisions = [p for p in args.precisions if p != "tf32" or device.type == "cuda"]
    models = _models(device, hidden=hidden, latent=latent, data=data)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    results: dict[str, dict[str, Any]] = {}
    for batch in batches:
        x = torch.bernoulli(torch.full((batch, data), 0.2, device=device), generator=generator)
        models["iterative"].infer(x[:2], num_steps=0)  # sizes the lazy input layers
        models["standard"].infer(x[:2], num_steps=0)
        for precision in precisions:
            results[f"{precision}/batch{batch}"] = _measure(models, x, precision=precision, repeats=repeats,
                                                           steps=steps, device=device)
    largest = max(batches)
    checks = {
        f"train_T{TRAIN_STEPS}_at_most_3x_standard_at_batch{largest}":
            all(r["train_ratio"] <= 3.0 for key, r in results.items() if key.endswith(f"batch{largest}")),
        "learned_test_step_at_most_1.3x_adam":
            all(r["test_step_ratio"] is not None and r["test_step_ratio"] <= 1.3 for r in results.values()),
    }
    body = [f"Device: **{_device_name(device)}**. Reference model {data}-{hidden}-{hidden}-{latent}; T = "
            f"{TRAIN_STEPS} training steps; test steps measured over {steps}; {repeats} interleaved repeats.", ""]
    rows = [[key, f"{r['examples_per_s']['train_standard']:.0f}",
             f"{r['examples_per_s'][f'train_iterative_T{TRAIN_STEPS}']:.0f}", f"{r['train_ratio']:.2f}",
             _fmt(r["examples_per_s"]["test_learned_step"]), _fmt(r["examples_per_s"]["test_adam_step"]),
             _fmt(r["test_step_ratio"], ".2f"), _fmt(r["peak_memory_mb"].get("train_iterative"), ".0f")]
            for key, r in results.items()]
    body += common.table(["precision/batch", "train standard (ex/s)", f"train T={TRAIN_STEPS} (ex/s)",
                          "train ratio", "learned step (ex/s)", "Adam step (ex/s)", "step ratio",
                          f"peak MB (train T={TRAIN_STEPS})"], rows)
    body += ["", "Targets: " + ", ".join(f"{name}: {'met' if ok else 'NOT met'}" for name, ok in checks.items())]
    result = {"device": str(device), "device_name": _device_name(device), "results": results, "checks": checks,
              "config": {"batches": batches, "repeats": repeats, "hidden": hidden, "latent": latent, "data": data,
                         "test_steps": steps, "train_steps": TRAIN_STEPS, "precisions": precisions}}
    common.write_results(args, result, title="Throughput on one GPU", body=body, started=started)
    return result


def _fmt(value: float | None, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


if __name__ == "__main__":
    main()
