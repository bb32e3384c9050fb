"""Training: :func:`fit`, the loop that trains any inference method with the user's model, and
:class:`ModelWithInference`, the model and its learned optimizer as one module (for ``DistributedDataParallel``).

:func:`fit` takes one optimizer step on ``method(x).loss`` per mini-batch and returns a :class:`FitHistory` (train
and validation ELBO, seconds, per epoch); see its docstring for the equation and an example.

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

import math
import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy
from tqdm.auto import tqdm

from learned_inference.data import CountMatrix, iterate_batches
from learned_inference.families import Params
from learned_inference.inference import InferenceMethod, InferenceResult
from learned_inference.model import LatentModel
from learned_inference.optimizer import IterativeInferenceOptimizer
from learned_inference.validation import check_data, check_int

__all__ = ["FitHistory", "ModelWithInference", "fit"]


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


@dataclass
class FitHistory:
    """What :func:`fit` measured, one entry per epoch.

    Attributes:
        train_elbo: the mean final-step ELBO L_T over the epoch's training examples, each measured on the batch's
            forward pass (before that batch's optimizer step; after ``transform``).
        seconds: wall-clock seconds of the epoch's training (validation excluded).
        validation_elbo: the mean final-step ELBO of ``method.infer`` on the validation data after the epoch;
            empty when ``fit`` had no validation data.
        grad_norm: the median over the epoch's batches of the total gradient norm ‖∇_{θ,φ} loss‖₂ (over every
            parameter the optimizer updates, before clipping).
        grad_norm_max: its largest value in the epoch: a spike far above the median is where training may diverge
            (see ``max_grad_norm``).
        skipped_batches: batches whose gradient was not finite, whose optimizer step was skipped.
    """

    train_elbo: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    validation_elbo: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    grad_norm_max: list[float] = field(default_factory=list)
    skipped_batches: list[int] = field(default_factory=list)


def fit(
    method: InferenceMethod,
    data: Tensor | CountMatrix | Iterable[Tensor],
    *,
    epochs: int,
    optimizer: torch.optim.Optimizer | None = None,
    lr: float | None = None,
    batch_size: int = 100,
    validation: Tensor | None = None,
    transform: Callable[..., Tensor] | None = None,
    seed: int = 0,
    progress: bool = True,
    label: str | None = None,
    max_grad_norm: float | None = None,
    device: torch.device | str | None = None,
) -> FitHistory:
    """Trains ``method`` and the user's model behind it (``method.model``) on ``method(x).loss``.

    For each mini-batch x, one step of the optimizer on the parameters θ (model) and φ (inference method):

        (θ, φ) ← optimizer_step((θ, φ), ∇_{θ,φ} method(x).loss),

    where ``loss`` is the method's own training loss (for
    :class:`~learned_inference.IterativeInferenceOptimizer`: the mean over steps of −L_t for φ and −L_T for θ;
    for a plain VAE encoder: −L_0). Gradients are zeroed before every batch. Nothing else is done to the
    modules: their train/eval mode, device and dtype stay as they are (put them on ``device`` yourself).

    Args:
        method: any inference method: an ``nn.Module`` whose ``forward(x)`` returns a result with ``loss`` (a
            scalar) and ``elbo`` (``[T + 1, B]``), and whose ``model`` is the user's model.
        data: a tensor ``[N, *event]`` (or a :class:`~learned_inference.data.CountMatrix`), reshuffled into
            batches of ``batch_size`` every epoch with a ``torch.Generator`` seeded by ``seed``; or any
            re-iterable of batches (a ``DataLoader``, a list of tensors), each a tensor ``[B, *event]`` or a tuple
            or list whose first item is one (``(x, label)`` as from ``TensorDataset``): the first item is used.
        epochs: passes over ``data`` (an int >= 1).
        optimizer: a ``torch.optim.Optimizer`` over the parameters to train. Default: Adam with ``lr`` over every
            parameter of the model (when it is an ``nn.Module``) and of the method that requires grad, each once
            (a method may hold the model's encoder too). Freeze a pre-trained model with
            ``model.requires_grad_(False)``, or pass an optimizer over the parameters to train.
        lr: the default Adam's learning rate (default 1e-3); an error with an explicit ``optimizer``, whose own
            learning rate applies.
        batch_size: examples per batch when ``data`` is a tensor, and per chunk of ``validation``.
        validation: data ``[M, *event]`` evaluated after every epoch with ``method.infer`` (no graph; the
            method's own number of steps): :attr:`FitHistory.validation_elbo`. Its noise comes from the global
            generator reseeded with ``seed`` and restored afterwards, so it is the same at every epoch and
            validation leaves training unchanged.
        transform: called as ``transform(x, generator=g)`` on every training batch (e.g.
            :func:`~learned_inference.data.binarize` for dynamic binarization); ``g`` is the seeded generator of
            the data order (a generator on the batch's device seeded by ``seed`` for batches not on the CPU).
        seed: seeds the data order and ``transform``'s generator; the same seed gives the same batches.
            Initialization and the training noise of ``method`` come from the global generator
            (``torch.manual_seed``).
        progress: show a progress bar over epochs with the latest train (and validation) ELBO.
        label: what the progress bar says is training (``"training <label>"``).
        max_grad_norm: clip the total gradient norm over the optimizer's parameters to this value before each
            step (``torch.nn.utils.clip_grad_norm_``); default: no clipping. A learned optimizer's loss sums the
            ELBO at every refinement step, and one batch where a step overshoots can give a gradient orders of
            magnitude above the usual (:attr:`FitHistory.grad_norm_max` shows it); clipping at a few times the
            typical norm (:attr:`FitHistory.grad_norm`) keeps such a batch from undoing training. With Adam, a
            clip that is always active only rescales every gradient alike, which Adam is nearly invariant to.
            Whatever this option, a batch whose gradient is not finite is skipped (no optimizer step) with a
            warning.
        device: where the model and the method are (e.g. ``"cuda"``): every batch (from a CPU tensor, a
            ``CountMatrix`` or a ``DataLoader``) and ``validation`` are moved there, CPU batches through pinned
            memory without blocking; None (default) uses the batches where they are.

    Returns:
        A :class:`FitHistory` with one entry per epoch.

    Raises:
        TypeError: ``method``, ``data``, a batch, ``validation``, ``optimizer`` or ``seed`` of the wrong type.
        ValueError: ``epochs`` or ``batch_size`` not an int >= 1, ``lr`` not positive or given with an
            ``optimizer``, empty data, ``validation`` whose examples' shape is not the training batches' (checked
            before the first step), an epoch without batches (a one-shot iterator), no trainable parameters, or a
            loss that depends on none of them (e.g. ``num_steps=0`` with a frozen model).

    Example:
        >>> import torch
        >>> from learned_inference import DecoderModel, IterativeInferenceOptimizer
        >>> from learned_inference.training import fit
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = DecoderModel(torch.nn.Linear(2, 6), likelihood="bernoulli", latent_dim=2)
        >>> inference = IterativeInferenceOptimizer(model, latent_dim=2, hidden_size=8, num_steps=2)
        >>> data = torch.bernoulli(torch.full((64, 6), 0.3))
        >>> history = fit(inference, data, epochs=3, batch_size=16, lr=1e-2, validation=data[:16], progress=False)
        >>> len(history.train_elbo), len(history.seconds), len(history.validation_elbo)
        (3, 3, 3)
    """
    if not isinstance(method, nn.Module):
        raise TypeError(f"method must be an inference method (an nn.Module), got {type(method).__name__}")
    check_int("epochs", epochs, minimum=1)
    check_int("batch_size", batch_size, minimum=1)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    batches = _batches(data, batch_size)
    target = None if device is None else torch.device(device)
    if validation is not None:
        validation = _to_device(check_data(validation, name="validation"), target)
    if optimizer is None:
        optimizer = torch.optim.Adam(_trainable_parameters(method), lr=_check_lr(1e-3 if lr is None else lr))
    elif not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
    elif lr is not None:
        raise ValueError("lr sets the default Adam's learning rate; with an explicit optimizer, set the learning "
                         "rate on the optimizer instead")
    if max_grad_norm is not None and (isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float))
                                      or not max_grad_norm > 0):
        raise ValueError(f"max_grad_norm must be a positive number or None (no clipping), got {max_grad_norm!r}")
    parameters = [p for group in optimizer.param_groups for p in group["params"]]

    generators = {torch.device("cpu"): torch.Generator().manual_seed(seed)}
    history = FitHistory()
    bar = tqdm(range(epochs), desc="training" if label is None else f"training {label}", disable=not progress)
    for epoch in bar:
        start, total, count = time.perf_counter(), 0.0, 0  # total: a float64 tensor on the batches' device
        norms: list[float] = []
        for x in batches(generators[torch.device("cpu")]):
            x = _to_device(x, target)
            if transform is not None:
                if x.device not in generators:
                    generators[x.device] = torch.Generator(x.device).manual_seed(seed)
                x = transform(x, generator=generators[x.device])
            if validation is not None and epoch == 0 and count == 0:
                _check_validation_shape(validation, x)  # before the first step, not after the first epoch
            optimizer.zero_grad()
            result = method(x)
            _check_trains(method, result.loss)
            result.loss.backward()
            norms.append(_clip_gradients(parameters, max_grad_norm))  # synchronises once per batch
            if math.isfinite(norms[-1]):  # else the gradients are not finite: no step
                optimizer.step()
            total = total + result.elbo[-1].detach().sum().double()
            count += len(x)
        if count == 0:
            raise ValueError(f"data gave no batches in epoch {epoch + 1}; pass a tensor or a re-iterable (a "
                             "DataLoader, a list of batches), not a one-shot iterator")
        history.train_elbo.append(float(total) / count)
        history.seconds.append(time.perf_counter() - start)
        _record_gradient_norms(history, norms, epoch)
        shown = {"train_elbo": f"{history.train_elbo[-1]:.2f}"}
        if validation is not None:
            history.validation_elbo.append(_validation_elbo(method, validation, batch_size, seed))
            shown["validation_elbo"] = f"{history.validation_elbo[-1]:.2f}"
        bar.set_postfix(shown)
    return history


def _to_device(x: Tensor, device: torch.device | None) -> Tensor:
    """``x`` on ``device`` (None: where it is); a CPU tensor bound for a GPU goes through pinned memory, and the
    copy does not block the host."""
    if device is None or x.device == device:
        return x
    if device.type == "cuda" and x.device.type == "cpu" and not x.is_pinned():
        x = x.pin_memory()
    return x.to(device, non_blocking=True)


def _clip_gradients(parameters: list[Tensor], max_norm: float | None) -> float:
    """The total gradient norm of ``parameters`` (those with a ``.grad``), before ``clip_grad_norm_`` scales the
    gradients to norm ``max_norm`` where it is exceeded (no clipping for None)."""
    grads = [p for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    return nn.utils.clip_grad_norm_(grads, math.inf if max_norm is None else max_norm).item()


def _record_gradient_norms(history: FitHistory, norms: list[float], epoch: int) -> None:
    """Appends the epoch's median and largest finite gradient norms and its skipped batches; warns about those."""
    finite = [n for n in norms if math.isfinite(n)]
    skipped = len(norms) - len(finite)
    history.grad_norm.append(statistics.median(finite) if finite else math.nan)
    history.grad_norm_max.append(max(finite) if finite else math.nan)
    history.skipped_batches.append(skipped)
    if skipped:
        warnings.warn(f"epoch {epoch + 1}: {skipped} of {len(norms)} batches had a non-finite gradient and were "
                      "skipped (no optimizer step). A model or method that overflows at some inputs: check the data "
                      "of those batches, lower the learning rate, or clip the gradient norm (max_grad_norm=...)",
                      RuntimeWarning, stacklevel=3)


def _check_validation_shape(validation: Tensor, batch: Tensor) -> None:
    """Raises a ``ValueError`` naming ``validation`` when its examples' shape is not that of the training batches."""
    if validation.shape[1:] == batch.shape[1:]:
        return
    raise ValueError(
        f"validation holds examples of shape {list(validation.shape[1:])}, but the training data's are "
        f"{list(batch.shape[1:])} (validation {list(validation.shape)}, first training batch {list(batch.shape)}): "
        "the model and the inference method are set up for the training data's shape, so validation must be "
        "held-out examples of the same data, e.g. fit(method, data[:-1000], validation=data[-1000:], ...), with the "
        "same preprocessing (flattening, vocabulary) as the training data"
    )


def _check_trains(method: nn.Module, loss: Tensor) -> None:
    """Raises a ``ValueError`` that says why when ``loss`` depends on no parameter that requires grad."""
    if loss.requires_grad:
        return
    steps = getattr(method, "num_steps", None)
    reason = (f"with num_steps={steps} no refinement step runs, so the update network is unused, and "
              if steps == 0 else "")
    raise ValueError(
        f"{type(method).__name__}(x).loss does not depend on any parameter that requires grad: {reason}the model's "
        "parameters are frozen (requires_grad=False) or not used by the loss. Nothing would train. Use num_steps >= 1 "
        "to train the update network, or unfreeze the model (model.requires_grad_(True)) to train it."
    )


def _check_lr(lr: object) -> float:
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    return float(lr)


def _batches(
    data: Tensor | CountMatrix | Iterable[Tensor], batch_size: int
) -> Callable[[torch.Generator], Iterator[Tensor]]:
    """Validates ``data``; returns a function giving one epoch's batches (the generator shuffles a tensor)."""
    if isinstance(data, (Tensor, CountMatrix)):
        if isinstance(data, Tensor):
            check_data(data, name="data")
        elif len(data) == 0:
            raise ValueError("data must be non-empty, got a CountMatrix with 0 rows")
        return lambda generator: iterate_batches(data, batch_size, generator=generator)
    if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise TypeError(f"data must be a tensor [N, *event] or an iterable of tensor batches (e.g. a DataLoader), "
                        f"got {type(data).__name__}")

    def epoch(generator: torch.Generator) -> Iterator[Tensor]:
        for batch in data:
            if isinstance(batch, (tuple, list)) and batch:
                batch = batch[0]
            yield check_data(batch, name="each batch of data")

    return epoch


def _trainable_parameters(method: nn.Module) -> list[nn.Parameter]:
    """The model's parameters, then the method's, that require grad, each once (in first-seen order)."""
    model = getattr(method, "model", None)
    modules = [model] if isinstance(model, nn.Module) else []
    seen: dict[int, nn.Parameter] = {}
    for module in [*modules, method]:
        for p in module.parameters():
            if p.requires_grad:
                seen.setdefault(id(p), p)
    if not seen:
        raise ValueError("the model and the method have no parameters that require grad: nothing to train; pass "
                         "optimizer=... over the parameters to train")
    return list(seen.values())


@contextmanager
def _seeded_global_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Inside: the global generators of the CPU (and of ``device`` if it is a GPU) seeded with ``seed``; their
    states are restored on exit."""
    cuda = [torch.cuda.current_device() if device.index is None else device.index] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        for index in cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


def _validation_elbo(method: InferenceMethod, x: Tensor, batch_size: int, seed: int) -> float:
    """The mean final-step ELBO of ``method.infer`` over ``x``, in chunks of ``batch_size``, with seeded noise."""
    total = x.new_zeros((), dtype=torch.float64)
    with _seeded_global_rng(seed, x.device):
        for chunk in x.split(batch_size):
            total = total + method.infer(chunk).elbo[-1].sum().double()
    return total.item() / len(x)
