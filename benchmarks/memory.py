"""Peak training memory of one training step versus ``num_steps`` (feed-forward vs backprop-through-steps).

Method (CPU): every measurement runs in a fresh Python process with glibc's mmap threshold pinned
(``MALLOC_MMAP_THRESHOLD_=65536``), so every tensor buffer above 64 KiB is its own mapping and is returned to the
system when freed; the process's peak resident set size (``VmHWM`` in ``/proc/self/status``; not ``ru_maxrss``,
which a child inherits from its parent's peak across exec, so a large parent hid the child's increase) then tracks
the peak of live tensor memory. The child builds the model, update network and batch, records its peak, runs one
training step
(``inference(x).loss.backward()``) and reports the increase. Configurations are interleaved and repeated; the
median and the spread (min..max) are reported. Back-propagation through the steps (``backprop_through_steps=True``)
is measured as a control: it must grow with ``num_steps``, which shows the method can see growth.

Model: the paper's binarized-MNIST sizes (decoder 64-512-512-784, ELU, Bernoulli; highway update network with
512 units), batch 128.

Usage::

    python benchmarks/memory.py            # writes benchmarks/results/memory.json and memory.md
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
STEPS = (2, 16, 64)
MODES = ("feed_forward", "backprop_through_steps")
REPEATS = 3

CHILD = r"""
import sys, torch
from torch import nn
from learned_inference import DecoderModel, IterativeInferenceOptimizer
steps, mode = int(sys.argv[1]), sys.argv[2]
torch.manual_seed(0)
torch.set_num_threads(2)
decoder = nn.Sequential(nn.Linear(64, 512), nn.ELU(), nn.Linear(512, 512), nn.ELU(), nn.Linear(512, 784))
model = DecoderModel(decoder, likelihood="bernoulli", latent_dim=64)
inference = IterativeInferenceOptimizer(model, latent_dim=64, num_steps=steps, hidden_size=512,
                                        backprop_through_steps=(mode == "backprop_through_steps"))
x = torch.bernoulli(torch.full((128, 784), 0.13))
def peak_kib():  # this process's own peak RSS (VmHWM); ru_maxrss would start at the parent's peak after exec
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
before = peak_kib()
inference(x).loss.backward()
print((peak_kib() - before) / 1024)
"""


def measure(steps: int, mode: str) -> float:
    """Peak RSS increase in MiB of one training step, in a fresh process."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", CHILD, str(steps), mode], env=env, check=True, capture_output=True,
                         text=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import common  # here, like torch: the parent stays small (each measurement is a child's own peak)

    samples: dict[str, dict[int, list[float]]] = {m: {s: [] for s in STEPS} for m in MODES}
    for _ in range(REPEATS):
        for steps in STEPS:
            for mode in MODES:
                samples[mode][steps].append(measure(steps, mode))
    summary = {
        mode: {str(s): {"median_mib": statistics.median(v), "min_mib": min(v), "max_mib": max(v)}
               for s, v in by_steps.items()}
        for mode, by_steps in samples.items()
    }
    ff = summary["feed_forward"]
    ratio = ff["16"]["median_mib"] / ff["2"]["median_mib"]
    result = {
        "benchmark": "memory",
        "command": "python benchmarks/memory.py",
        "scale": "full",  # the script has one scale
        **common.provenance(),
        "method": "peak RSS increase of one training step in a fresh process, MALLOC_MMAP_THRESHOLD_=65536",
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "model": "decoder 64-512-512-784 Bernoulli, highway update network 512, batch 128",
        "repeats": REPEATS,
        "peak_mib": summary,
        "peak_mem_ratio_T16_vs_T2": ratio,
        "peak_mem_ratio_T64_vs_T2": ff["64"]["median_mib"] / ff["2"]["median_mib"],
        "bptt_ratio_T16_vs_T2": summary["backprop_through_steps"]["16"]["median_mib"]
        / summary["backprop_through_steps"]["2"]["median_mib"],
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "memory.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Peak training memory versus inference steps",
        "",
        f"Command: `{result['command']}`. Method: {result['method']}. {result['model']}. "
        f"Median of {REPEATS} interleaved runs (min..max). torch {torch.__version__}, {platform.platform()}.",
        "",
        "| num_steps | feed-forward (MiB) | backprop through steps (MiB) |",
        "| ---: | ---: | ---: |",
    ]
    for s in STEPS:
        cells = [f"{summary[m][str(s)]['median_mib']:.1f} ({summary[m][str(s)]['min_mib']:.1f}.."
                 f"{summary[m][str(s)]['max_mib']:.1f})" for m in MODES]
        lines.append(f"| {s} | {cells[0]} | {cells[1]} |")
    lines += ["", f"Feed-forward peak ratio T=16 / T=2: **{ratio:.3f}**; "
              f"T=64 / T=2: {result['peak_mem_ratio_T64_vs_T2']:.3f}; "
              f"backprop through steps T=16 / T=2: {result['bptt_ratio_T16_vs_T2']:.3f}.", ""]
    (RESULTS / "memory.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
