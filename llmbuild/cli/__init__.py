"""`llmbuild` command line: parses, calls library functions, prints. Errors are one line.

One module per command (or command group); this one holds the root group and `main`, the console
entry point (pyproject's [project.scripts] names `llmbuild.cli:main`; `python -m llmbuild.cli` runs it too).
"""

from __future__ import annotations

import sys
import traceback
from dataclasses import dataclass

import click

import llmbuild
from llmbuild.cli.bench import bench_group
from llmbuild.cli.compile import compile_command
from llmbuild.cli.inspect import inspect_command
from llmbuild.cli.keygen import keygen_command
from llmbuild.cli.pack import pack_command, unpack_command
from llmbuild.cli.plan import plan_command
from llmbuild.cli.run import run_command
from llmbuild.cli.serve import serve_command
from llmbuild.cli.verify import verify_command
from llmbuild.errors import LLMBuildError


@dataclass
class RootOptions:
    """What the root group's options tell `main`, which reads it after the command returned or failed."""

    debug: bool = False


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.version_option(llmbuild.__version__, prog_name="llmbuild")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Ahead-of-time build system for LLM inference: recipe in, engine out, engine served.

    \b
    Exit codes: 0 done; 1 failed (build, checkpoint, engine or internal error);
    2 usage (bad arguments, recipe or --set override: fix the command or recipe);
    3 quality gate failed (the quantized engine misses the recipe's quality section);
    130 interrupted.
    """
    ctx.ensure_object(RootOptions).debug = debug


for _command in (
    plan_command,
    compile_command,
    inspect_command,
    verify_command,
    pack_command,
    unpack_command,
    keygen_command,
    run_command,
    bench_group,
    serve_command,
):
    cli.add_command(_command)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one-line errors, exit codes 1 (error) / 2 (usage) / 3 (quality gate) / 130
    (interrupted); an LLMBuildError's own exit_code says which."""
    args = list(sys.argv[1:] if argv is None else argv)
    options = RootOptions()
    try:
        cli.main(args=args, prog_name="llmbuild", standalone_mode=False, obj=options)
    except click.UsageError as exc:
        hint = f" (see llmbuild {exc.ctx.command_path.split(' ', 1)[-1]} --help)" if exc.ctx else ""
        click.echo(f"error: {exc.format_message()}{hint}", err=True)
        sys.exit(2)
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except (click.Abort, KeyboardInterrupt):
        click.echo("error: interrupted", err=True)
        sys.exit(130)
    except LLMBuildError as exc:
        if options.debug:
            traceback.print_exc()
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except Exception as exc:  # noqa: BLE001 - the last line of defence: no tracebacks without --debug
        if options.debug:
            traceback.print_exc()
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        click.echo(
            f"error: internal error: {type(exc).__name__}: {detail} (rerun with --debug for the traceback)",
            err=True,
        )
        sys.exit(1)
