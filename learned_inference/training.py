"""``ModelWithInference``: the user's model and its learned optimizer as one module, the unit of training.

:class:`~learned_inference.IterativeInferenceOptimizer` uses the user's model without owning it, so wrapping
the optimizer alone in ``DistributedDataParallel`` would synchronise the update network φ but not the model
θ: DDP's reducer only watches the parameters of the module whose ``forward`` it calls. This container
registers both as submodules and its ``forward`` runs inference, so
``DistributedDataParallel(ModelWithInference(inference))`` reduces every gradient of ``result.loss``:

* φ: the per-step gradients of the mean over steps of −L_t, computed inside the forward
  (``torch.autograd.grad``, which fills no ``.grad`` and so triggers no reduction) and handed to ``backward``
  in one piece;
* θ: the gradient of −L_T at the final (detached) λ.

Both losses are batch means of per-example terms ℓ, so with B examples on each of N processes DDP's gradient
average equals the single-process gradient on the concatenated batch:

    ∇ 1/(NB) Σ_{r,b} ℓ_{rb} = 1/N Σ_r ∇ 1/B Σ_b ℓ_{rb}.

The refinement loop itself communicates nothing; the only collectives are DDP's own (the bucketed all-reduce
in ``backward`` and, by default, a buffer broadcast in ``forward``).

Example:
    >>> import torch
    >>> from learned_inference import DecoderModel, IterativeInferenceOptimizer, ModelWithInference
    >>> model = DecoderModel(torch.nn.Linear(4, 20), likelihood="bernoulli", latent_dim=4)
    >>> inference = IterativeInferenceOptimizer(model, latent_dim=4, num_steps=3, hidden_size=32)
    >>> x = torch.bernoulli(torch.full((8, 20), 0.3))
    >>> joint = ModelWithInference(inference, example_input=x)  # sizes the lazy layer (DDP needs it sized)
    >>> sorted(name for name, _ in joint.named_children())
    ['inference', 'model']
    >>> joint(x).loss.backward()  # in a process group: DistributedDataParallel(joint)(x).loss.backward()
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn.parameter import is_lazy

from learned_inference.families import Params
from learned_inference.inference import InferenceResult
from learned_inference.model import LatentModel
from learned_inference.optimizer import IterativeInferenceOptimizer

__all__ = ["ModelWithInference"]


class ModelWithInference(nn.Module):
    """Holds the user's model and an :class:`~learned_inference.IterativeInferenceOptimizer` as submodules.

    ``parameters()`` yields the model's parameters (when the model is an ``nn.Module``) and the update
    network's, so one optimizer, one ``state_dict`` and one ``DistributedDataParallel`` wrapper cover both.

    Args:
        inference: the learned optimizer; its ``model`` becomes the ``model`` submodule.
        example_input: a batch ``[B, *event]`` (one example suffices) used to size the update network's lazy
            input layer now; ``DistributedDataParallel`` refuses modules whose parameters are not sized yet.
    """

    def __init__(
        self, inference: IterativeInferenceOptimizer, *, example_input: Tensor | None = None
    ) -> None:
        super().__init__()
        if not isinstance(inference, IterativeInferenceOptimizer):
            raise TypeError(
                f"inference must be an IterativeInferenceOptimizer, got {type(inference).__name__}"
            )
        self.model: LatentModel = inference.model
        self.inference = inference
        if example_input is not None:
            inference.infer(example_input, num_steps=0)

    @property
    def is_sized(self) -> bool:
        """Whether every parameter has its shape (no lazy layer waits for its first input)."""
        return not any(is_lazy(p) for p in self.parameters())

    def forward(
        self, x: Tensor, *, init_params: Params | None = None, noise: Tensor | None = None
    ) -> InferenceResult:
        """Runs ``inference(x, ...)``; see :meth:`IterativeInferenceOptimizer.forward` for the arguments."""
        return self.inference(x, init_params=init_params, noise=noise)
