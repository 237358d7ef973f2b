"""User-facing errors: one line that says what is wrong and what to do."""


class DiffusmithError(ValueError):
    """A mistake the user can fix (bad path, bad argument, wrong checkpoint).

    The CLI prints its message as one line (no traceback unless --debug)."""
