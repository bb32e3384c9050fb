"""Peak tensor memory of the importance-weighted log p(x) estimator: bounded by ``chunk_size``, not by k.

Method. The estimator runs inside ``torch.profiler.profile(profile_memory=True)`` on CPU. The profiler
records one ``[memory]`` event per allocation and per free made through PyTorch's CPU allocator (every
tensor, including temporaries inside kernels), with its size in bytes (negative for frees) and a timestamp.
Sorting the events by time and taking the running sum gives the bytes held by tensors created during the
call; its maximum is the peak. Tensors that exist before the call (model weights, x, the posterior's
parameters) are not counted. This is tensor memory, not the process's resident set, and it does not depend on
what else runs on the machine.

Two sweeps on a decoder shaped like the paper's MNIST model (64-256-256-784, ELU, Bernoulli; random weights,
since memory does not depend on training), a batch of 8 examples, N(0, I) posteriors:

* k = 5000 with chunk sizes 10, 100, 1000, 5000: the peak grows linearly with the chunk size;
* chunk size 100 with k = 500, 5000, 20000: the peak stays the same.

The peak is compared with ``chunk_size × B × bytes per sample``, where bytes per sample = 4 × (784 logits +
784 log-likelihood terms + 2·256 hidden units + small terms): the activations of one chunk.

Run from the repository root: ``python benchmarks/estimator_memory.py``; writes
``benchmarks/results/estimator_memory.json``.
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import torch
from torch import nn
from torch.distributions import Independent, Normal
from torch.profiler import ProfilerActivity, profile

from learned_inference import DecoderModel
from learned_inference.evaluation import importance_weighted_log_marginal

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

BATCH, LATENT, HIDDEN, PIXELS = 8, 64, 256, 784
RESULT = Path(__file__).parent / "results" / "estimator_memory.json"


def peak_tensor_bytes(num_samples: int, chunk_size: int, model: DecoderModel, x: torch.Tensor) -> int:
    """Peak bytes held by tensors allocated during one estimator call (see the module docstring)."""
    posterior = Independent(Normal(torch.zeros(BATCH, LATENT), torch.ones(BATCH, LATENT)), 1)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        importance_weighted_log_marginal(model, posterior, x, num_samples=num_samples, chunk_size=chunk_size)
    events = sorted(
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    decoder = nn.Sequential(
        nn.Linear(LATENT, HIDDEN), nn.ELU(), nn.Linear(HIDDEN, HIDDEN), nn.ELU(), nn.Linear(HIDDEN, PIXELS)
    )
    model = DecoderModel(decoder, likelihood="bernoulli", latent_dim=LATENT)
    x = torch.bernoulli(torch.full((BATCH, PIXELS), 0.3))
    bytes_per_sample = 4 * (2 * PIXELS + 2 * HIDDEN + 4 * LATENT)

    runs = []
    for num_samples, chunk_size in [
        (5000, 10),
        (5000, 100),
        (5000, 1000),
        (5000, 5000),
        (500, 100),
        (20000, 100),
    ]:
        peak = peak_tensor_bytes(num_samples, chunk_size, model, x)
        activations = chunk_size * BATCH * bytes_per_sample
        runs.append(
            {
                "num_samples": num_samples,
                "chunk_size": chunk_size,
                "peak_tensor_bytes": peak,
                "one_chunk_activation_bytes": activations,
                "peak_over_one_chunk": round(peak / activations, 3),
            }
        )
        print(
            f"k={num_samples:6d} chunk={chunk_size:5d} peak={peak / 2**20:8.2f} MiB "
            f"({peak / activations:.2f} x one chunk's activations)"
        )

    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(
        json.dumps(
            {
                "what": "peak tensor memory of importance_weighted_log_marginal (profiler allocator events)",
                "command": "python benchmarks/estimator_memory.py",
                "scale": "full",  # the script has one scale
                **common.provenance(),
                "model": f"DecoderModel {LATENT}-{HIDDEN}-{HIDDEN}-{PIXELS} ELU, Bernoulli, float32",
                "batch": BATCH,
                "bytes_per_sample_estimate": bytes_per_sample,
                "torch": torch.__version__,
                "python": sys.version.split()[0],
                "machine": platform.platform(),
                "runs": runs,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULT}")


if __name__ == "__main__":
    main()
