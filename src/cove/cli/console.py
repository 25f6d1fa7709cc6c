"""``cove console``: where the web console is (``<API URL>/console``), opened in a browser
when this machine has a desktop one."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from cove import errors
from cove.cli import config, output
from cove.cli.common import ApiUrlOpt
from cove.cli.output import Format, OutputOpt


def console_url(api_url: str) -> str:
    if api_url.startswith("unix:"):
        raise errors.UserError(
            f"the web console needs the server on TCP; this API URL is a unix socket ({api_url})",
            hint="pass the server's HTTP URL: --api-url http://HOST:PORT (or COVE_API_URL)",
        )
    return api_url.rstrip("/") + "/console"


def has_desktop_browser() -> bool:
    """A browser can open here: a desktop session (X11 or Wayland), and not CI."""
    if os.environ.get("CI"):
        return False
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def register(app: typer.Typer) -> None:
    @app.command(
        "console",
        help="The web console (a terminal in the browser): print its URL and open it when "
        "there is a desktop browser.",
    )
    def console_cmd(
        open_: Annotated[
            bool, typer.Option("--open/--no-open", help="open it in a browser if there is one")
        ] = True,
        fmt: OutputOpt = Format.table,
        api_url: ApiUrlOpt = None,
    ) -> None:
        url = console_url(config.resolve(api_url=api_url).api_url)
        opened = False
        if open_ and has_desktop_browser():
            import webbrowser

            opened = webbrowser.open(url)
        if fmt is not Format.table:
            output.document({"url": url, "opened": opened}, fmt)
            return
        output.out.print(url, markup=False, highlight=False)
        if opened:
            output.notice("opened in your browser; sign in there with your email and password")
        else:
            output.notice("open it in a browser and sign in with your email and password")
