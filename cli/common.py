"""Small helpers shared by the click commands (rendering only)."""

from __future__ import annotations

import functools
import math

import click

from onnx_dynedit import memory, progress
from onnx_dynedit import threads as _threads
from onnx_dynedit.report import to_json

DEVICE_OPTION = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None,
                             help="Where the torch twin runs (default auto: CUDA when available).")

ENGINE_OPTION = click.option("--engine", type=click.Choice(["local", "ray"]), default=None,
                             help="Where the per-shard work runs: this process (local, default) or a Ray "
                                  "cluster (ray; needs the [ray] extra).")
RAY_ADDRESS_OPTION = click.option("--ray-address", default=None, metavar="ADDR",
                                  help="With --engine ray: connect to this running Ray cluster (e.g. auto, "
                                       "ray://head:10001) instead of starting a local Ray for the run.")




# The flag of each library option whose flag is not ``--`` + the name with dashes.
FLAGS = {"input_shapes": "--input-shape", "layers": "--layer", "out": "-o", "inputs_file": "--inputs"}


def flag_words(name: str, value=None, python: str | None = None) -> str:
    """How the CLI words an option named in a library message (``errors.option``):
    ``--input-shape``, ``--device cpu``, ``--in-place``."""
    flag = FLAGS.get(name, "--" + name.replace("_", "-"))
    return flag if value is None or value is True else f"{flag} {value}"


def _input_shapes(ctx, param, value):
    from onnx_dynedit.errors import InputError, render
    from onnx_dynedit.shapes import parse_input_shapes

    try:
        return parse_input_shapes(value) or None
    except InputError as exc:
        raise click.BadParameter(render(exc.raw_message, flag_words), ctx=ctx, param=param) from None


def input_shape_option(help_text: str):
    """``--input-shape NAME:D1,D2,...`` (repeatable) parsed into {name: dims}."""
    return click.option("--input-shape", "input_shapes", multiple=True, callback=_input_shapes,
                        metavar="NAME:D1,D2,...", help=help_text)


INPUT_SHAPE_OPTION = input_shape_option(
    "Size of a model input for generated inputs (repeat per input), e.g. input:1,3,224,224; "
    "default: the graph's own dims, a symbolic batch dim is 2.")


class LibraryDefault(click.Option):
    """An option whose help shows the library's default (``{default}`` in the help),
    read only when the help is shown: ``default_of()`` may import torch."""

    def __init__(self, *args, default_of, **kwargs):
        super().__init__(*args, **kwargs)
        self.default_of = default_of

    def get_help_record(self, ctx):
        template = self.help
        default = self.default_of()
        if isinstance(default, tuple) and all(isinstance(v, float) for v in default):
            default = ",".join(f"{v:g}" for v in default)
        try:
            self.help = template.format(default=default)
            return super().get_help_record(ctx)
        finally:
            self.help = template


def config_option(*decls, field: str, default_of=None, **kwargs):
    """An option of ``RectifyConfig``: None when not given (the library default applies);
    its help reads the default from the config (or from ``default_of()``, for a default
    the library picks per run)."""

    def from_config():
        from onnx_dynedit.rectify import RectifyConfig

        return getattr(RectifyConfig(), field)

    return click.option(*decls, cls=LibraryDefault, default=None, default_of=default_of or from_config, **kwargs)


def signature_default(function, name: str):
    """A function that returns the default of ``function``'s parameter ``name``."""
    import inspect

    return lambda: inspect.signature(function).parameters[name].default


# Option types that refuse values the library cannot use (one-line usage error, exit 2).
SEED = click.IntRange(0, 2 ** 32 - 1)


class Int64(click.ParamType):
    """A 64-bit signed integer (checked, but the range is not printed in --help)."""

    name = "integer"

    def convert(self, value, param, ctx):
        try:
            number = int(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not an integer", param, ctx)
        if not -(2 ** 63) <= number <= 2 ** 63 - 1:
            self.fail(f"{value} does not fit in int64", param, ctx)
        return number


INT64 = Int64()


class Numbers(click.ParamType):
    """Comma-separated numbers, e.g. 1,1.5,0.75 -> (1.0, 1.5, 0.75); their range is the
    library's to check (options.py)."""

    name = "numbers"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            return tuple(float(v) for v in str(value).split(","))
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of numbers, e.g. 1,1.5", param, ctx)


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


def run_options(*, threads: bool = True):
    """Options every command shares: ``--quiet`` (no progress on stderr) and, for the
    commands that compute, ``--threads N``. The command runs with progress on when
    stderr is a terminal (or DYNEDIT_PROGRESS=1) unless --quiet is given here or on the
    group (``dynedit --quiet CMD``); the wrapped function never sees these options."""

    def decorate(f):
        @functools.wraps(f)
        def wrapper(*args, quiet: bool = False, threads: int | None = None, **kwargs):
            ctx = click.get_current_context(silent=True)
            group_quiet = bool(ctx and ctx.find_root().obj and ctx.find_root().obj.get("quiet"))
            _threads.configure(threads)
            memory.return_freed_memory()
            with progress.enabled(progress.wanted() and not (quiet or group_quiet)):
                return f(*args, **kwargs)

        wrapper = click.option("-q", "--quiet", is_flag=True,
                               help="No progress on stderr (shown by default when stderr is a terminal).")(wrapper)
        if threads:
            wrapper = click.option(
                "--threads", type=click.IntRange(min=1), default=None, metavar="N",
                help=f"CPU threads for torch and ONNX Runtime (default: OMP_NUM_THREADS if set, else all cores: "
                     f"{_threads.all_cores()} here).",
            )(wrapper)
        return wrapper

    return decorate
