"""The project's own error types, and the one-line reporting of them for command-line mains.

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


def reported(prog: str):
    """Decorate a command-line `main(argv) -> int`: a `SparseADError` prints as one line
    `prog: error: ...` on stderr and becomes its exit code, as `sparse-ad` does."""
    import functools
    import sys

    def wrap(main):
        @functools.wraps(main)
        def run(*args, **kwargs):
            try:
                return main(*args, **kwargs)
            except SparseADError as e:
                print(f"{prog}: error: {e}", file=sys.stderr)
                return e.exit_code
        return run
    return wrap
