"""Entry point: ``cove <resource> <verb>``. Exit codes: 0 ok, 1 error, 2 usage,
3 timeout, 4 not found, 5 conflict, 6 not in v1."""

from __future__ import annotations

import sys
from typing import Any

import click
import typer
from rich.markup import escape

from cove import errors
from cove.cli import commands, output, shell, up
from cove.cli import console as console_cmd


def build() -> typer.Typer:
    app = typer.Typer(
        name="cove",
        help="cove: deploy OCI images as isolated instances, expose them through L4 endpoints.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    up.register(app)
    commands.register(app)
    shell.register(app)
    console_cmd.register(app)
    return app


def _print_error(exc: errors.CoveError) -> None:
    # details quote user input and regexes ("[a-z]..."): escape them, or rich eats them as markup
    output.err.print(f"[bold red]error[/bold red]: {escape(exc.detail)}", markup=True)
    if exc.hint:
        output.err.print(f"[bold]hint[/bold]: {escape(exc.hint)}", markup=True)
    instead = exc.extra.get("instead") if isinstance(exc.extra, dict) else None
    if instead and instead != exc.hint:
        output.err.print(f"[bold]instead[/bold]: {escape(str(instead))}", markup=True)


def run(argv: list[str] | None = None, app: typer.Typer | None = None) -> int:
    """Run one command line (``argv`` without the program name) and return its exit code.
    Errors are printed here, never raised: ``main`` exits with the code, ``cove shell``
    prints the prompt again."""
    app = app or build()
    try:
        rv = app(args=argv, standalone_mode=False)
        # outside standalone mode an Exit (Ctrl-C becomes Exit(130)) is returned, not raised
        if isinstance(rv, int) and not isinstance(rv, bool):
            return rv
    except errors.CoveError as exc:
        _print_error(exc)
        if exc.code == "usage":
            return errors.EXIT_USAGE
        return exc.exit_code
    except (click.exceptions.Abort, typer.Abort):
        output.err.print("aborted")
        return errors.EXIT_ERROR
    except (click.exceptions.Exit, typer.Exit) as exc:
        return int(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        return errors.EXIT_USAGE if isinstance(exc, click.UsageError) else errors.EXIT_ERROR
    except typer.TyperException as exc:
        # typer >= 0.2x parses with its own copy of click: its usage errors (unknown flag,
        # missing argument, bad choice) are not click's classes; exit_code 2 marks usage
        show = getattr(exc, "show", None)
        if callable(show):
            show()
        else:
            output.err.print(f"error: {exc.format_message()}", markup=False)
        code = getattr(exc, "exit_code", errors.EXIT_ERROR)
        return errors.EXIT_USAGE if code == errors.EXIT_USAGE else errors.EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    return 0


def main(argv: list[str] | None = None) -> int:
    code = run(argv)
    if code != 0:
        sys.exit(code)
    return 0


def _unused(*_: Any) -> None:
    pass


if __name__ == "__main__":
    main()
