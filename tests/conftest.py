"""Fixtures shared by the whole suite."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def float64():
    """Default dtype float64 and seed 0 for one test; the dtype is restored afterwards.

    The float64 reference suites use it with ``pytestmark = pytest.mark.usefixtures("float64")``.
    """
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(old)
