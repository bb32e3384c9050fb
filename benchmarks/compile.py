"""Where ``torch.compile`` pays: training-step and test-time inference time, eager vs compiled, by batch size.

Variants, each on its own copy of the same model and update network (same weights):

* ``eager``: no compilation;
* ``network``: ``inference.network.compile()`` (the update network only; state-dict keys unchanged);
* ``whole``: ``inference.compile()`` (the whole training forward: the per-step ELBO and its λ-gradient through
  ``torch.func``, the encodings, network and update; Dynamo breaks the graph at ``torch.autograd.grad`` and at
  data-dependent checks and compiles the pieces).

``model.decoder.compile()`` alone is not a variant: the decoder runs inside ``torch.func.grad_and_value``, where
the compiled module falls back to eager (Dynamo captures no graph there), so it changes nothing.

Protocol (DESIGN.md section 5): the variants are interleaved in one process (round r runs every variant once, in
an order that rotates with r), after warm-up calls that include compilation (its time is reported separately);
the median and the interquartile range of the per-call wall time are reported, with speed-ups as median ratios.

Usage::

    python benchmarks/compile.py --threads 1 --repeats 9 --out benchmarks/results/compile.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from learned_inference import DecoderModel, IterativeInferenceOptimizer, ModelWithInference

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

LATENT, DATA, HIDDEN, STEPS = 32, 784, 256, 5
VARIANTS = ("eager", "network", "whole")


def build(variant: str, template: tuple[DecoderModel, IterativeInferenceOptimizer]):
    """A copy of the template model and optimizer, compiled as the variant says."""
    twin = copy.deepcopy(ModelWithInference(template[1]))  # one deepcopy: the copy uses the copied model
    model, inference = twin.model, twin.inference
    if variant == "network":
        inference.network.compile()
    elif variant == "whole":
        inference.compile()
    return model, inference


def template(x: torch.Tensor) -> tuple[DecoderModel, IterativeInferenceOptimizer]:
    torch.manual_seed(0)
    decoder = torch.nn.Sequential(
        torch.nn.Linear(LATENT, HIDDEN), torch.nn.ELU(), torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.ELU(),
        torch.nn.Linear(HIDDEN, DATA),
    )
    model = DecoderModel(decoder, likelihood="bernoulli", latent_dim=LATENT)
    inference = IterativeInferenceOptimizer(model, latent_dim=LATENT, num_steps=STEPS, hidden_size=HIDDEN)
    inference.infer(x[:1], num_steps=0)  # size the lazy layer before copying
    return model, inference


def train_call(model, inference, x, noise) -> Callable[[], None]:
    params = [*model.parameters(), *inference.parameters()]

    def call() -> None:
        for p in params:
            p.grad = None
        inference(x, noise=noise).loss.backward()

    return call


def infer_call(model, inference, x, noise) -> Callable[[], None]:
    return lambda: inference.infer(x, noise=noise)


def timed(call: Callable[[], None]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def summary(times: list[float]) -> dict[str, float]:
    q = statistics.quantiles(times, n=4)
    return {"median_s": statistics.median(times), "q1_s": q[0], "q3_s": q[2], "min_s": min(times),
            "max_s": max(times)}


def measure(batch: int, mode: str, repeats: int, warmup: int) -> dict[str, object]:
    generator = torch.Generator().manual_seed(batch)
    x = torch.bernoulli(torch.full((batch, DATA), 0.3), generator=generator)
    noise = torch.randn(STEPS + 1, 1, batch, LATENT, generator=generator)
    base = template(x)
    make = train_call if mode == "train" else infer_call
    variants = VARIANTS if mode == "train" else ("eager", "network")  # infer() is not forward: whole = eager
    calls = {v: make(*build(v, base), x, noise) for v in variants}
    first = {v: timed(calls[v]) for v in variants}  # includes compilation
    for _ in range(warmup - 1):
        for v in variants:
            calls[v]()
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(repeats):
        order = variants[r % len(variants):] + variants[: r % len(variants)]
        for v in order:
            times[v].append(timed(calls[v]))
    stats = {v: {**summary(times[v]), "first_call_s": first[v]} for v in variants}
    eager = stats["eager"]["median_s"]
    for v in variants:
        stats[v]["speedup_vs_eager"] = eager / stats[v]["median_s"]
    return {"batch": batch, "mode": mode, "variants": stats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 256, 2048])
    parser.add_argument("--modes", nargs="+", default=["train", "infer"], choices=["train", "infer"])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--device", default="cpu", help="torch's default device for the run, e.g. cuda (default cpu)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.device != "cpu":
        torch.set_default_device(args.device)
    results = []
    for mode in args.modes:
        for batch in args.batches:
            result = measure(batch, mode, args.repeats, args.warmup)
            results.append(result)
            cells = ", ".join(
                f"{v} {s['median_s'] * 1e3:.1f} ms [{s['q1_s'] * 1e3:.1f}, {s['q3_s'] * 1e3:.1f}] "
                f"x{s['speedup_vs_eager']:.2f} (first {s['first_call_s']:.1f} s)"
                for v, s in result["variants"].items()
            )
            print(f"{mode} B={batch}: {cells}", flush=True)
    record = {
        "command": "python benchmarks/compile.py " + " ".join(
            f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(args).items() if v
        ),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "threads": args.threads,
                    "cpus": os.cpu_count()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "scale": "full",  # the script has one scale; --batches, --modes and --repeats are in the command
        **common.provenance(),
        "model": {"latent": LATENT, "data": DATA, "hidden": HIDDEN, "num_steps": STEPS},
        "results": results,
    }
    if args.out is not None:
        args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
