"""Small checks shared by several test files (test files never import each other)."""

from __future__ import annotations

from typing import Any


def numbers(value: Any) -> list[float]:
    """Every number in a JSON value (None is 'not measured', not a number)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return []
    if isinstance(value, (int, float)):
        return [float(value)]
    items = value.values() if isinstance(value, dict) else value
    return [n for item in items for n in numbers(item)]
