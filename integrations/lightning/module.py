"""``IterativeInferenceModule``: a LightningModule that trains a model with its learned inference optimizer.

It holds a :class:`~learned_inference.ModelWithInference` (the user's model θ and the update network φ as one
module), so every Lightning strategy that wraps the LightningModule (``"ddp"``, ``"ddp_spawn"``, ...) wraps
both, and DDP reduces the gradients of both. Each training step minimises ``result.loss`` (update network: the
mean over refinement steps t = 1..T of the batch-mean −L_t; model: the batch-mean −L_T) and logs:

* ``train/elbo``: the batch-mean ELBO L_T after the T refinement steps;
* ``train/elbo_gain``: L_T − L_0, what refinement added to the initial estimate;
* ``train/loss``; and, in validation, ``val/elbo`` (L_T of :meth:`IterativeInferenceOptimizer.infer`).

Usage::

    from lightning.pytorch import Trainer
    from learned_inference.integrations.lightning import IterativeInferenceModule

    module = IterativeInferenceModule(inference, example_input=next(iter(loader)))
    Trainer(strategy="ddp", devices=4, max_epochs=10).fit(module, loader)

Example:
    >>> import torch
    >>> from lightning.pytorch import Trainer
    >>> from learned_inference import DecoderModel, IterativeInferenceOptimizer
    >>> model = DecoderModel(torch.nn.Linear(4, 20), likelihood="bernoulli", latent_dim=4)
    >>> inference = IterativeInferenceOptimizer(model, latent_dim=4, num_steps=2, hidden_size=16)
    >>> x = torch.bernoulli(torch.full((64, 20), 0.3))
    >>> module = IterativeInferenceModule(inference, example_input=x[:1])
    >>> trainer = Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
    ...                   enable_progress_bar=False, enable_model_summary=False)
    >>> trainer.fit(module, torch.utils.data.DataLoader(x, batch_size=16))
    >>> sorted(trainer.callback_metrics)
    ['train/elbo', 'train/elbo_gain', 'train/loss']
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor
from torch.nn import Parameter
from torch.optim import Optimizer

from learned_inference.optimizer import InferenceResult, IterativeInferenceOptimizer
from learned_inference.training import ModelWithInference

__all__ = ["DEFAULT_OPTIMIZER", "IterativeInferenceModule", "batch_data"]

OptimizerFactory = Callable[[Iterator[Parameter]], Optimizer]
DEFAULT_OPTIMIZER: OptimizerFactory = partial(torch.optim.Adam, lr=1e-3)


def batch_data(batch: Any) -> Tensor:
    """The data x of a batch: the batch itself (a tensor) or the first entry of a list/tuple ``(x, y, ...)``."""
    if isinstance(batch, list | tuple) and batch:
        batch = batch[0]
    if not isinstance(batch, Tensor):
        raise TypeError(
            f"batch must be a Tensor x or a list/tuple whose first entry is x, got {type(batch).__name__}; "
            "override IterativeInferenceModule.batch_data to read other batch layouts"
        )
    return batch


class IterativeInferenceModule(LightningModule):
    """Trains the user's model and an :class:`~learned_inference.IterativeInferenceOptimizer` with Lightning.

    Args:
        inference: the learned optimizer; its ``model`` is trained too (if it has parameters).
        optimizer: builds the torch optimizer from the parameters of the model and the update network
            (default: ``Adam`` with learning rate 1e-3). It must be picklable for spawn-based strategies.
        example_input: a batch ``[B, *event]`` (one example suffices) that sizes the update network's lazy input
            layer now; needed unless the optimizer has already run once, because DDP wraps only sized modules.
    """

    def __init__(
        self,
        inference: IterativeInferenceOptimizer,
        *,
        optimizer: OptimizerFactory = DEFAULT_OPTIMIZER,
        example_input: Tensor | None = None,
    ) -> None:
        super().__init__()
        if not callable(optimizer):
            raise TypeError(f"optimizer must be a callable params -> torch.optim.Optimizer, got {optimizer!r}")
        self.joint = ModelWithInference(inference, example_input=example_input)
        self.optimizer_factory = optimizer

    def forward(self, x: Tensor) -> InferenceResult:
        """Runs the training-mode refinement (``inference(x)``)."""
        return self.joint(x)

    def batch_data(self, batch: Any) -> Tensor:
        """The data x of a batch; see :func:`batch_data`. Override for other batch layouts."""
        return batch_data(batch)

    def setup(self, stage: str) -> None:
        if not self.joint.is_sized:
            raise ValueError(
                "the update network's input layer is not sized yet and DDP cannot wrap it: pass "
                "example_input=<a batch> to IterativeInferenceModule, or run inference.infer(x) once before fit"
            )

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = self.batch_data(batch)
        result = self(x)
        elbo = result.elbo.mean(-1)
        size = x.shape[0]
        self.log("train/elbo", elbo[-1], prog_bar=True, batch_size=size)
        self.log("train/elbo_gain", elbo[-1] - elbo[0], batch_size=size)
        self.log("train/loss", result.loss.detach(), batch_size=size)
        return result.loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        # Lightning validates under inference mode; the λ-gradients need autograd, so leave it for a fresh x.
        with torch.inference_mode(False):
            x = self.batch_data(batch).clone()
            elbo = self.joint.inference.infer(x).elbo[-1].mean()
        self.log("val/elbo", elbo, batch_size=x.shape[0], sync_dist=True)

    def configure_optimizers(self) -> Optimizer:
        return self.optimizer_factory(self.joint.parameters())
