"""Entry point of the `dynedit` command.

Each command lives in its own module under cli/ and only parses options, calls one
library function, renders the result and picks the exit code. Commands are imported
lazily so that `dynedit verify` works without torch installed.

Error contract: a ``DynEditError`` is printed as one line ``dynedit: error: ...`` on
stderr and exits with its ``exit_code`` (2 unusable input, 1 failed check); with
``--debug`` the traceback is shown too. Usage errors (unknown option, missing file
argument) are one line too, exit 2. Any other exception is a bug and keeps its
traceback (exit 1 from Python itself would be ambiguous, so we use 3 for bugs).
Python warnings are silenced unless -v or --debug is given.
"""

from __future__ import annotations

import importlib
import logging
import sys
import traceback
import warnings

import click

from onnx_dynedit.errors import DynEditError

# Exit code of an internal error (a bug): distinct from 1 (a failed check) and 2 (bad input).
BUG_EXIT_CODE = 3

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
    args = list(argv) if argv is not None else sys.argv[1:]
    debug = "--debug" in args[: args.index("--")] if "--" in args else "--debug" in args
    with warnings.catch_warnings():
        if not debug and not _verbose(args):
            # numpy / torch / onnx warnings are noise for a CLI user: our own messages
            # say what went wrong; -v or --debug shows them.
            warnings.simplefilter("ignore")
        try:
            cli.main(args=args, prog_name="dynedit", standalone_mode=False)
        except DynEditError as err:
            if debug:
                traceback.print_exc()
            click.echo(f"dynedit: error: {err.one_line()}", err=True)
            sys.exit(err.exit_code)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            click.echo("dynedit: aborted", err=True)
            sys.exit(130)
        except KeyboardInterrupt:
            click.echo("dynedit: interrupted", err=True)
            sys.exit(130)
        except click.UsageError as exc:  # bad usage: unusable input, one line
            if debug:
                traceback.print_exc()
            cmd = exc.ctx.command_path if exc.ctx is not None else "dynedit"
            message = " ".join(exc.format_message().split())
            click.echo(f"dynedit: error: {message} (see '{cmd} --help')", err=True)
            sys.exit(2)
        except click.ClickException as exc:
            if debug:
                traceback.print_exc()
            click.echo(f"dynedit: error: {' '.join(exc.format_message().split())}", err=True)
            sys.exit(2)
        except Exception:  # noqa: BLE001 - a bug: keep the whole traceback, distinct exit code
            traceback.print_exc()
            click.echo("dynedit: internal error (a bug in onnx-dynedit; the traceback above says where) - "
                       "please report it", err=True)
            sys.exit(BUG_EXIT_CODE)
    return 0


def _verbose(args) -> bool:
    return any(a in ("-v", "--verbose") or (a.startswith("-v") and set(a[1:]) == {"v"}) for a in args)


if __name__ == "__main__":
    main()
