"""Checks of solver options, at construction."""

import numpy as np


def check_count(name: str, value, *, optional: bool = False) -> None:
    """Raises unless `value` is an integer of at least 1 (or `None`, if `optional`):
    a `TypeError` for the wrong type (bools and floats included, which would otherwise
    reach shapes or loop bounds), a `ValueError` for a value below 1."""
    if value is None and optional:
        return
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{name}` must be an int, got {value!r}.")
    if value < 1:
        raise ValueError(f"`{name}` must be at least 1, got {value}.")
