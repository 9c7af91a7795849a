"""Shared fixtures: ``device`` (from ``--device``, see the root conftest) and a fixed seed."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> torch.device:
    name = request.config.getoption("--device")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise pytest.UsageError(f"--device {name} given but CUDA is not available")
    return torch.device(name)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
