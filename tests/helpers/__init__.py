"""Helpers shared by the tests: tiny models and tokenizers, a served model, the fixtures folder."""

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

FIXTURES = Path(__file__).parents[1] / "fixtures"

T = TypeVar("T")


def needs_cpu(*features: str, available: bool, reason: str) -> Callable[[T], T]:
    """Mark a test with the CPU features its kernels need (so `-m "not amx"` deselects it) and skip it where
    they are missing. For a module: `pytestmark = [pytest.mark.vnni, pytest.mark.skipif(...)]`."""
    def mark(test: T) -> T:
        test = pytest.mark.skipif(not available, reason=reason)(test)
        for feature in features:
            test = getattr(pytest.mark, feature)(test)
        return test
    return mark
