"""Checkpoints whose corruption is detected on load, and that resume training exactly.

:func:`save_checkpoint` stores the ``state_dict()`` of every object given (models, the inference optimizer,
torch optimizers, schedulers) with the step reached and the random-number generators' states. It refuses to write
non-finite or not yet sized (lazy) parameters, and writes atomically: the bytes go to a temporary file in the same
folder, which is flushed, synced and renamed over the target, so a save interrupted at any point (even by
``SIGKILL``) leaves the previous checkpoint intact. Temporary files left by such interrupted saves of the same
target are removed by the next successful save. The file gets the permissions of a file the user creates
(``0o666`` less the umask), or keeps those of the checkpoint it replaces.

The file is what ``torch.save`` writes, followed by a 48-byte integrity record: a format tag, the payload's length
and its SHA-256. :func:`load_checkpoint` verifies the record before unpickling anything, so any changed, missing or
appended byte, a truncated or empty file, or a file that is not a checkpoint fails with an error naming the file
and the cause; the payload is still readable by ``torch.load`` alone.

:func:`load_checkpoint` leaves the global random state alone unless asked (``restore_rng=True``, for an exact
resumption: training resumed with it from a checkpoint reproduces the uninterrupted run on CPU).

Example:
    >>> import tempfile, torch
    >>> net, path = torch.nn.Linear(2, 2), tempfile.mkdtemp() + "/run.pt"
    >>> save_checkpoint(path, step=3, net=net)
    >>> load_checkpoint(path, net=net)["step"]
    3
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import os
import random
import secrets
import stat
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.nn.parameter import is_lazy

if sys.platform != "win32":
    import fcntl

__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint"]

#: the integrity record at the end of a checkpoint: tag, payload length (little-endian uint64), SHA-256 of the payload
_TAG = b"LICKPT01"
_RECORD = struct.Struct(f"<{len(_TAG)}sQ32s")


class CheckpointError(ValueError):
    """A file that :func:`load_checkpoint` cannot trust: corrupt, truncated, or not a checkpoint."""


def _entries(state: Any, prefix: str, test: Callable[[torch.Tensor], bool]) -> list[tuple[str, torch.Tensor]]:
    """The tensors inside a (nested) state dict for which ``test(tensor)`` holds, with their names."""
    if isinstance(state, torch.Tensor):
        return [(prefix, state)] if test(state) else []
    if isinstance(state, dict):
        return [entry for key, value in state.items() for entry in _entries(value, f"{prefix}.{key}", test)]
    if isinstance(state, list | tuple):
        return [entry for i, value in enumerate(state) for entry in _entries(value, f"{prefix}[{i}]", test)]
    return []


def _non_finite(tensor: torch.Tensor) -> bool:
    return tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())


def _non_finite_message(bad: list[tuple[str, torch.Tensor]], path: object) -> str:
    """What :func:`save_checkpoint` says when state entries hold NaN or infinite values: which, and where to look."""
    shown = [f"{name} ({int(tensor.isnan().sum())} NaN and {int(tensor.isinf().sum())} infinite of "
             f"{tensor.numel()} values)" for name, tensor in bad[:5]]
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    return (
        f"refusing to save a checkpoint with non-finite values in {', '.join(shown)}{more}. Each name is the keyword "
        "you passed (e.g. model=, optim=) followed by the key in its state_dict(). NaN or infinite parameters or "
        "optimizer state mean training diverged before this save: an optimizer step took a non-finite or exploding "
        "gradient. Look at the losses and gradient norms of the last steps (FitHistory.train_elbo and grad_norm_max "
        "with fit) and at the data of those batches; clip the gradient norm (fit(max_grad_norm=...) or "
        "torch.nn.utils.clip_grad_norm_) or lower the learning rate, and resume from the last good checkpoint: "
        f"{path} is unchanged"
    )


_TOKEN_HEX = 16  # hexadecimal digits of the random part of a temporary file's name


def _temporary(target: Path) -> Path:
    """A fresh temporary file name for a save of ``target``: ``.run.pt.<16 random hex digits>.tmp`` next to it."""
    return target.parent / f".{target.name}.{secrets.token_hex(_TOKEN_HEX // 2)}.tmp"


def _temporaries(target: Path) -> str:
    """The glob pattern that matches exactly the names :func:`_temporary` gives."""
    return f".{glob.escape(target.name)}.{'[0-9a-f]' * _TOKEN_HEX}.tmp"


def _remove_stale_temporaries(target: Path, keep: Path) -> None:
    """Removes temporary files of ``target`` left by saves that were interrupted (their writer is gone).

    A save holds an exclusive ``flock`` on its temporary file from its creation until it is renamed, so a file that
    can be locked has no writer left; on Windows a file still open in a writer cannot be deleted.
    """
    for path in target.parent.glob(_temporaries(target)):
        if path == keep:
            continue
        if sys.platform == "win32":
            with contextlib.suppress(OSError):
                path.unlink()
            continue
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            path.unlink(missing_ok=True)
        except OSError:
            pass  # locked: a save in progress
        finally:
            os.close(fd)


def _create_temporary(target: Path) -> tuple[int, Path]:
    """A new file next to ``target``, locked (POSIX) until the save closes it, with the permissions a file the user
    creates gets (``0o666`` less the umask), or those of the checkpoint it will replace."""
    mode = stat.S_IMODE(target.stat().st_mode) if target.exists() else 0o666
    while True:
        path = _temporary(target)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), mode)
        except FileExistsError:
            continue
        if sys.platform != "win32":
            fcntl.flock(fd, fcntl.LOCK_EX)  # waits only while a cleaner deletes it ...
            if os.fstat(fd).st_nlink == 0:  # ... in the instant between its creation and this lock: start again
                os.close(fd)
                continue
        if target.exists():
            os.chmod(path, mode)  # the replaced checkpoint's mode, not reduced by the umask
        return fd, path


def _sync_folder(folder: Path) -> None:
    """Makes the rename durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(path: str | os.PathLike[str], *, step: int, **objects: Any) -> None:
    """Saves ``objects``' state dicts, ``step`` and the RNG states to ``path`` atomically, with an integrity record.

    Args:
        path: the checkpoint file (its folder is created if needed).
        step: the training step (or epoch) reached, returned by :func:`load_checkpoint`.
        **objects: anything with ``state_dict()``, by name (e.g. ``model=..., inference=..., optim=...``).

    Raises:
        TypeError: an object without ``state_dict()``.
        ValueError: a tensor in a state dict is not finite, or a lazy layer is not sized yet (the previous
            checkpoint is kept in both cases).
    """
    states = {}
    for name, obj in objects.items():
        if not callable(getattr(obj, "state_dict", None)):
            raise TypeError(f"{name} must have a state_dict() method, got {type(obj).__name__}")
        states[name] = obj.state_dict()
    lazy = [entry for name, state in states.items() for entry, _ in _entries(state, name, is_lazy)]
    if lazy:
        raise ValueError(
            f"refusing to save a checkpoint with parameters that are not sized yet ({lazy[:5]}): a lazy layer gets "
            "its shape from its first input. Call the module once on data first (e.g. model(x[:1]), or "
            f"inference.infer(x[:1], num_steps=0) for an inference method); {path} is unchanged"
        )
    bad = [entry for name, state in states.items() for entry in _entries(state, name, _non_finite)]
    if bad:
        raise ValueError(_non_finite_message(bad, path))
    buffer = io.BytesIO()
    torch.save({"step": step, "states": states, "rng": _rng_states()}, buffer)
    payload = buffer.getbuffer()
    record = _RECORD.pack(_TAG, len(payload), hashlib.sha256(payload).digest())
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temporary(target)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.write(record)
            handle.flush()
            os.fsync(handle.fileno())
            if sys.platform != "win32":
                os.replace(tmp, target)  # while still locked (Windows cannot rename an open file)
        if sys.platform == "win32":
            os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _sync_folder(target.parent)
    _remove_stale_temporaries(target, keep=tmp)


def _verified_payload(path: Path) -> bytes:
    """The file's bytes after checking its integrity record (raises :class:`CheckpointError` naming the cause)."""
    data = path.read_bytes()
    if len(data) < _RECORD.size:
        what = "empty" if not data else f"only {len(data)} bytes long"
        raise CheckpointError(f"{path} is {what}: a truncated file, or not a checkpoint written by save_checkpoint")
    tag, length, digest = _RECORD.unpack_from(data, len(data) - _RECORD.size)
    if tag != _TAG:
        raise CheckpointError(
            f"{path} has no checkpoint integrity record at its end: it is truncated or corrupt, or not a checkpoint "
            "written by learned_inference.checkpoint.save_checkpoint (a plain torch.save file loads with torch.load)"
        )
    if length != len(data) - _RECORD.size:
        raise CheckpointError(f"{path} is corrupt: its integrity record gives a payload of {length} bytes, but the "
                              f"file holds {len(data) - _RECORD.size}")
    if hashlib.sha256(memoryview(data)[:length]).digest() != digest:
        raise CheckpointError(f"{path} is corrupt: its SHA-256 does not match the one recorded when it was saved "
                              "(bytes changed on disk or in transfer); use an earlier checkpoint")
    return data


def load_checkpoint(
    path: str | os.PathLike[str], *, restore_rng: bool = False, **objects: Any
) -> dict[str, Any]:
    """Verifies ``path``, loads it into ``objects`` (by the names used when saving) and returns its contents.

    Args:
        path: the checkpoint file.
        restore_rng: also set torch's and Python's global random-number generators to their state at saving, for
            an exact resumption of training. Off by default: it replaces the caller's random state.
        **objects: the objects to load into, with ``load_state_dict``.

    Returns:
        The checkpoint's contents: ``step``, ``states`` (the state dicts by name) and ``rng``.

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: (a ``ValueError``) the file is empty, truncated, corrupt, or not a checkpoint.
        KeyError: the checkpoint has no state for one of ``objects``.
        ValueError: an object rejects its state (e.g. sized for other data); the error names the object.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"no checkpoint at {file}")
    data = _verified_payload(file)
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception as error:
        raise CheckpointError(f"{file} passed its integrity check but torch.load cannot read it ({error}); was it "
                              "written by another torch version?") from error
    if not isinstance(payload, dict) or not {"step", "states", "rng"} <= set(payload):
        raise CheckpointError(f"{file} is not a checkpoint written by save_checkpoint (no step, states and rng)")
    missing = sorted(set(objects) - set(payload["states"]))
    if missing:
        raise KeyError(f"checkpoint {file} has no state for {missing}; it has {sorted(payload['states'])}")
    for name, obj in objects.items():
        try:
            obj.load_state_dict(payload["states"][name])
        except (RuntimeError, ValueError, KeyError) as error:
            raise ValueError(f"cannot load the state saved as {name!r} in {file} into {name} "
                             f"({type(obj).__name__}): {error}") from error
    if restore_rng:
        _restore_rng_states(payload["rng"], file)
    return payload


def _rng_states() -> dict[str, Any]:
    """The global generators' states: Python's, torch's CPU one, and every CUDA device's when CUDA is in use."""
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _restore_rng_states(states: dict[str, Any], file: Path) -> None:
    """Sets the global generators to ``states`` (:func:`_rng_states`); CUDA states need the same number of devices."""
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    cuda = states.get("cuda")
    if cuda is None:
        return
    if not torch.cuda.is_available() or torch.cuda.device_count() != len(cuda):
        raise CheckpointError(
            f"{file} holds the random states of {len(cuda)} CUDA device(s), but this machine has "
            f"{torch.cuda.device_count() if torch.cuda.is_available() else 'no'} CUDA device(s): restore_rng=True "
            "needs the devices the run was saved on; load with restore_rng=False to resume with fresh CUDA streams"
        )
    torch.cuda.set_rng_state_all(cuda)
