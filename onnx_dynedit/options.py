"""What each option of the method accepts, written once: a bad value is a user error
(``InputError``, exit 2) that names the option, never a ValueError deep in the loop.

``check_config`` checks a ``RectifyConfig`` (``api.edit_config``, before any work);
``check_choice`` and ``check_range`` serve the other entry points (``api.locate_model``)."""

from __future__ import annotations

import math
from dataclasses import fields

from .errors import InputError, option

# option -> the values it takes
CHOICES = {
    "criterion": ("auto", "output", "attribution"),
    "objective": ("output", "local", "erase"),
    "key": ("diff", "corrupt"),
    "conv_keys": ("patch", "pixel", "both"),
    "ig_target": ("corrupt_logit", "gap"),
    "target": ("corrupt_logit", "gap"),
    "ig_reduction": ("sum", "abs"),
    "fit_method": ("auto", "adam", "lbfgs", "lm"),
    "screen": ("adam", "closed", "none"),
    "transplant": ("auto", "add", "affine", "gain", "paste"),
}

# option -> (kind, low, high, high_open); None: no bound
RANGES = {
    "max_edits": (int, 1, None, False),
    "max_degradation": (float, 0.0, 1.0, False),
    "target_gap": (float, 0.0, 1.0, False),
    "target_attribution": (float, 0.0, 1.0, False),
    "ig_steps": (int, 1, None, False),
    "steps": (int, 1, None, False),
    "fit_steps": (int, 1, None, False),
    "fit_lr": (float, 0.0, None, False),
    "lbfgs_evals": (int, 1, None, False),
    "attr_weight": (float, 0.0, None, False),
    "attr_steps": (int, 1, None, False),
    "locality_weight": (float, 0.0, None, False),
    "locality_batch": (int, 1, None, False),
    "lam": (float, 0.0, None, False),
    "candidates_per_step": (int, 1, None, False),
    "check_pairs": (int, 0, None, False),
    "check_candidates": (int, 0, None, False),
    "screen_steps": (int, 0, None, False),
    "screen_keep": (int, 1, None, False),
    "screen_above": (int, 0, None, False),
    "screen_check": (int, 1, None, False),
    "check_target": (float, 0.0, 1.0, False),
    "augment": (int, 0, None, False),
    "holdout": (float, 0.0, 1.0, True),
    "seed": (int, 0, 2 ** 32 - 1, False),
}

# options whose None means "the library picks" (RectifyConfig's comments say how)
OPTIONAL = {"augment"}

# option -> the range of each of its values (a non-empty sequence)
SEQUENCES = {
    "strengths": (float, 0.0, None, False),
}


def check_choice(name: str, value) -> None:
    """``value`` is one of ``CHOICES[name]``."""
    if value not in CHOICES[name]:
        raise InputError(f"{option(name)} {value!r} is not one of {', '.join(CHOICES[name])}")


def check_range(name: str, value) -> None:
    """``value`` is a finite number of the kind and in the range of ``RANGES[name]``."""
    _check_bounds(name, value, RANGES[name])


def _check_bounds(name: str, value, rule) -> None:
    kind, low, high, high_open = rule
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            kind is int and not float(value).is_integer()):
        raise InputError(f"{option(name)} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    bound = f"[{low:g}, {high:g}{')' if high_open else ']'}" if high is not None else f">= {low:g}"
    too_high = high is not None and (value >= high if high_open else value > high)
    if not math.isfinite(value) or value < low or too_high:
        raise InputError(f"{option(name)} must be {'in ' if high is not None else ''}{bound}, got {value!r}")


def check_config(config) -> None:
    """Every field of a config dataclass (``RectifyConfig``) that has a rule here."""
    for f in fields(config):
        value = getattr(config, f.name)
        if value is None and f.name in OPTIONAL:
            continue
        if f.name in CHOICES:
            check_choice(f.name, value)
        elif f.name in RANGES:
            check_range(f.name, value)
        elif f.name in SEQUENCES:
            check_sequence(f.name, value)


def check_sequence(name: str, values) -> None:
    """``values`` is a non-empty sequence of numbers, each in the range of ``SEQUENCES[name]``."""
    if isinstance(values, (str, bytes)) or not isinstance(values, (tuple, list)) or not values:
        raise InputError(f"{option(name)} must be one or more numbers, got {values!r}")
    for v in values:
        _check_bounds(name, v, SEQUENCES[name])


def check_known(config_type, names) -> None:
    """Every name in ``names`` is a field of ``config_type``."""
    known = {f.name for f in fields(config_type)}
    unknown = sorted(set(names) - known)
    if unknown:
        raise InputError(f"unknown option {unknown[0]!r}", hint="known: " + ", ".join(sorted(known)))
