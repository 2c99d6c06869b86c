"""Shared fixtures: the real models are pulled once per run into the leanlm cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def _model(name: str, env: str) -> Path:
    if os.environ.get(env):
        return Path(os.environ[env])
    from leanlm.formats.hub import pull

    return pull(name, progress=False)


@pytest.fixture(scope="session")
def smol_path() -> Path:
    return _model("smollm2-135m", "LEANLM_TEST_SMOL")


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    return _model("gemma3-270m", "LEANLM_TEST_GEMMA")


REAL_MODEL_FIXTURES = {"smol_path", "gemma_path"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that needs a real model (pulled from PyPI wheels) so `-m "not real_model"` runs offline."""
    for item in items:
        if REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.real_model)
