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
