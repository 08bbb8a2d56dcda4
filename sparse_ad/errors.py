"""The project's own error types.

Everything a user can cause (a missing folder, a corrupt file, a bad config key) raises one
of these with a message that names the file and the fix. The CLI prints the message on one
line and exits non-zero without a traceback; anything else is a bug and keeps its traceback.
"""


class SparseADError(Exception):
    """A data or runtime problem the user can fix (CLI exit code 1)."""

    exit_code = 1


class ConfigError(SparseADError):
    """A usage or configuration problem (CLI exit code 2)."""

    exit_code = 2
