"""Pyro integration: ``AutoIterativeNormal``, an amortized, iteratively refined autoguide (extra ``pyro``).

Usage::

    from learned_inference.integrations.pyro import AutoIterativeNormal, IterativeTrace_ELBO

    guide = AutoIterativeNormal(model)          # instead of AutoNormal(model) or a hand-written encoder guide
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), IterativeTrace_ELBO())
    guide.median(new_data)                      # new data: no re-fitting

Example:
    >>> import torch, pyro, pyro.distributions as dist
    >>> def model(x):
    ...     with pyro.plate("data", len(x)):
    ...         z = pyro.sample("z", dist.Normal(0.0, 1.0))
    ...         pyro.sample("x", dist.Normal(z, 0.5), obs=x)
    >>> guide = AutoIterativeNormal(model, num_steps=2, hidden_size=8)
    >>> guide(torch.zeros(4))["z"].shape
    torch.Size([4])
"""

try:
    import pyro  # noqa: F401
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "learned_inference.integrations.pyro needs Pyro: pip install pyro-ppl "
        "(or, from a clone, pip install -e '.[pyro]')"
    ) from error

from .elbo import (
    IterativeTrace_ELBO,
    IterativeTraceEnum_ELBO,
    IterativeTraceMeanField_ELBO,
    RefinementLossMixin,
    record_refinement_loss,
)
from .guide import AutoAmortizedNormal, AutoIterativeNormal
from .layout import LocalLayout, find_amortized_plates, local_layout
from .log_joint import LocalLogJoint

__all__ = [
    "AutoAmortizedNormal",
    "AutoIterativeNormal",
    "IterativeTraceEnum_ELBO",
    "IterativeTraceMeanField_ELBO",
    "IterativeTrace_ELBO",
    "LocalLayout",
    "LocalLogJoint",
    "RefinementLossMixin",
    "find_amortized_plates",
    "local_layout",
    "record_refinement_loss",
]
