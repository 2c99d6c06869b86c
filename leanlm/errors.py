"""User-facing errors: the CLI prints their message as one line and exits non-zero."""


class LeanLMError(Exception):
    """An error caused by the user's input or environment (bad file, unknown model, ...)."""


class UnsupportedError(LeanLMError):
    """The input is valid but uses something leanlm does not implement yet."""
