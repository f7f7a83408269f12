import sys

import click

from cli.common import (DEVICE_OPTION, INPUT_SHAPE_OPTION, INT64, SEED, LibraryDefault, echo_json, run_options,
                        signature_default, table)
from onnx_dynedit.inspect import inspect_model


@click.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--inputs", "inputs_file", type=click.Path(dir_okay=False), default=None,
              help="Parity inputs (.npz, one array per model input, keyed by input name).")
@click.option("--seed", type=SEED, cls=LibraryDefault, default=None, default_of=signature_default(inspect_model, "seed"),
              help="Seed of the random parity inputs [default: {default}].")
@click.option("--int-range", nargs=2, type=INT64, cls=LibraryDefault, default=None, metavar="LOW HIGH",
              default_of=lambda: " ".join(map(str, signature_default(inspect_model, "int_range")())),
              help="Range [low, high) of random values for integer inputs [default: {default}].")
@DEVICE_OPTION
@INPUT_SHAPE_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print JSON only.")
@run_options()
def inspect(model, inputs_file, seed, int_range, device, input_shapes, as_json):
    """Show opset, inputs, outputs, editable layers and twin parity of MODEL.

    Exit 0 when the torch twin matches ONNX Runtime, 1 when it does not, 2 for unusable input.
    """
    if int_range is not None and int_range[0] >= int_range[1]:
        raise click.BadParameter(f"low {int_range[0]} must be below high {int_range[1]}", param_hint="--int-range")
    given = {k: v for k, v in (("seed", seed), ("int_range", int_range and tuple(int_range))) if v is not None}
    report = inspect_model(model, inputs_file=inputs_file, device=device, input_shapes=input_shapes, **given)
    d = report.to_dict()
    if as_json:
        echo_json(d)
    else:
        click.echo(f"{report.path}: opset {report.opset}, IR {report.ir_version}")
        for kind, specs in (("input", d["inputs"]), ("output", d["outputs"])):
            for s in specs:
                click.echo(f"  {kind:6} {s['name']}  {s['dtype']}{s['shape']}")
        rows = [[l["node"], l["op"], l["initializer"] + _quant_note(l), "x".join(map(str, l["shape"])) or "scalar",
                 "yes" if l["shared"] else "", "yes" if l["editable"] else f"no: {l['reason']}"]
                for l in d["layers"]]
        click.echo(table(rows, ["node", "op", "weight", "shape", "shared", "editable"]))
        click.echo(f"attributed output: {report.attributed_output}")
        for note in report.notes:
            click.echo(f"note: {note}")
        click.echo(parity_line(d["parity"]))
        click.echo("PASSED" if report.ok else "FAILED: parity outside tolerance")
    sys.exit(0 if report.ok else 1)


def parity_line(p: dict) -> str:
    """Which figure the tolerance applies to: max rel = max abs / max(1, max |output|)
    must be <= tol, i.e. max abs <= tol x max(1, max |output|)."""
    worst = max(p.get("outputs") or [{}], key=lambda o: o.get("max_rel_diff") or 0.0)
    abs_, rel = worst.get("max_abs_diff") or 0.0, worst.get("max_rel_diff") or 0.0
    scale = abs_ / rel if rel > 0 else None
    allowed = f" = {p['tol'] * scale:.3g}" if scale is not None else ""
    verdict = "within tolerance" if p["ok"] else "OUTSIDE tolerance"
    return (f"parity (ONNX Runtime vs torch twin, {p['n_inputs']} inputs): max abs {p['max_abs_diff']:.3g} "
            f"(tolerance {p['tol']:g} x max(1, max|output|){allowed}), max rel {p['max_rel_diff']:.3g} "
            f"(tolerance {p['tol']:g}): {verdict}")


def _quant_note(layer: dict) -> str:
    """' (int8, qdq per-channel axis 0)' for a weight dequantised from integers; '' else."""
    q = layer.get("quant")
    if not q:
        return " (float16)" if layer.get("dtype") == "float16" else ""
    how = f"per-channel axis {q['axis']}" if q["axis"] is not None else "per-tensor"
    return f" ({q['dtype']}, {q['scheme']} {how})"
