"""The ``learned-inference`` command.

``learned-inference demo``: an end-to-end run that needs no files: trains an iterative inference model on a
probabilistic-PCA model (whose exact log p(x) is known) and prints, step by step, how far the ELBO on held-out
data is from log p(x), next to plain gradient ascent on λ with Adam.

Example:
    >>> from learned_inference.cli import main
    >>> main(["demo", "--iterations", "20", "--quiet"])  # doctest: +ELLIPSIS
    step ...
    0
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from learned_inference.families import DiagonalGaussian
from learned_inference.model import LatentSpace
from learned_inference.objectives import elbo_and_grad, prior_moments, sample_noise
from learned_inference.optimizer import IterativeInferenceOptimizer
from learned_inference.zoo import ProbabilisticPCA

__all__ = ["main"]


def _adam_gaps(model: ProbabilisticPCA, x: torch.Tensor, steps: int, *, lr: float) -> list[float]:
    """log p(x) − ELBO after each of ``steps`` Adam steps on λ from the prior (closed-form ELBO)."""
    family, space = DiagonalGaussian(), LatentSpace(model.latent_dim)
    params = family.initial_params(len(x), model.latent_dim, dtype=x.dtype, device=x.device)
    params = {k: v.requires_grad_() for k, v in params.items()}
    optim = torch.optim.Adam(params.values(), lr=lr, maximize=True)
    log_px, gaps = model.log_marginal(x), []
    prior = prior_moments(model, space)
    for t in range(steps + 1):
        gaps.append((log_px - model.exact_elbo(x, params["loc"], params["log_var"])).mean().item())
        if t == steps:
            break
        noise = sample_noise(1, len(x), model.latent_dim, dtype=x.dtype, device=x.device)
        _, grads = elbo_and_grad(model, family, {k: v.detach() for k, v in params.items()}, x, noise, space=space,
                                 prior=prior)
        for name, value in params.items():
            value.grad = grads[name]
        optim.step()
    return gaps


def _demo(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model = ProbabilisticPCA.random(data_dim=16, latent_dim=4, generator=gen).requires_grad_(False)
    x_train, x_test = model.sample(4096, generator=gen), model.sample(512, generator=gen)
    inference = IterativeInferenceOptimizer(model, latent_dim=4, num_steps=args.steps, hidden_size=64)
    optim = torch.optim.Adam(inference.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optim, args.iterations)
    start = time.perf_counter()
    for _ in tqdm(range(args.iterations), desc="training the update network", disable=args.quiet):
        optim.zero_grad()
        inference(x_train[torch.randint(0, len(x_train), (64,))]).loss.backward()
        optim.step()
        schedule.step()
    seconds = time.perf_counter() - start

    log_px, params, iterative = model.log_marginal(x_test), None, []
    for t in range(args.steps + 1):
        params = inference.infer(x_test, num_steps=0 if t == 0 else 1, init_params=params).params
        iterative.append((log_px - model.exact_elbo(x_test, params["loc"], params["log_var"])).mean().item())
    adam = _adam_gaps(model, x_test, args.steps, lr=0.1)
    print(f"step  log p(x) - ELBO [nats]: iterative | Adam E-step (lr 0.1)   (held-out, {len(x_test)} examples)")
    for t, (a, b) in enumerate(zip(iterative, adam, strict=True)):
        print(f"{t:4d}  {a:30.4f} | {b:.4f}")
    if not args.quiet:
        print(f"trained in {seconds:.1f} s ({args.iterations} iterations, T = {args.steps})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``learned-inference`` console script."""
    parser = argparse.ArgumentParser(prog="learned-inference", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train and compare on probabilistic PCA (no files needed)")
    demo.add_argument("--iterations", type=int, default=1500, help="training iterations (default 1500)")
    demo.add_argument("--steps", type=int, default=5, help="inference steps T (default 5)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quiet", action="store_true", help="no progress bar or timing")
    args = parser.parse_args(argv)
    return _demo(args)


if __name__ == "__main__":
    raise SystemExit(main())
