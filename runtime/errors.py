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


def short(value, limit: int = 60) -> str:
    """repr() of a value for an error message, cut to about `limit` characters: a damaged file's
    string or array is echoed as its start and its size, never whole (a one-line message stays
    one short line)."""
    if isinstance(value, (list, tuple)) and len(value) > 4:
        return f"[{', '.join(short(v, 20) for v in value[:3])}, ...] ({len(value)} items)"
    r = repr(value)
    if len(r) <= limit:
        return r
    size = f" ({len(value)} chars)" if isinstance(value, str) else ""
    return r[:limit - 3] + "..." + size
