"""Small input checks shared by every method: each raises an error that names the argument, the cause and the fix.

Example:
    >>> check_int("num_steps", 3, minimum=0)
    3
    >>> check_int("num_steps", -1, minimum=0)
    Traceback (most recent call last):
    ...
    ValueError: num_steps must be an int >= 0, got -1
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["check_bounds", "check_data", "check_int", "check_placement", "check_tensor"]


def check_int(name: str, value: object, *, minimum: int) -> int:
    """Returns ``value`` if it is an int >= ``minimum``, else raises a ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_bounds(name: str, value: tuple[float, float]) -> tuple[float, float]:
    """Returns ``value`` as floats if it is a range ``(low, high)`` with low < high, else raises a ``ValueError``
    naming ``name``."""
    low, high = value
    if not low < high:
        raise ValueError(f"{name} must be (low, high) with low < high, got {value!r}")
    return float(low), float(high)


def check_data(x: object, *, name: str = "x") -> Tensor:
    """Returns ``x`` if it is a non-empty, finite, floating-point batch ``[B, *event]``; else raises, naming the
    argument (``name``) and why."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}; convert it with .float()")
    if x.dtype == torch.float16:
        raise TypeError(
            f"{name} is float16: half precision's largest value, 65504, is below exp(12), the inverse posterior "
            "variance at the posterior families' lower log-variance bound, and the gradient encodings' eps = 1e-8 "
            "rounds to 0 in it, so refinement would overflow. Keep the data and the model in float32 and train under "
            "torch.autocast(device_type, dtype=torch.bfloat16), or float16 autocast with a torch.amp.GradScaler; or "
            "use bfloat16 data and model (the range of float32)."
        )
    if x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty batch of shape [B, *event] with B >= 1, got {list(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        bad = (~torch.isfinite(x)).flatten(1).any(1).nonzero().flatten()
        raise ValueError(
            f"{name} contains NaN or infinite values in {bad.numel()} example(s) (first: {bad[:5].tolist()}); "
            "clean or drop them"
        )
    return x


def check_tensor(
    name: str, value: object, *, shape: Sequence[int], like: Tensor, layout: str, finite: bool = True
) -> Tensor:
    """Returns ``value`` if it is a (finite) tensor of ``shape`` with ``like``'s dtype and device; else raises.

    For tensors a user passes next to x (``noise``, ``init_params``): the error names the argument, what is wrong
    and how to fix it.

    Args:
        name: the argument as the user wrote it (e.g. ``"init_params['loc']"``).
        value: what was passed.
        shape: the expected shape.
        like: a tensor with the expected dtype and device (x).
        layout: the shape's meaning, shown in errors (e.g. ``"[B, D]"``).
        finite: also require finite entries.

    Raises:
        TypeError: not a tensor.
        ValueError: wrong shape, dtype or device, or NaN/infinite entries.

    Example:
        >>> check_tensor("noise", torch.zeros(2, 3), shape=[2, 4], like=torch.zeros(0), layout="[S, D]")
        Traceback (most recent call last):
        ...
        ValueError: noise must have shape [2, 4] ([S, D]), got [2, 3]
    """
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {list(shape)} ({layout}), got {type(value).__name__}")
    if list(value.shape) != list(shape):
        raise ValueError(f"{name} must have shape {list(shape)} ({layout}), got {list(value.shape)}")
    if value.dtype != like.dtype:
        raise ValueError(f"{name} has dtype {value.dtype} but x has {like.dtype}; convert it with .to(x.dtype)")
    if value.device != like.device:
        raise ValueError(f"{name} is on {value.device} but x is on {like.device}; move it with .to(x.device)")
    if finite and not bool(torch.isfinite(value).all()):
        where = (~torch.isfinite(value)).nonzero()[0].tolist()
        raise ValueError(f"{name} contains NaN or infinite values (first at index {where}); pass finite values")
    return value


def check_placement(x: Tensor, owners: dict[str, object]) -> None:
    """x and every owner's floating-point parameters share device and dtype (nothing is moved silently).

    Args:
        x: the data.
        owners: ``{"the model": model, "the inference method": method}``; owners that are not modules are skipped.
    """
    for owner, module in owners.items():
        parameters = module.parameters() if isinstance(module, nn.Module) else iter(())
        first = next((p for p in parameters if p.is_floating_point()), None)
        if first is None:
            continue
        if first.device != x.device:
            raise ValueError(f"x is on {x.device} but {owner}'s parameters are on {first.device}; move one of "
                             f"them (e.g. x.to({str(first.device)!r}))")
        if first.dtype != x.dtype:
            what = "model" if owner == "the model" else "inference"
            raise ValueError(f"x has dtype {x.dtype} but {owner}'s parameters are {first.dtype}; convert one "
                             f"of them (e.g. {what}.to({x.dtype}) or x.to({first.dtype}))")
