"""Errors that mean "the user gave us something wrong" (the CLI maps them to exit code 2)."""


class InputError(ValueError):
    """Bad user input: a flag, config key, file or sample. The message must name the offender."""
