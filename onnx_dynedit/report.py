"""Renderings of result objects shared by the library and the CLI (numpy only)."""

from __future__ import annotations

import json
import math

import numpy as np


def jsonable(obj):
    """A copy safe for strict JSON: numpy scalars become Python numbers, NaN/Inf become None."""
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def to_json(obj, *, indent: int = 2) -> str:
    return json.dumps(jsonable(obj), indent=indent)
