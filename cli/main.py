"""Entry point of the `dynedit` command.

Each command lives in its own module under cli/ and only parses options, calls one
library function, renders the result and picks the exit code. Commands are imported
lazily so that `dynedit verify` works without torch installed.

Error contract: a ``DynEditError`` is printed as one line ``dynedit: error: ...`` on
stderr and exits with its ``exit_code`` (2 unusable input, 1 failed check); with
``--debug`` the traceback is shown too. Any other exception is a bug and keeps its
traceback (exit 1 from Python itself would be ambiguous, so we use 3 for bugs).
"""

from __future__ import annotations

import importlib
import logging
import sys

import click

from onnx_dynedit.errors import DynEditError

# command name -> "module:function"
_COMMANDS = {
    "inspect": "cli.inspect_cmd:inspect",
    "diff": "cli.diff_cmd:diff",
    "locate": "cli.locate_cmd:locate",
    "edit": "cli.edit_cmd:edit",
    "revert": "cli.revert_cmd:revert",
    "verify": "cli.verify_cmd:verify",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(_COMMANDS)

    def get_command(self, ctx, name):
        target = _COMMANDS.get(name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:  # e.g. torch missing for `edit`
            if exc.name and exc.name.split(".")[0] in {"torch", "onnx2torch", "torchvision"}:
                raise click.ClickException(
                    f"'{name}' needs {exc.name} (pip install torch torchvision onnx2torch); "
                    "`dynedit verify` and `dynedit diff` work without it"
                ) from None
            raise
        return getattr(module, attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks for user errors too.")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.version_option(package_name="onnx-dynedit")
@click.pass_context
def cli(ctx, debug, verbose):
    """Repair a shipped ONNX classifier with attribution-guided rank-one edits."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def main(argv=None) -> int:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, prog_name="dynedit", standalone_mode=False)
    except DynEditError as err:
        if debug:
            import traceback

            traceback.print_exc()
        click.echo(f"dynedit: error: {err.one_line()}", err=True)
        sys.exit(err.exit_code)
    except click.exceptions.Abort:
        click.echo("dynedit: aborted", err=True)
        sys.exit(130)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:  # bad usage: unusable input
        exc.show()
        sys.exit(2)
    return 0


if __name__ == "__main__":
    main()
