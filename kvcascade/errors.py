"""User-facing errors.

Everything a user can get wrong (unknown model or policy, bad budget, empty prompt, unreadable file,
unsupported architecture, CUDA where there is none) raises :class:`KVCascadeError` with one readable
sentence. The CLI prints that sentence on stderr and exits with status 2; the Python API lets it propagate.
"""


class KVCascadeError(ValueError):
    """A problem with the caller's input or environment, explained in one line."""
