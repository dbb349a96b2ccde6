"""One family of errors that mean "the input is wrong", each with a message meant for the user.

The CLI has one handler for them (``codetune.cli``): it prints ``error: <message>`` on one line and
exits non-zero, without a traceback. Raise one of these wherever bad input is detected; say what
the input was (the file, row, field or option) and what to do about it.
"""

from __future__ import annotations


class CodetuneError(Exception):
    """Bad input or a refused action, with a message that names the input and what to do."""


class RecipeError(CodetuneError, ValueError):
    """A recipe (or a setting derived from it) that cannot be used."""


class DataError(CodetuneError, ValueError):
    """A problem with the input data, naming the file, the row and the field."""


class InputError(CodetuneError, ValueError):
    """A bad command-line input: a missing file, a folder where a file was expected, a malformed row."""


class OutputError(CodetuneError):
    """A write that codetune refuses (it would lose data) or cannot do (a read-only folder)."""


class GGUFExportError(RecipeError):
    """A model folder that cannot be exported to GGUF, with a message meant for the user."""
