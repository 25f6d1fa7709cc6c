"""Entry point: ``cove <resource> <verb>``. Exit codes: 0 ok, 1 error, 2 usage,
3 timeout, 4 not found, 5 conflict, 6 not in v1."""

from __future__ import annotations

import sys
from typing import Any

import click
import typer

from cove import errors
from cove.cli import commands, output, up


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
    return app


def _print_error(exc: errors.CoveError) -> None:
    output.err.print(f"[bold red]error[/bold red]: {exc.detail}", markup=True)
    if exc.hint:
        output.err.print(f"[bold]hint[/bold]: {exc.hint}", markup=True)
    instead = exc.extra.get("instead") if isinstance(exc.extra, dict) else None
    if instead and instead != exc.hint:
        output.err.print(f"[bold]instead[/bold]: {instead}", markup=True)


def main(argv: list[str] | None = None) -> int:
    app = build()
    try:
        app(args=argv, standalone_mode=False)
    except errors.CoveError as exc:
        _print_error(exc)
        code = exc.exit_code
        if exc.code == "usage":
            code = errors.EXIT_USAGE
        sys.exit(code)
    except click.exceptions.Abort:
        output.err.print("aborted")
        sys.exit(errors.EXIT_ERROR)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(errors.EXIT_USAGE if isinstance(exc, click.UsageError) else errors.EXIT_ERROR)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)
    return 0


def _unused(*_: Any) -> None:
    pass


if __name__ == "__main__":
    main()
