"""Shared fixtures and small reference models for the tests."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

from learned_inference import DecoderModel

settings.register_profile("default", deadline=None, max_examples=25)
settings.register_profile("ci", deadline=None, max_examples=50)
settings.load_profile("ci" if os.environ.get("CI") else "default")


def mlp_decoder(latent_dim: int, data_dim: int, *, hidden: int = 16, seed: int = 0, dtype=torch.float64):
    """A small non-linear decoder with fixed weights."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(latent_dim, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, data_dim)
    ).to(dtype)


@pytest.fixture
def bernoulli_model():
    return DecoderModel(mlp_decoder(3, 10), likelihood="bernoulli", latent_dim=3)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
