"""The one folder leanlm keeps things in: pulled models, built kernels, saved weights and compiled steps."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$LEANLM_HOME`` if set, else ``~/.cache/leanlm``; read at each call, so tests can point it elsewhere."""
    home = os.environ.get("LEANLM_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "leanlm"
