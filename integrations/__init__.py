"""Optional integrations of learned_inference with other libraries (installed with extras).

* :mod:`learned_inference.integrations.pyro`: ``AutoIterativeNormal``, an amortized, iteratively refined Pyro
  autoguide (extra ``pyro``).

Each integration imports its library only when it is imported itself, so ``import learned_inference`` never
needs them.
"""

__all__: list[str] = []
