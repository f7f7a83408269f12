import click

from cli.common import run_options

from onnx_dynedit.api import revert_model


@click.command()
@click.argument("edited", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False), help="Restored model to write.")
@click.option("--in-place", is_flag=True, help="Allow -o to be EDITED (a .bak copy is kept).")
@run_options(threads=False)
def revert(edited, out, in_place):
    """Undo `dynedit edit`: restore the original weights of EDITED bit for bit."""
    outcome = revert_model(edited, out, in_place=in_place)
    click.echo(f"wrote {outcome.path} (original weights restored: {', '.join(outcome.restored)})")
