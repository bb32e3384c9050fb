"""The user's model in training mode: batch norm and dropout while the model is trained jointly with inference.

Users train VAEs with batch norm and dropout in training mode. Where the user's own training loop evaluates the
model once per training step, a refinement run evaluates it at every step (the ELBO and its λ-gradient, through
``torch.func``). Inside a run (:class:`TrainModeRun`, active around the run's model evaluations):

* **Batch norm in training mode** normalises with the statistics of the batch it is given, exactly as in the
  user's loop, but leaves its running statistics (and ``num_batches_tracked``) alone: ``torch.func`` cannot
  differentiate through their in-place update, and T + 1 updates per training step would move them T + 1 times as
  fast. The one evaluation that trains the model, L_T (:meth:`TrainModeRun.updating_statistics`), runs as the
  user's forward does, so the running statistics move once per training step, on the batch statistics of the
  model's input at the final posterior, as the user's loop would move them. Batch norm couples the examples of a
  batch: the λ-gradient the steps see is then the gradient of the batch's *total* ELBO, Σ_b L(λ_b; x_b), whose
  row b also depends, through the batch's mean and variance, on the other examples' λ. That is the user's model,
  not an approximation.
* **Dropout in training mode** draws the same mask at every evaluation of one run: before each dropout call the
  generator of its device is seeded from a per-run seed (drawn once, lazily, from the global generator) and the
  module's position, and restored after it. So the steps ascend the ELBO of one sub-network, the same one the
  model's loss L_T is evaluated with (one mask per training step, as one forward of the user's loop), and the
  global random stream is otherwise left as it was. The next run draws new masks.

At test time (``infer()``) and for a frozen model these modes are errors or warnings, decided by
:class:`ModelModes` (found by :func:`~learned_inference.model.check_log_joint` on the first batch): batch norm in
training mode would move its running statistics with every test batch and make each example's posterior depend
on the others.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    >>> with TrainModeRun(modules=list(net.modules())):
    ...     _ = net(torch.randn(4, 2))                     # batch statistics, running statistics untouched
    >>> int(net[1].num_batches_tracked)
    0
    >>> _ = net(torch.randn(4, 2))                         # the user's own forward
    >>> int(net[1].num_batches_tracked)
    1
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd
from torch.utils.hooks import RemovableHandle

__all__ = ["ModelModes", "TrainModeRun", "batch_norm_error"]

#: the range of the per-run dropout seed (drawn from the global CPU generator)
_SEED_RANGE = 2**62


def _generator(device: torch.device) -> torch.Generator:
    """The default generator of ``device`` (the one dropout draws its masks from)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.default_generators[index]
    return torch.default_generator


class TrainModeRun:
    """A context for one refinement run's model evaluations: see the module docstring.

    Active (between ``__enter__`` and ``__exit__``, re-entrant) it watches every module call through global forward
    hooks, acting only on batch norms and dropouts in training mode among ``modules``; it changes nothing else,
    and leaves every module as it found it on exit, also after an error.

    Args:
        modules: the modules it acts on (the user's model's); None: every module (a Pyro model, whose modules are
            not known in advance; activate it around the model's runs only).
        updates_statistics: whether a batch norm it acts on is in training mode (then the final, training
            evaluation runs under :meth:`updating_statistics` with plain autograd; see
            :meth:`~learned_inference.objectives.Objective.elbo_and_grad`).
    """

    def __init__(self, *, modules: Iterable[nn.Module] | None = None, updates_statistics: bool = False) -> None:
        self._ids = None if modules is None else {id(m) for m in modules}
        self.updates_statistics = updates_statistics
        #: the batch norms in training mode the run met (for a test-time error where modules are not known ahead)
        self.batch_norms_in_training: list[nn.Module] = []
        self._updating = False
        self._seed: int | None = None
        self._ordinals: dict[int, int] = {}
        self._switched: list[_BatchNorm] = []
        self._saved: list[tuple[torch.Generator, Tensor]] = []
        self._handles: list[RemovableHandle] = []
        self._depth = 0

    def __enter__(self) -> TrainModeRun:
        if self._depth == 0:
            self._handles = [nn.modules.module.register_module_forward_pre_hook(self._before),
                             nn.modules.module.register_module_forward_hook(self._after)]
        self._depth += 1
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._depth -= 1
        if self._depth:
            return
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._restore_all()

    @contextmanager
    def updating_statistics(self) -> Iterator[None]:
        """Inside: batch norms in training mode update their running statistics, as in the user's forward."""
        previous, self._updating = self._updating, True
        try:
            yield
        finally:
            self._updating = previous

    def _acts_on(self, module: nn.Module) -> bool:
        return self._ids is None or id(module) in self._ids

    def _before(self, module: nn.Module, inputs: Any) -> None:
        if not module.training or not self._acts_on(module):
            return
        if isinstance(module, _BatchNorm):
            if all(m is not module for m in self.batch_norms_in_training):
                self.batch_norms_in_training.append(module)
            if module.track_running_stats and not self._updating:
                # training mode without tracking: batch statistics, and no in-place update of the buffers
                module.track_running_stats = False
                self._switched.append(module)
        elif isinstance(module, _DropoutNd) and inputs and isinstance(inputs[0], Tensor):
            if self._seed is None:  # drawn before the state is saved, so that the draw stays taken
                self._seed = int(torch.randint(_SEED_RANGE, (), generator=torch.default_generator))
            generator = _generator(inputs[0].device)
            self._saved.append((generator, generator.get_state()))
            ordinal = self._ordinals.setdefault(id(module), len(self._ordinals))
            generator.manual_seed(self._seed + ordinal)

    def _after(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if self._switched and self._switched[-1] is module:
            self._switched.pop().track_running_stats = True
        elif self._saved and isinstance(module, _DropoutNd) and module.training and self._acts_on(module):
            generator, state = self._saved.pop()
            generator.set_state(state)

    def _restore_all(self) -> None:
        for module in reversed(self._switched):
            module.track_running_stats = True
        self._switched = []
        for generator, state in reversed(self._saved):
            generator.set_state(state)
        self._saved = []


def batch_norm_error(name: str, module: nn.Module, *, cause: str) -> ValueError:
    """The error for a batch norm that log_joint reaches in a mode inference cannot serve.

    Args:
        name: the module's name (``model.decoder.1``).
        module: the batch norm.
        cause: ``"no_running_stats"``, ``"test_time"`` or ``"frozen"``.
    """
    label = f"{name} ({type(module).__name__})"
    if cause == "no_running_stats":
        return ValueError(
            f"{label} has track_running_stats=False and log_joint uses it: it normalises each example with statistics "
            "of the whole batch in every mode, so at test time each example's posterior would depend on the others; "
            "model.eval() does not change that. Use a per-example normalisation (LayerNorm, GroupNorm) in the model, "
            "or batch norm with running statistics (the default)."
        )
    coupling = ("batch norm in training mode normalises each example with the statistics of the whole batch (each "
                "example's posterior would depend on the others) and moves its running statistics")
    if cause == "frozen":
        return ValueError(
            f"{label} is in training mode and log_joint uses it, but no parameter of the model requires grad: a "
            f"frozen model. {coupling} at every training step of the inference method, although the model does not "
            "learn. Call model.eval() before training inference on a frozen model (batch norm then applies its "
            "running statistics, the same map to every example)."
        )
    return ValueError(
        f"{label} is in training mode at test time (a call without gradients: infer(), a Pyro guide's median() or "
        f"Predictive) and log_joint uses it: {coupling} with every test batch. Call model.eval() before inference "
        "(for a Pyro model, on the modules it registers with pyro.module). (While the model trains jointly "
        "with the inference method, forward() under autograd accepts training mode: the steps use the batch's "
        "statistics and the running statistics move once per training step; see docs/recipes.md.)"
    )


@dataclass
class ModelModes:
    """The batch norms and dropouts log_joint uses (found on the first batch), and what their modes allow.

    Attributes:
        batch_norms: ``(name, module)`` of every batch norm log_joint uses.
        dropouts: ``(name, module)`` of every dropout log_joint uses.
        modules: every module of the model (what a :class:`TrainModeRun` acts on; their parameters tell a
            model that trains from a frozen one).
    """

    batch_norms: Sequence[tuple[str, nn.Module]] = ()
    dropouts: Sequence[tuple[str, nn.Module]] = ()
    modules: Sequence[nn.Module] = ()
    _warned: bool = field(default=False, repr=False)

    def run(self, *, train: bool) -> TrainModeRun | None:
        """The context of one run, or None when no batch norm or dropout it uses is in training mode.

        Raises the error of :func:`batch_norm_error` for a batch norm in training mode at test time (``train``
        False) or in a frozen model, and warns (once) of a dropout in training mode at test time.

        Args:
            train: whether the run trains (a ``forward`` under autograd).
        """
        batch_norms = [(name, m) for name, m in self.batch_norms if m.training]
        dropouts = [(name, m) for name, m in self.dropouts if m.training]
        if batch_norms and not train:
            raise batch_norm_error(*batch_norms[0], cause="test_time")
        parameters = (p for m in self.modules for p in m.parameters(recurse=False))
        if batch_norms and not any(p.requires_grad for p in parameters):
            raise batch_norm_error(*batch_norms[0], cause="frozen")
        if dropouts and not train and not self._warned:
            self._warned = True
            names = ", ".join(f"{name} ({type(m).__name__})" for name, m in dropouts)
            warnings.warn(
                f"{names} {'is' if len(dropouts) == 1 else 'are'} in training mode at test time and used by log_joint: "
                "each run refines the posterior of one random sub-network (one mask per run, the same at every "
                "step), so test-time results are random. Call model.eval() for inference; keep training mode only "
                "while training the model, if the dropout is a deliberate regulariser there.",
                RuntimeWarning,
                stacklevel=6,
            )
        if not batch_norms and not dropouts:
            return None
        return TrainModeRun(modules=self.modules, updates_statistics=bool(batch_norms))
