import sys

import click

from cli.common import (DEVICE_OPTION, ENGINE_OPTION, INPUT_SHAPE_OPTION, RAY_ADDRESS_OPTION, config_option, echo_json,
                        run_options, table)
from onnx_dynedit.api import locate_model
from onnx_dynedit.options import CHOICES


@click.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--pairs", required=True, type=click.Path(dir_okay=False),
              help="npz with arrays 'corrupt' and 'clean' [N, ...], row i of clean = cleansed twin of row i.")
@click.option("--stats", type=click.Path(), default=None, metavar="S.npz|DIR|GLOB",
              help="npz with array 'x': unlabeled clean inputs for the keys' second moments (or a folder / glob "
                   "of .npz shards, streamed).")
@config_option("--steps", field="ig_steps", type=click.IntRange(1, 4096),
               help="Integrated-gradients steps (default {default}).")
@config_option("--target", field="ig_target", type=click.Choice(CHOICES["target"]),
               help="Scalar attributed: corrupt_logit (the logit of the class predicted on the corrupted input) or "
                    "gap (minus the clean twin's class logit) (default {default}).")
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="Write a PNG bar chart of every layer's score in graph order (chosen layer in red, "
                   "refused layers named).")
@DEVICE_OPTION
@INPUT_SHAPE_OPTION
@ENGINE_OPTION
@RAY_ADDRESS_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print JSON only.")
@run_options()
def locate(model, pairs, stats, steps, target, plot, device, input_shapes, engine, ray_address, as_json):
    """Rank MODEL's editable layers by attribution-guided editability for the PAIRS."""
    outcome = locate_model(model, pairs, stats=stats, device=device, steps=steps, target=target, plot=plot,
                           engine=engine, ray_address=ray_address, input_shapes=input_shapes)
    loc = outcome.localisation
    if as_json:
        echo_json(outcome.to_dict())
        sys.exit(0)
    click.echo(f"{outcome.model}: {len(loc.ranked)} layers scored (IG {loc.steps} steps on {loc.target}; "
               f"key statistics from {outcome.stats_source})")
    rows = [[i + 1, a.layer.node, a.layer.op, a.layer.initializer, f"{a.score:.4g}", f"{a.norm:.4g}",
             f"{a.specificity:.4g}", f"{a.attribution:.4g}", f"{a.mass:.4g}"] for i, a in enumerate(loc.ranked)]
    click.echo(table(rows, ["rank", "node", "op", "weight", "score", "|M|", "specificity", "sum M", "sum |M|"]))
    click.echo(f"F(clean) - F(corrupt) = {loc.f_gap:.4g} (IG completeness: each layer's sum M should be close)")
    for node, reason in loc.skipped:
        click.echo(f"skipped {node}: {reason}")
    if plot:
        click.echo(f"plot written to {plot}")
    click.echo(f"chosen: {loc.chosen.layer.node if loc.chosen else 'none'}")
