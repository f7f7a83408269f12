import sys

import click

from cli.common import echo_json, run_options, table
from onnx_dynedit.diff import diff_models
from onnx_dynedit.io import load_model


@click.command()
@click.argument("a", type=click.Path(dir_okay=False))
@click.argument("b", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON only.")
@run_options(threads=False)
def diff(a, b, as_json):
    """Show which weights differ between A and B (relative change, rank) and any other difference.

    Exit 0 either way; 2 for unusable input.
    """
    result = diff_models(load_model(a), load_model(b))
    if as_json:
        echo_json(result.to_dict())
        sys.exit(0)
    if result.identical:
        click.echo("identical (weights and graph; dynedit.* metadata ignored)")
        sys.exit(0)
    if result.changed:
        rows = [[c.initializer, "x".join(map(str, c.shape)), f"{c.rel_change:.3e}", c.rank, f"{c.max_abs_change:.3g}"]
                for c in result.changed]
        header = ["weight", "shape", "rel change", "rank", "max abs change"]
        if any(c.dequantised or c.float_delta_rank is not None for c in result.changed):
            header.append("note")
            for row, c in zip(rows, result.changed):
                note = f"{c.dtype} dequantised, rank at its quantisation step" if c.dequantised else ""
                if c.float_delta_rank is not None:
                    note += ("; " if note else "") + (f"float edit rank {c.float_delta_rank}, "
                                                       f"rounding residual {c.rounding_residual:.3g}")
                row.append(note)
        click.echo(table(rows, header))
    for d in result.other_differences:
        click.echo(f"other: {d}")
    sys.exit(0)
