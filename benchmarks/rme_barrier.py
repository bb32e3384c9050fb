"""RME's barrier C on a posterior with two known modes: how often RME recovers it, against the non-recursive
mixture encoder and the diagonal (standard) encoder (issue 14; the RME reviews ask how sensitive it is to C).

Model: :class:`~learned_inference.zoo.MixturePriorModel` with prior ½N(−2, ½²) + ½N(2, ½²) and noise 1, whose
posterior for x ∈ [−½, ½] has modes near ±1.6 (variance 0.2) with weights 0.22–0.78: leaving one mode's basin
costs ≈ 6 nats of KL(q_2 ‖ q_1), the modes are ≈ 26 nats apart. Each method (M = K = 2 components, hidden 32,
4 samples) trains with Adam (lr 3e-3) on batches of 64 x and is scored by the mean gap log p(x) − ELBO (exact
log p(x), ELBO from 4000 samples) over 21 points of [−½, ½]. Two regimes:

* ``uniform``: x ~ U[−½, ½]. RME's q_1 (a standard encoder) keeps to one mode; C decides where q_2 settles.
* ``model``: x drawn from the model, so the dominant mode switches at x = 0, and so must q_1 and q_2.

Run: ``python benchmarks/rme_barrier.py --threads 1`` (6 min on one thread; ``--scale smoke``: seconds).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import parse_args, setup, table, write_results
from learned_inference import GaussianMixture, RecursiveMixtureEncoder, StandardEncoder
from learned_inference.evaluation import elbo_estimate
from learned_inference.inference import InferenceMethod
from learned_inference.zoo import MixturePriorModel

#: (regime, method, barrier C or None, seeds) of the full run
RUNS: tuple[tuple[str, str, float | None, tuple[int, ...]], ...] = (
    *(("uniform", "rme", c, (0, 1, 2, 3)) for c in (1.0, 5.0, 20.0, 50.0)),
    ("uniform", "mixture_encoder", None, (0, 1, 2, 3)),
    ("uniform", "standard", None, (0, 1, 2, 3)),
    ("model", "rme", 20.0, (0, 1, 2)),
    ("model", "mixture_encoder", None, (0, 1, 2)),
    ("model", "standard", None, (0, 1, 2)),
)


def build(kind: str, model: MixturePriorModel, barrier: float | None) -> InferenceMethod:
    if kind == "rme":
        assert barrier is not None
        return RecursiveMixtureEncoder(model, latent_dim=1, num_components=2, barrier=barrier, hidden_size=32,
                                       num_samples=4)
    family: Any = GaussianMixture(2) if kind == "mixture_encoder" else "diagonal_gaussian"
    return StandardEncoder(model, latent_dim=1, family=family, init="highway", hidden_size=32, num_samples=4)


def gap(kind: str, barrier: float | None, *, regime: str, seed: int, iterations: int) -> float:
    """Trains one method from ``seed`` and returns its mean gap log p(x) − ELBO over [−½, ½]."""
    torch.manual_seed(seed)
    model = MixturePriorModel(torch.tensor([[-2.0], [2.0]]), scale=0.5, noise_scale=1.0)
    method = build(kind, model, barrier)
    optim = torch.optim.Adam(method.parameters(), lr=3e-3)
    for _ in range(iterations):
        x = torch.rand(64, 1) - 0.5 if regime == "uniform" else model.sample(64)
        optim.zero_grad()
        method(x).loss.backward()
        optim.step()
    grid = torch.linspace(-0.5, 0.5, 21)[:, None]
    with torch.no_grad():
        posterior = method.infer(grid).posterior
        elbo = elbo_estimate(model, posterior, grid, num_samples=4000)
        return float((model.log_marginal(grid).double() - elbo).mean())


def main(argv: list[str] | None = None) -> None:
    args = parse_args("rme_barrier", __doc__.splitlines()[0], argv=argv)
    started = setup(args)
    smoke = args.scale == "smoke"
    iterations = 10 if smoke else 1500
    runs = (("uniform", "rme", 20.0, (0,)), ("model", "standard", None, (0,))) if smoke else RUNS
    rows: list[dict[str, Any]] = []
    for regime, kind, barrier, seeds in runs:
        gaps = [gap(kind, barrier, regime=regime, seed=seed, iterations=iterations) for seed in seeds]
        rows.append({"regime": regime, "method": kind, "barrier": barrier, "seeds": list(seeds), "gaps": gaps})
        if not args.quiet:
            print(regime, kind, barrier, [round(g, 3) for g in gaps], flush=True)
    label = {"rme": "RME, C = {:g}", "mixture_encoder": "mixture encoder, K = 2", "standard": "standard encoder"}
    body = table(["regime", "method", "gap per seed (nats)", "seeds within 0.05"],
                 [(r["regime"], label[r["method"]].format(r["barrier"]), " / ".join(f"{g:.3f}" for g in r["gaps"]),
                   f"{sum(g < 0.05 for g in r['gaps'])} of {len(r['gaps'])}") for r in rows])
    uniform = [r for r in rows if r["regime"] == "uniform" and r["method"] == "rme"]
    best = max(uniform, key=lambda r: sum(g < 0.05 for g in r["gaps"]))["barrier"]
    settings = {"iterations": iterations, "batch": 64, "lr": 3e-3, "hidden_size": 32, "num_samples": 4,
                "elbo_samples": 4000}
    write_results(args, {"settings": settings, "best_barrier": best, "runs": rows},
                  title="RME's barrier C on a bimodal posterior (mean gap to log p(x) over x in [-1/2, 1/2])",
                  body=body, started=started)


if __name__ == "__main__":
    main()
