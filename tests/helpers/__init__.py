"""Helpers shared by the tests: tiny models and tokenizers, a served model, the fixtures folder."""

from pathlib import Path

FIXTURES = Path(__file__).parents[1] / "fixtures"
