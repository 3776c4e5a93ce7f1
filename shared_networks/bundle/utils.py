"""Small helpers for bundle configs."""

from __future__ import annotations

__all__ = ["as_bool"]

_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off", "none", ""}


def as_bool(value) -> bool:
    """Read a flag given on the command line: ``--resume False`` arrives as a bool, ``--resume false`` as the string
    "false", which plain ``bool()`` would take for True."""
    if isinstance(value, str):
        v = value.strip().lower()
        if v in _TRUE:
            return True
        if v in _FALSE:
            return False
        raise ValueError(f"expected a boolean (True/False), got {value!r}.")
    return bool(value)
