"""Lightning integration (extra ``lightning``): train a model and its learned optimizer with any strategy.

Example:
    >>> from learned_inference.integrations.lightning import IterativeInferenceModule
"""

from .module import IterativeInferenceModule, batch_data

__all__ = ["IterativeInferenceModule", "batch_data"]
