"""Small helpers shared by the click commands (rendering only)."""

from __future__ import annotations

import json
import math

import click

DEVICE_OPTION = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None,
                             help="Where the torch twin runs (default auto: CUDA when available).")


def _clean(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def echo_json(obj) -> None:
    click.echo(json.dumps(_clean(obj), indent=2, sort_keys=False))


def table(rows: list[list], headers: list[str]) -> str:
    cells = [[str(c) for c in r] for r in [headers] + rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
