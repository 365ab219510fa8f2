"""Fixtures of the merge engine's tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.mergekit_side import side_python


@pytest.fixture(scope="session")
def mergekit_python() -> Path:
    """mergekit 0.1.5's side environment; the parity tests skip, saying why, where it is missing
    (and fail instead where ``MMMO_REQUIRE_MERGEKIT=1``, as in CI)."""
    python, problem = side_python()
    if python is None:
        message = f"{problem}; run `make mergekit`"
        if os.environ.get("MMMO_REQUIRE_MERGEKIT") == "1":
            pytest.fail(f"MMMO_REQUIRE_MERGEKIT=1: {message}", pytrace=False)
        pytest.skip(message)
    return python
