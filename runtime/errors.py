"""The one exception type users see.

Every problem caused by the user's input (a file, a plan, an argument) is raised as a
NextnError with a one-line message that names the thing at fault. The CLI prints it as
`error: ...` without a traceback; the Python API lets it propagate.
"""


class NextnError(Exception):
    """A user-facing error with a one-line message."""


class ModelFileError(NextnError):
    """A GGUF file is missing, malformed, truncated, of the wrong architecture or incomplete."""


class UnsupportedError(NextnError):
    """A request that this model or build cannot serve (e.g. MTP on a model without a nextn layer)."""
