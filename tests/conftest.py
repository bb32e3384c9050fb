"""Shared fixtures and small reference models for the tests."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

settings.register_profile("default", deadline=None, max_examples=25)
settings.register_profile("ci", deadline=None, max_examples=50)
settings.load_profile("ci" if os.environ.get("CI") else "default")


def mlp_decoder(latent_dim: int, data_dim: int, *, hidden: int = 16, seed: int = 0, dtype=torch.float64):
    """A small non-linear decoder with fixed weights."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(latent_dim, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, data_dim)
    ).to(dtype)


def train_update_network(inference, x_train, *, iterations: int, lr: float = 3e-3, batch_size: int = 64) -> None:
    """Trains only the update network (the model is fixed) with Adam and a cosine learning-rate decay."""
    optim = torch.optim.Adam(inference.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optim, iterations)
    for _ in range(iterations):
        optim.zero_grad()
        inference(x_train[torch.randint(0, len(x_train), (batch_size,))]).loss.backward()
        optim.step()
        schedule.step()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
