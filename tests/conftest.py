"""Shared fixtures: ``device`` (from ``--device``, see the root conftest), the device that
``"auto"`` picks (the same), and a fixed seed."""

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
def _auto_device_is_the_suites(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """``device="auto"``, the default of training, ``iresnet eval`` and ``sample``, takes a GPU
    where one is available: hidden from it unless the suite runs with ``--device cuda``."""
    if not request.config.getoption("--device").startswith("cuda"):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
