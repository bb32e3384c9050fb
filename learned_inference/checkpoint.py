"""Checkpoints that cannot be silently corrupted, and resume training exactly.

:func:`save_checkpoint` stores the ``state_dict()`` of every object given (models, the inference optimizer,
torch optimizers, schedulers) together with the random-number generators' states, refuses to write non-finite
parameters, and writes atomically (a temporary file renamed over the target), so an interrupted save leaves the
previous checkpoint intact. :func:`load_checkpoint` restores them; training resumed from a checkpoint with the same
seed then reproduces the uninterrupted run on CPU.

Example:
    >>> import tempfile, torch
    >>> net, path = torch.nn.Linear(2, 2), tempfile.mkdtemp() + "/run.pt"
    >>> save_checkpoint(path, step=3, net=net)
    >>> load_checkpoint(path, net=net)["step"]
    3
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["load_checkpoint", "save_checkpoint"]


def _non_finite_entries(state: Any, prefix: str) -> list[str]:
    """Names of floating-point tensors with NaN or infinite entries inside a (nested) state dict."""
    if isinstance(state, torch.Tensor):
        return [prefix] if state.is_floating_point() and not bool(torch.isfinite(state).all()) else []
    if isinstance(state, dict):
        return [name for key, value in state.items() for name in _non_finite_entries(value, f"{prefix}.{key}")]
    if isinstance(state, list | tuple):
        return [name for i, value in enumerate(state) for name in _non_finite_entries(value, f"{prefix}[{i}]")]
    return []


def save_checkpoint(path: str | os.PathLike[str], *, step: int, **objects: Any) -> None:
    """Saves ``objects``' state dicts, ``step`` and the RNG states to ``path`` atomically.

    Args:
        path: the checkpoint file.
        step: the training step (or epoch) reached, returned by :func:`load_checkpoint`.
        **objects: anything with ``state_dict()``, by name (e.g. ``model=..., inference=..., optim=...``).

    Raises:
        ValueError: if some tensor in a state dict is not finite (the previous checkpoint is kept).
    """
    states = {}
    for name, obj in objects.items():
        if not callable(getattr(obj, "state_dict", None)):
            raise TypeError(f"{name} must have a state_dict() method, got {type(obj).__name__}")
        states[name] = obj.state_dict()
    bad = [entry for name, state in states.items() for entry in _non_finite_entries(state, name)]
    if bad:
        raise ValueError(f"refusing to save a checkpoint with non-finite values in {bad[:5]}; {path} is unchanged")
    payload = {
        "step": step,
        "states": states,
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
    }
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | os.PathLike[str], *, restore_rng: bool = True, **objects: Any) -> dict[str, Any]:
    """Loads ``path`` into ``objects`` (by the names used when saving) and restores the RNG states.

    Args:
        path: the checkpoint file.
        restore_rng: also restore torch's and Python's random-number generators (for exact resumption).
        **objects: the objects to load into, with ``load_state_dict``.

    Returns:
        The checkpoint's contents (``step``, ``states``, ``rng``).
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    payload = torch.load(path, map_location="cpu", weights_only=False)
    missing = sorted(set(objects) - set(payload["states"]))
    if missing:
        raise KeyError(f"checkpoint {path} has no state for {missing}; it has {sorted(payload['states'])}")
    for name, obj in objects.items():
        obj.load_state_dict(payload["states"][name])
    if restore_rng:
        torch.set_rng_state(payload["rng"]["torch"])
        random.setstate(payload["rng"]["python"])
    return payload
