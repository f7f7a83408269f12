"""Small helpers shared by the click commands (rendering only)."""

from __future__ import annotations

import math

import click

from onnx_dynedit.report import to_json

DEVICE_OPTION = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None,
                             help="Where the torch twin runs (default auto: CUDA when available).")

ENGINE_OPTION = click.option("--engine", type=click.Choice(["local", "ray"]), default=None,
                             help="Where the per-shard work runs: this process (local, default) or a Ray "
                                  "cluster (ray; needs the [ray] extra).")
RAY_ADDRESS_OPTION = click.option("--ray-address", default=None, metavar="ADDR",
                                  help="With --engine ray: connect to this running Ray cluster (e.g. auto, "
                                       "ray://head:10001) instead of starting a local Ray for the run.")


# Option types that refuse values the library cannot use (one-line usage error, exit 2).
SEED = click.IntRange(0, 2 ** 32 - 1)


class FiniteFloat(click.ParamType):
    """A finite float in [low, high] (click.FloatRange lets NaN through)."""

    name = "float"

    def __init__(self, low: float | None = None, high: float | None = None):
        self.low, self.high = low, high

    def convert(self, value, param, ctx):
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        if self.low is not None and number < self.low:
            self.fail(f"{value} is below the smallest allowed value ({self.low:g})", param, ctx)
        if self.high is not None and number > self.high:
            self.fail(f"{value} is above the largest allowed value ({self.high:g})", param, ctx)
        return number


def echo_json(obj) -> None:
    click.echo(to_json(obj))


def table(rows: list[list], headers: list[str]) -> str:
    cells = [[str(c) for c in r] for r in [headers] + rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
