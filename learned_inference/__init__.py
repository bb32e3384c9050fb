"""learned_inference: iterative amortized inference (learned optimizers for approximate posteriors) for PyTorch.

Example:
    >>> import torch
    >>> from learned_inference import DecoderModel, IterativeInferenceOptimizer
    >>> model = DecoderModel(torch.nn.Linear(2, 6), likelihood="bernoulli", latent_dim=2)
    >>> inference = IterativeInferenceOptimizer(model, latent_dim=2, num_steps=2, hidden_size=16)
    >>> inference.infer(torch.ones(3, 6)).elbo.shape
    torch.Size([3, 3])
"""

from learned_inference.adapters import DecoderModel, VAEModel
from learned_inference.ais import AISResult, annealed_importance_sampling
from learned_inference.baselines import (
    GradientEStep,
    SemiAmortized,
    StandardEncoder,
)
from learned_inference.block_family import BlockDistribution, BlockFamily
from learned_inference.checkpoint import CheckpointError
from learned_inference.context import StepContext
from learned_inference.encodings import (
    Concat,
    Data,
    Encoding,
    Errors,
    FeatureShapes,
    HierarchicalErrors,
    LogSignGradient,
    PosteriorParams,
    StandardizedGradient,
    make_encoding,
)
from learned_inference.engine import IterateAveraging, Training, TrainingLoss, Trajectory, refine
from learned_inference.errors import observation_errors, precision_weighted_errors
from learned_inference.families import Delta, DiagonalGaussian, Dirac, Family, make_family
from learned_inference.family_encoder import FamilyEncoder
from learned_inference.gaps import GapReport, gap_report
from learned_inference.hierarchical import HierarchicalModel
from learned_inference.inference import InferenceMethod, InferenceResult
from learned_inference.latent_space import LatentSpace
from learned_inference.likelihoods import (
    BernoulliLikelihood,
    BernoulliProbsLikelihood,
    GaussianLikelihood,
    Likelihood,
    MultinomialLikelihood,
    log_var_from_squared_error,
    make_likelihood,
)
from learned_inference.low_rank import LowRankGaussian
from learned_inference.mixture import GaussianMixture
from learned_inference.model import LatentModel
from learned_inference.networks import (
    HighwayEncoder,
    HighwayMLP,
    PerVariableNetwork,
    RecurrentNetwork,
    UpdateNetwork,
)
from learned_inference.objectives import Objective, elbo, elbo_and_grad, prior_moments
from learned_inference.optimizer import IterativeInferenceOptimizer
from learned_inference.recursive_mixture import RecursiveMixtureEncoder
from learned_inference.training import FitHistory, ModelWithInference, fit
from learned_inference.updates import (
    GatedUpdate,
    NaturalGradientUpdate,
    PerVariableUpdate,
    ResidualUpdate,
    StagedUpdate,
    Update,
    gated_update,
    residual_update,
)

__version__ = "0.1.0"

__all__ = [
    "AISResult",
    "BernoulliLikelihood",
    "BernoulliProbsLikelihood",
    "BlockDistribution",
    "BlockFamily",
    "CheckpointError",
    "Concat",
    "Data",
    "DecoderModel",
    "Delta",
    "DiagonalGaussian",
    "Dirac",
    "Encoding",
    "Errors",
    "Family",
    "FamilyEncoder",
    "FeatureShapes",
    "FitHistory",
    "GapReport",
    "GatedUpdate",
    "GaussianLikelihood",
    "GaussianMixture",
    "GradientEStep",
    "HierarchicalErrors",
    "HierarchicalModel",
    "HighwayEncoder",
    "HighwayMLP",
    "InferenceMethod",
    "InferenceResult",
    "IterateAveraging",
    "IterativeInferenceOptimizer",
    "LatentModel",
    "LatentSpace",
    "Likelihood",
    "LogSignGradient",
    "LowRankGaussian",
    "ModelWithInference",
    "MultinomialLikelihood",
    "NaturalGradientUpdate",
    "Objective",
    "PerVariableNetwork",
    "PerVariableUpdate",
    "PosteriorParams",
    "RecurrentNetwork",
    "RecursiveMixtureEncoder",
    "ResidualUpdate",
    "SemiAmortized",
    "StagedUpdate",
    "StandardEncoder",
    "StandardizedGradient",
    "StepContext",
    "Training",
    "TrainingLoss",
    "Trajectory",
    "Update",
    "UpdateNetwork",
    "VAEModel",
    "__version__",
    "annealed_importance_sampling",
    "elbo",
    "elbo_and_grad",
    "fit",
    "gap_report",
    "gated_update",
    "log_var_from_squared_error",
    "make_encoding",
    "make_family",
    "make_likelihood",
    "observation_errors",
    "precision_weighted_errors",
    "prior_moments",
    "refine",
    "residual_update",
]
