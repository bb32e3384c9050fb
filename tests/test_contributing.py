"""CONTRIBUTING.md's python blocks run as written, in order: its worked example adds a posterior family exactly as
the page says, and every method takes it."""

from __future__ import annotations

import re
from pathlib import Path

import torch

PAGE = Path(__file__).resolve().parents[1] / "CONTRIBUTING.md"


def test_the_worked_example_adds_a_family_that_every_method_takes():
    blocks = re.findall(r"^```python\n(.*?)^```", PAGE.read_text(encoding="utf-8"), flags=re.MULTILINE | re.DOTALL)
    assert len(blocks) == 2  # the family, then using it
    torch.manual_seed(0)
    namespace: dict = {"__name__": "contributing"}
    for number, block in enumerate(blocks, 1):
        exec(compile(block, f"{PAGE}:block {number}", "exec"), namespace)
    family = namespace["IsotropicGaussian"]()
    assert family.param_sizes(3) == {"loc": 3, "log_var": 1}
    # the family's own maths against torch.distributions: entropy and KL of the same Gaussian
    params = {"loc": torch.randn(4, 3, dtype=torch.float64), "log_var": torch.randn(4, 1, dtype=torch.float64)}
    q = family.distribution(params)
    torch.testing.assert_close(family.entropy(params), q.entropy())
    prior_loc, prior_var = torch.zeros(3, dtype=torch.float64), torch.full((3,), 2.0, dtype=torch.float64)
    prior = torch.distributions.Independent(torch.distributions.Normal(prior_loc, prior_var.sqrt()), 1)
    torch.testing.assert_close(family.kl_divergence(params, prior_loc, prior_var),
                               torch.distributions.kl_divergence(q, prior))
