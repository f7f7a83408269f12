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

from cli.common import flag_words
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


# The one-line summaries of `dynedit --help` (click would cut the docstrings' first
# sentences at the terminal width; these are written to fit, and listing them does not
# import every command, torch included).
_SUMMARIES = {
    "diff": "Which weights differ between two models (relative change, rank).",
    "edit": "Repair a model from corrupted inputs and their clean twins.",
    "inspect": "Opset, inputs, outputs, editable layers and twin parity.",
    "locate": "Rank the editable layers for the pairs (integrated gradients).",
    "revert": "Undo `dynedit edit` bit for bit.",
    "verify": "Release gate: compare original and edited (ONNX Runtime only).",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(_COMMANDS)

    def format_commands(self, ctx, formatter):
        rows = []
        for name in self.list_commands(ctx):
            summary = _SUMMARIES.get(name)
            if summary is None:  # a command without a summary here: ask it (imports it)
                cmd = self.get_command(ctx, name)
                summary = cmd.get_short_help_str(limit=200) if cmd is not None else ""
            rows.append((name, summary))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

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
@click.option("-q", "--quiet", is_flag=True, help="No progress on stderr (same as CMD --quiet).")
@click.version_option(package_name="onnx-dynedit")
@click.pass_context
def cli(ctx, debug, verbose, quiet):
    """Repair a shipped ONNX classifier with attribution-guided rank-one edits."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    ctx.obj["quiet"] = quiet
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
            click.echo(f"dynedit: error: {err.one_line(flag_words)}", err=True)
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
