"""Errors that mean "the user gave us something wrong" (the CLI maps them to exit code 2)."""

from __future__ import annotations


class InputError(ValueError):
    """Bad user input: a parameter, config key, file or sample. The message must name the offender.

    `param`: the Python parameter (or config key) the message names, so a front end can say it in its own words:
    the CLI replaces it with its flag (`batch_size` -> `--batch-size`); a Python caller reads the name it passed.
    """

    def __init__(self, message: str, *, param: str | tuple[str, ...] | None = None):
        super().__init__(message)
        self.params: tuple[str, ...] = (param,) if isinstance(param, str) else tuple(param or ())
