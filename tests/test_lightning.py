"""Lightning integration: ``Trainer.fit`` with ``strategy="ddp"`` on 2 CPU processes improves the logged ELBO.

Lightning's ``"ddp"`` strategy launches the other ranks by re-running the command line, so the 2-process fit
runs this file as a script (``python tests/test_lightning.py OUT_DIR``) in a subprocess.
"""

from __future__ import annotations

import csv
import doctest
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")

from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger

from learned_inference import DecoderModel, IterativeInferenceOptimizer
from learned_inference.integrations.lightning import IterativeInferenceModule, batch_data
from learned_inference.integrations.lightning import module as lightning_module

D, X, N, BATCH, STEPS = 4, 24, 512, 32, 40
WORLD = 2


def _data() -> torch.Tensor:
    """Binary data from a fixed random decoder, the same in every process."""
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(N, D, generator=generator)
    weight = 2.0 * torch.randn(D, X, generator=generator)
    return torch.bernoulli(torch.sigmoid(z @ weight), generator=generator)


def _module(x: torch.Tensor) -> IterativeInferenceModule:
    torch.manual_seed(1)
    decoder = torch.nn.Sequential(torch.nn.Linear(D, 32), torch.nn.ELU(), torch.nn.Linear(32, X))
    model = DecoderModel(decoder, likelihood="bernoulli", latent_dim=D)
    inference = IterativeInferenceOptimizer(model, latent_dim=D, num_steps=3, hidden_size=32)
    return IterativeInferenceModule(inference, optimizer=partial(torch.optim.Adam, lr=1e-2), example_input=x[:1])


def _fit(out_dir: Path, *, strategy: str, devices: int, validate: bool = False) -> Trainer:
    """Fits for STEPS steps, logging every step to ``out_dir`` (CSV); each rank saves its final parameters."""
    torch.set_num_threads(1)
    x = _data()
    module = _module(x)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=BATCH, shuffle=True)
    trainer = Trainer(
        accelerator="cpu", strategy=strategy, devices=devices, max_steps=STEPS, log_every_n_steps=1,
        logger=CSVLogger(out_dir, name="", version=""), enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=2 if validate else 0, num_sanity_val_steps=0,
    )
    trainer.fit(module, loader, torch.utils.data.DataLoader(x[:64], batch_size=BATCH) if validate else None)
    params = torch.cat([p.detach().flatten() for p in module.joint.parameters()])
    torch.save({"params": params, "world_size": trainer.world_size}, out_dir / f"rank{trainer.global_rank}.pt")
    return trainer


def _logged(out_dir: Path, key: str) -> list[float]:
    with open(out_dir / "metrics.csv") as f:
        return [float(row[key]) for row in csv.DictReader(f) if row.get(key)]


def _assert_elbo_improves(elbo: list[float]) -> None:
    first, last = sum(elbo[:5]) / 5, sum(elbo[-5:]) / 5
    assert last > first + 1.0, f"logged train/elbo did not improve: first 5 steps {first:.3f}, last 5 {last:.3f}"


def test_lightning_ddp_fit_on_two_processes_improves_the_logged_elbo(tmp_path):
    done = subprocess.run(
        [sys.executable, __file__, str(tmp_path)], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert [r["world_size"] for r in ranks] == [WORLD] * WORLD
    torch.testing.assert_close(ranks[0]["params"], ranks[1]["params"], rtol=0, atol=0)  # DDP kept them in sync
    elbo = _logged(tmp_path, "train/elbo")
    assert len(elbo) == STEPS
    _assert_elbo_improves(elbo)


def test_lightning_single_process_fit_logs_train_and_validation_elbo(tmp_path):
    _fit(tmp_path, strategy="auto", devices=1, validate=True)
    _assert_elbo_improves(_logged(tmp_path, "train/elbo"))
    assert len(_logged(tmp_path, "train/elbo_gain")) == STEPS
    val = _logged(tmp_path, "val/elbo")
    assert len(val) == STEPS // (N // BATCH) and val[-1] > val[0], val  # once per full epoch


def test_lightning_module_needs_a_sized_update_network():
    x = _data()
    module = _module(x)
    lazy = IterativeInferenceModule(IterativeInferenceOptimizer(module.joint.model, latent_dim=D, hidden_size=8))
    with pytest.raises(ValueError, match="example_input"):
        lazy.setup("fit")
    module.setup("fit")


def test_lightning_batch_data_reads_tensors_and_tuples():
    x = torch.zeros(3, 2)
    assert batch_data(x) is x and batch_data((x, torch.ones(3))) is x and batch_data([x]) is x
    with pytest.raises(TypeError, match="batch must be a Tensor"):
        batch_data({"x": x})


def test_lightning_module_docstring_examples_run():
    """``integrations/`` is outside the doctest paths; run its examples here."""
    assert doctest.testmod(lightning_module, raise_on_error=False).failed == 0


if __name__ == "__main__":
    _fit(Path(sys.argv[1]), strategy="ddp", devices=WORLD)
