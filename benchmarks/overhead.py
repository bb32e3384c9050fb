"""Overheads: the λ-gradient through ``torch.func`` versus ``torch.autograd.grad``, and training memory versus T.

1. Per-step cost of the λ-gradient. Variant A is :func:`learned_inference.objectives.elbo_and_grad` (what every
   inference method calls: ``torch.func.vjp`` of the per-example ELBO with cotangent 1, under ``torch.no_grad()``
   as at test time). Variant B is the hand-written equivalent: λ leaves that require grad, the same
   :func:`~learned_inference.objectives.elbo`, then ``torch.autograd.grad`` of its sum. Same model (the paper's
   binarized-MNIST decoder 64-512-512-784 with highway layer, Bernoulli, analytic KL), same λ, data and noise;
   both gradients are checked to agree. After a warm-up, A and B are timed alternately (ABBA order) in one
   process; ``func_vs_autograd_ratio`` is median(A) / median(B), reported with quartiles and the median of
   the per-pair ratios.
2. Cost of a training step: one optimizer step (forward, ``loss.backward()``, Adam) of joint training with an
   ``IterativeInferenceOptimizer`` of T = 5 steps versus one step of a standard VAE (``StandardEncoder`` on the
   model's encoder), paper-sized model (``zoo.bernoulli_vae``), the library's default options, batch 64 and 256,
   interleaved after a warm-up; ``train_step_ratio_T5_vs_standard`` is the ratio of the medians (by batch size),
   ``train_step_ratio_T5_one_sample_vs_standard`` the same with one sample per ELBO, as the standard VAE uses,
   and ``..._hidden_256`` with one sample and an update network of 256 units. Beside the seconds, the
   matrix-multiply FLOPs of one step of each (``torch.utils.flop_counter.FlopCounterMode``; the optimizer's
   elementwise update is not counted) and of the T + 1 λ-gradients alone (``train_step_flop_ratios``,
   ``lambda_gradient_flop_ratios``, relative to the standard step): a time ratio at or below the FLOP ratio leaves
   no overhead to cut, only arithmetic.
3. Cost of a test-time step: one learned step versus one Adam E-step (``GradientEStep``, same number of samples),
   timed as (``infer`` with k steps − ``infer`` with 0 steps) / k, interleaved (``common.time_methods``); both
   refine from the model's encoder; ``test_step_ratio_vs_adam``.
4. Peak training memory at T = 2 versus T = 16 (feed-forward training, no back-propagation through the steps):
   :func:`memory.measure` (``benchmarks/memory.py``: a fresh process per measurement with glibc's mmap threshold
   pinned, peak-RSS increase of one training step, paper-sized model, batch 128), interleaved and repeated;
   ``peak_mem_ratio_T16_vs_T2`` is the ratio of the medians.

Usage::

    python benchmarks/overhead.py --scale smoke --out /tmp/bench   # functional test (< 1 min)
    python benchmarks/overhead.py                                # full: writes benchmarks/results/
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
from memory import measure

from learned_inference import GradientEStep, IterativeInferenceOptimizer, StandardEncoder
from learned_inference.adapters import DecoderModel
from learned_inference.families import DiagonalGaussian
from learned_inference.latent_space import LatentSpace
from learned_inference.objectives import elbo, elbo_and_grad, prior_moments
from learned_inference.zoo import bernoulli_vae, highway_decoder

NAME = "overhead"
SETTINGS: dict[str, dict[str, Any]] = {
    "smoke": {"hidden_size": 64, "latent_dim": 8, "batch_size": 20, "warmup": 3, "repeats": 10,
              "memory_repeats": 1, "train_batch_sizes": (8,), "train_repeats": 3, "test_steps": 2},
    "full": {"hidden_size": 512, "latent_dim": 64, "batch_size": 100, "warmup": 20, "repeats": 300,
             "memory_repeats": 3, "train_batch_sizes": (64, 256), "train_repeats": 30, "test_steps": 20},
}


def gradient_variants(*, hidden_size: int, latent_dim: int, batch_size: int, seed: int) -> dict[str, Callable]:
    """Closures computing the per-example λ-gradient of the ELBO with ``torch.func`` and with autograd."""
    torch.manual_seed(seed)
    model = DecoderModel(highway_decoder(latent_dim=latent_dim, data_dim=784, hidden_size=hidden_size),
                         likelihood="bernoulli", latent_dim=latent_dim)
    family, space = DiagonalGaussian(), LatentSpace(latent_dim)
    prior = prior_moments(model, space)
    params = {"loc": 0.5 * torch.randn(batch_size, latent_dim), "log_var": -torch.rand(batch_size, latent_dim)}
    x = torch.bernoulli(torch.full((batch_size, 784), 0.13))
    noise = torch.randn(1, batch_size, latent_dim)

    def with_func() -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return elbo_and_grad(model, family, params, x, noise, space=space, prior=prior)[1]

    def with_autograd() -> dict[str, torch.Tensor]:
        leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
        with torch.enable_grad():
            values = elbo(model, family, leaves, x, noise, space=space, prior=prior)
            grads = torch.autograd.grad(values.sum(), list(leaves.values()))
        return dict(zip(leaves, grads, strict=True))

    return {"func": with_func, "autograd": with_autograd}


TRAIN_VARIANTS = {"standard": {}, "iterative_T5": {}, "iterative_T5_one_sample": {"num_samples": 1},
                  "iterative_T5_one_sample_hidden_256": {"num_samples": 1, "hidden_size": 256}}


def training_steps(*, hidden_size: int, latent_dim: int, batch_size: int, seed: int) -> dict[str, Callable]:
    """One optimizer step of a standard VAE and of joint training with a T = 5 learned optimizer
    (:data:`TRAIN_VARIANTS`): with the defaults (``iterative_T5``, two samples per ELBO), with one sample, as the
    standard VAE uses, and with one sample and a 256-unit update network."""
    steps: dict[str, Callable] = {}
    x = torch.bernoulli(torch.full((batch_size, 784), 0.13), generator=torch.Generator().manual_seed(seed))
    for name, options in TRAIN_VARIANTS.items():
        torch.manual_seed(seed)
        model = bernoulli_vae(latent_dim=latent_dim, hidden_size=hidden_size)
        method = (StandardEncoder(model, latent_dim=latent_dim) if name == "standard" else
                  IterativeInferenceOptimizer(model, latent_dim=latent_dim, num_steps=5, data_shape=(784,),
                                              **{"hidden_size": hidden_size, **options}))
        with torch.no_grad():
            model.encode(x[:2])
        optimizer = torch.optim.Adam([*model.parameters(), *method.parameters()], lr=1e-4)

        def step(method: Any = method, optimizer: torch.optim.Optimizer = optimizer) -> None:
            optimizer.zero_grad()
            method(x).loss.backward()
            optimizer.step()

        steps[name] = step
    return steps


def matmul_flops(call: Callable[[], Any]) -> float:
    """The matrix-multiply FLOPs of one ``call()`` (``FlopCounterMode``)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        call()
    return float(counter.get_total_flops())


def lambda_gradient_flops(*, hidden_size: int, latent_dim: int, batch_size: int, samples: int) -> float:
    """FLOPs of one λ-gradient of the paper-sized model's ELBO with ``samples`` samples (no graph)."""
    model = bernoulli_vae(latent_dim=latent_dim, hidden_size=hidden_size)
    space = LatentSpace(latent_dim)
    params = {"loc": torch.zeros(batch_size, latent_dim), "log_var": torch.zeros(batch_size, latent_dim)}
    x, noise = torch.zeros(batch_size, 784), torch.randn(samples, batch_size, latent_dim)
    with torch.no_grad():
        return matmul_flops(lambda: elbo_and_grad(model, DiagonalGaussian(), params, x, noise, space=space,
                                                  prior=prior_moments(model, space)))


def test_step_costs(*, hidden_size: int, latent_dim: int, batch_size: int, seed: int, steps: int,
                    repeats: int) -> tuple[dict[str, dict], int]:
    """Per-step seconds of a learned step and an Adam E-step from the model's encoder (``common.time_methods``),
    and the number of samples per step both use."""
    torch.manual_seed(seed)
    x = torch.bernoulli(torch.full((batch_size, 784), 0.13), generator=torch.Generator().manual_seed(seed))
    model = bernoulli_vae(latent_dim=latent_dim, hidden_size=hidden_size)
    with torch.no_grad():
        model.encode(x[:2])  # sizes the lazy encoder
    model.requires_grad_(False)
    learned = IterativeInferenceOptimizer(model, latent_dim=latent_dim, init="encoder", hidden_size=hidden_size,
                                          data_shape=(784,))
    methods = {"learned": learned,
               "adam": GradientEStep(model, latent_dim=latent_dim, init="encoder", lr=0.003,
                                     num_samples=learned.num_samples)}
    return common.time_methods(methods, x, steps=steps, repeats=repeats), learned.num_samples


def time_interleaved(variants: dict[str, Callable], *, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each variant, alternating in ABBA order after ``warmup`` calls of each."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)
    return times


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark (see the module docstring) and writes its results; returns the JSON content."""
    args = common.parse_args(NAME, __doc__.splitlines()[0], argv=argv)
    started = common.setup(args)
    s = SETTINGS[args.scale]
    variants = gradient_variants(hidden_size=s["hidden_size"], latent_dim=s["latent_dim"],
                                 batch_size=s["batch_size"], seed=args.seed)
    a, b = variants["func"](), variants["autograd"]()
    max_diff = max((a[k] - b[k]).abs().max().item() for k in a)
    times = time_interleaved(variants, warmup=s["warmup"], repeats=s["repeats"])
    pair_ratios = [fa / fb for fa, fb in zip(times["func"], times["autograd"], strict=True)]
    ratio = statistics.median(times["func"]) / statistics.median(times["autograd"])

    train_seconds = {}
    time_ratios: dict[str, dict[str, float]] = {}
    flop_ratios: dict[str, dict[str, float]] = {}
    floor_ratios: dict[str, dict[str, float]] = {}
    for batch in s["train_batch_sizes"]:
        steps = training_steps(hidden_size=s["hidden_size"], latent_dim=s["latent_dim"], batch_size=batch,
                               seed=args.seed)
        flops = {name: matmul_flops(step) for name, step in steps.items()}
        train_times = time_interleaved(steps, warmup=3, repeats=s["train_repeats"])
        train_seconds[str(batch)] = {name: common.median_iqr(t) for name, t in train_times.items()}
        standard = statistics.median(train_times["standard"])
        time_ratios[str(batch)] = {n: statistics.median(t) / standard for n, t in train_times.items()}
        flop_ratios[str(batch)] = {n: f / flops["standard"] for n, f in flops.items()}
        floor_ratios[str(batch)] = {
            f"{samples}_sample": 6 * lambda_gradient_flops(hidden_size=s["hidden_size"], latent_dim=s["latent_dim"],
                                                           batch_size=batch, samples=samples) / flops["standard"]
            for samples in (1, 2)}
    train_ratios = {b: r["iterative_T5"] for b, r in time_ratios.items()}
    one_sample_ratios = {b: r["iterative_T5_one_sample"] for b, r in time_ratios.items()}
    test_costs, test_samples = test_step_costs(hidden_size=s["hidden_size"], latent_dim=s["latent_dim"],
                                 batch_size=s["batch_size"], seed=args.seed, steps=s["test_steps"],
                                 repeats=s["train_repeats"])
    test_ratio = test_costs["learned"]["step_s"] / test_costs["adam"]["step_s"]

    memory: dict[int, list[float]] = {2: [], 16: []}
    for _ in range(s["memory_repeats"]):
        for steps in memory:
            memory[steps].append(measure(steps, "feed_forward"))
    mem_ratio = statistics.median(memory[16]) / statistics.median(memory[2])

    result = {
        "settings": s,
        "func_vs_autograd_ratio": ratio,
        "func_vs_autograd_pair_ratio": common.median_iqr(pair_ratios),
        "seconds": {name: common.median_iqr(t) for name, t in times.items()},
        "max_abs_gradient_difference": max_diff,
        "train_step_ratio_T5_vs_standard": train_ratios,
        "train_step_ratio_T5_one_sample_vs_standard": one_sample_ratios,
        "train_step_seconds": train_seconds,
        "train_step_time_ratios": time_ratios,
        "train_step_flop_ratios": flop_ratios,
        "lambda_gradient_flop_ratios": floor_ratios,
        "test_step_ratio_vs_adam": test_ratio,
        "test_step_seconds": test_costs,
        "test_step_samples": test_samples,
        "peak_mem_ratio_T16_vs_T2": mem_ratio,
        "peak_mib": {str(k): common.median_iqr(v) for k, v in memory.items()},
        "memory_method": "benchmarks/memory.py measure(): fresh process, MALLOC_MMAP_THRESHOLD_=65536, peak RSS "
                         "increase of one training step; decoder 64-512-512-784, update network 512, batch 128",
    }
    sec = result["seconds"]
    body = [
        f"λ-gradient of the summed ELBO, decoder {s['latent_dim']}-{s['hidden_size']}-{s['hidden_size']}-784 "
        f"(highway), batch {s['batch_size']}; {s['repeats']} interleaved calls each after {s['warmup']} warm-up "
        f"calls; gradients agree to {max_diff:.1e}.",
        "",
        *common.table(["variant", "median (ms)", "q25 (ms)", "q75 (ms)"],
                      [(n, v["median"] * 1e3, v["q25"] * 1e3, v["q75"] * 1e3) for n, v in sec.items()]),
        "",
        f"- `func_vs_autograd_ratio` = **{ratio:.3f}** (per-pair median "
        f"{result['func_vs_autograd_pair_ratio']['median']:.3f}, IQR "
        f"{result['func_vs_autograd_pair_ratio']['q25']:.3f}..{result['func_vs_autograd_pair_ratio']['q75']:.3f});"
        f" target <= 1.10: **{'met' if ratio <= 1.10 else 'not met'}**.",
        "- `train_step_ratio_T5_vs_standard` (joint training, T = 5, default options, vs a standard VAE step): "
        + ", ".join(f"batch {b}: **{r:.2f}**" for b, r in train_ratios.items())
        + f"; target <= 3.0: **{'met' if max(train_ratios.values()) <= 3.0 else 'not met'}**. With one sample per "
        "ELBO, as the standard VAE uses (`train_step_ratio_T5_one_sample_vs_standard`): "
        + ", ".join(f"batch {b}: **{r:.2f}**" for b, r in one_sample_ratios.items()) + ".",
        f"- `test_step_ratio_vs_adam` (one learned step vs one Adam E-step, {test_samples} sample(s) per step each): "
        f"**{test_ratio:.2f}** ({test_costs['learned']['step_s'] * 1e3:.1f} vs "
        f"{test_costs['adam']['step_s'] * 1e3:.1f} ms, batch {s['batch_size']}); target <= 1.3: "
        f"**{'met' if test_ratio <= 1.3 else 'not met'}**.",
        f"- `peak_mem_ratio_T16_vs_T2` = **{mem_ratio:.3f}** (T=2: {statistics.median(memory[2]):.1f} MiB, "
        f"T=16: {statistics.median(memory[16]):.1f} MiB, median of {s['memory_repeats']}; method of "
        f"`benchmarks/memory.py`); target <= 1.1: **{'met' if mem_ratio <= 1.1 else 'not met'}**.",
        "",
        *common.table(["batch", "variant", "time / standard", "FLOPs / standard"],
                      [(b, n, time_ratios[b][n], flop_ratios[b][n]) for b in time_ratios for n in time_ratios[b]]),
        "",
        "The T + 1 = 6 λ-gradients alone cost "
        + ", ".join(f"{r['2_sample']:.2f} (two samples) and {r['1_sample']:.2f} (one sample) times the standard "
                    f"step's FLOPs at batch {b}" for b, r in floor_ratios.items())
        + ": a floor no implementation of the default options goes below.",
    ]
    common.write_results(args, result, title="Overhead of torch.func and of more inference steps", body=body,
                         started=started)
    return result


if __name__ == "__main__":
    main()
