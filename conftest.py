"""The ``--device`` option (``pytest --device cuda`` runs the suite on a GPU) and the doctest
namespace: the examples in the docstrings run with torch, nn and iresnet's names."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import iresnet


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", default="cpu", help="torch device the tests run on (cpu, cuda, cuda:1, ...)")


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace: dict) -> None:
    doctest_namespace.update(torch=torch, nn=nn, iresnet=iresnet)
    doctest_namespace.update({name: getattr(iresnet, name) for name in iresnet.__all__})
