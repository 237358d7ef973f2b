"""User-facing errors: one line that says what is wrong and what to do."""

import math
import numbers


class DiffusmithError(ValueError):
    """A mistake the user can fix (bad path, bad argument, wrong checkpoint).

    The CLI prints its message as one line (no traceback unless --debug)."""


def is_finite_number(value: object) -> bool:
    """Whether ``value`` is a finite real number (numpy's included; a bool is not): the test behind the
    one-line errors for numeric arguments of the Python API."""
    return not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
