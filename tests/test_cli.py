"""The learned-inference command: demo report, resumable training, benchmark lookup."""

from __future__ import annotations

import json

import pytest
import torch

from learned_inference.cli import main

pytest.importorskip("sklearn")
TINY = ["--latent-dim", "3", "--hidden-size", "16", "--steps", "2", "--quiet"]


def test_demo_writes_a_report(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    report = tmp_path / "report"
    assert main(["demo", "--epochs", "1", "--eval-samples", "8", "--test-size", "20", "--report", str(report),
                 *TINY]) == 0
    results = json.loads((report / "results.json").read_text())
    assert set(results["models"]) == {"standard", "iterative"}
    assert results["models"]["iterative"]["inference_steps"] == 2
    assert {"elbo_over_steps.png", "learning_curves.png", "reconstructions.png"} <= {p.name for p in report.iterdir()}
    assert "| iterative |" in (report / "report.md").read_text()
    assert "standard" in capsys.readouterr().out


def test_train_checkpoints_and_resumes(tmp_path, capsys):
    checkpoint = tmp_path / "run.pt"
    main(["train", "--epochs", "1", "--checkpoint", str(checkpoint), *TINY])
    assert torch.load(checkpoint, weights_only=False)["step"] == 1
    main(["train", "--epochs", "2", "--checkpoint", str(checkpoint), *TINY])
    out = capsys.readouterr().out
    assert "resumed from" in out and "epoch 2/2" in out and "epoch 1/2" not in out.split("resumed from")[1]
    assert torch.load(checkpoint, weights_only=False)["step"] == 2


def test_unknown_benchmark_lists_the_available_ones():
    with pytest.raises(SystemExit, match=r"no benchmark named 'nope'.*memory"):
        main(["bench", "nope"])
