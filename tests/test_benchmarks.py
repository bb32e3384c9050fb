"""Every benchmark script at smoke scale (into ``tmp_path``): it runs, writes its JSON and Markdown, and the
required keys are present and finite. Also: resumable training continues from its checkpoint.

Each smoke run takes seconds to a minute with one thread (more on a loaded machine), so the script runs
are marked slow; the resume test is fast.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
REQUIRED = {
    "inference_comparison": ("gap_closed_T5", "beats_best_optimizer_at_equal_time"),
    "training_comparison": ("epochs", "nll_standard", "nll_iterative", "nll_standard_equal_time"),
    "text_perplexity": ("perplexity_standard", "perplexity_iterative", "perplexity_standard_normalized"),
    "overhead": ("func_vs_autograd_ratio", "peak_mem_ratio_T16_vs_T2"),
    "figures": ("final_relative_improvement",),
    "frozen_refinement": ("gap_nats", "gap_closed_T5", "gap_closed_T20", "beats_best_optimizer_at_equal_time"),
    "mixture_comparison": ("nll_standard", "nll_mixture_encoder", "nll_rme", "nll_rme_refined", "nll_semi_amortized",
                           "nll_iterative", "rme_faster_than_semi_amortized"),
    "rme_barrier": ("best_barrier",),
    "rme_barrier_selection": ("selected_barrier",),
    "hierarchical_comparison": ("nll_standard", "nll_iterative", "nll_standard_minus_iterative"),
    "gap_report": ("ais_log_px", "approximation_gap_encoder", "amortization_gap_encoder", "amortization_gap_learned"),
}


def _has_data() -> bool:
    from learned_inference.data import find_data_file

    try:
        find_data_file("binarized_mnist.npz")
        find_data_file("20news_bow.npz")
    except (FileNotFoundError, OSError):
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _has_data(), reason="benchmark data files not found")
@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_benchmark_smoke(name: str, tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, str(BENCHMARKS / f"{name}.py"), "--scale", "smoke", "--threads", "1", "--quiet",
         "--out", str(tmp_path), "--checkpoint-dir", str(tmp_path / "checkpoints")],
        check=True, env=env, timeout=600,
    )
    result = json.loads((tmp_path / f"{name}.json").read_text())
    for key in (*REQUIRED[name], "command", "machine", "versions", "seed", "settings"):
        assert key in result, key
    for key in REQUIRED[name]:
        value = result[key]
        assert isinstance(value, (bool, int, float)), (key, value)
        assert math.isfinite(value), (key, value)
    summary = (tmp_path / f"{name}.md").read_text()
    assert summary.startswith("# ") and summary.count("\n# ") == 0
    for line in summary.splitlines():
        if line.startswith("![") and "](" in line:
            assert (tmp_path / line.split("](")[1].rstrip(")")).is_file(), line


PYRO_EXAMPLES = Path(os.environ.get("PYRO_EXAMPLES", "/work/pyro_checkout/examples"))


def _has_mnist() -> bool:
    from learned_inference.data import find_data_file

    try:
        find_data_file("mnist.npz")
    except (FileNotFoundError, OSError):
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not (PYRO_EXAMPLES / "lda.py").is_file(),
                    reason=f"no Pyro checkout's examples at {PYRO_EXAMPLES} (set PYRO_EXAMPLES)")
@pytest.mark.skipif(not _has_mnist(), reason="mnist.npz not found")
def test_pyro_examples_smoke(tmp_path: Path) -> None:
    pytest.importorskip("pyro")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, str(BENCHMARKS / "pyro_examples.py"), "--scale", "smoke", "--threads", "1", "--quiet",
         "--out", str(tmp_path), "--pyro-examples", str(PYRO_EXAMPLES)],
        check=True, env=env, timeout=600,
    )
    result = json.loads((tmp_path / "pyro_examples.json").read_text())
    for key in ("command", "date", "commit", "pyro_version", "torch_version", "settings", "examples"):
        assert key in result, key
    assert set(result["examples"]) == {"vae", "cvae", "lda", "scanvi", "ss_vae_M2", "dmm"}
    for name, entry in result["examples"].items():
        for key in ("elbo_own_guide", "elbo_iterative", "elbo_amortized", "seconds_per_epoch_own",
                    "seconds_per_epoch_iterative", "status", "iterative_minus_own"):
            assert key in entry, (name, key)
        assert math.isfinite(entry["elbo_own_guide"]), name
        if entry["status"] == "ok":
            assert math.isfinite(entry["elbo_iterative"]), name
            paired = entry["iterative_minus_own"]  # LDA's ELBO is one figure over the held-out set: not paired
            assert (paired is None and name == "lda") or math.isfinite(paired["se"]), name
    summary = (tmp_path / "pyro_examples.md").read_text()
    assert summary.startswith("# ") and "| vae |" in summary


def test_training_resumes_from_checkpoint(tmp_path: Path) -> None:
    sys.path.insert(0, str(BENCHMARKS))
    import common

    from learned_inference.adapters import DecoderModel

    def build() -> tuple[DecoderModel, object]:
        torch.manual_seed(0)
        model = DecoderModel(torch.nn.Linear(2, 6), likelihood="bernoulli", latent_dim=2)
        return model, common.make_method(model, kind="iterative", latent_dim=2, hidden_size=8, num_steps=2)

    data = torch.bernoulli(torch.full((40, 6), 0.4))
    args = common.parse_args("test", "test", argv=["--quiet", "--out", str(tmp_path),
                                                    "--checkpoint-dir", str(tmp_path / "ck")])
    options = {"label": "tiny", "config": {"k": 1}, "batch_size": 10, "lr": 1e-2}
    model, method = build()
    first = common.train_model(args, model, method, data, epochs=1, **options)
    model, method = build()
    both = common.train_model(args, model, method, data, epochs=2, **options)
    assert both["train_elbo"][:1] == first["train_elbo"] and len(both["train_elbo"]) == 2
    model, method = build()
    straight = common.train_model(args, model, method, data, epochs=2, **{**options, "config": {"k": 2}})
    assert straight["train_elbo"] == pytest.approx(both["train_elbo"], rel=1e-5)


def test_a_result_records_its_command_date_scale_and_commit(tmp_path: Path) -> None:
    sys.path.insert(0, str(BENCHMARKS))
    import common

    args = common.parse_args("frozen_refinement", "test", argv=["--quiet", "--scale", "smoke", "--out", str(tmp_path)])
    args.name = "frozen_refinement_fashion_mnist"  # as a script that names its result files after an option
    record = json.loads(common.write_results(args, {"x": 1}, title="t", body=[], started=0.0).read_text())
    assert record["command"] == f"python benchmarks/frozen_refinement.py --quiet --scale smoke --out {tmp_path}"
    assert record["scale"] == "smoke" and record["date"].startswith(("20", "21"))
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=BENCHMARKS, capture_output=True, text=True)
    assert record["commit"] == (head.stdout.strip() if head.returncode == 0 else None)
    assert isinstance(record["commit_dirty"], bool) or record["commit"] is None



def test_gpu_benchmark_runs_at_smoke_scale_on_the_cpu(tmp_path: Path) -> None:
    """benchmarks/gpu.py, prepared for a GPU machine, runs here (``--device cpu``) and records what it promises."""
    subprocess.run(
        [sys.executable, str(BENCHMARKS / "gpu.py"), "--scale", "smoke", "--threads", "1", "--quiet", "--device",
         "cpu", "--out", str(tmp_path)],
        check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300,
    )
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert result["device"] == "cpu" and result["device_name"].startswith("CPU")
    assert set(result["results"]) == {f"{p}/batch{b}" for p in ("fp32", "bf16") for b in (8, 16)}  # no TF32 on a CPU
    for row in result["results"].values():
        assert all(v is not None and math.isfinite(v) and v > 0 for v in row["examples_per_s"].values())
        assert row["train_ratio"] > 1  # T = 5 steps cost more than one encoder pass
    assert set(result["checks"]) == {"train_T5_at_most_3x_standard_at_batch16", "learned_test_step_at_most_1.3x_adam"}
