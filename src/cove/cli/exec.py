"""``cove exec``: run a command in a running instance, through the API (WebSocket).

With ``-t`` it gets a PTY (the local terminal goes raw: Ctrl-C, full-screen programs and
resizes pass through); ``-i`` forwards stdin. The remote exit code is the CLI's exit code.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import sys
import threading
from typing import Annotated, Any
from urllib.parse import urlencode

import typer

from cove import errors
from cove.cli.common import ApiUrlOpt, AppOpt, EnvOpt, OrgOpt, ProjectOpt, session


def register(app: typer.Typer) -> None:
    @app.command(
        "exec",
        help="Run a command in an instance: cove exec [-it] [--instance I | --workload W] -- CMD",
        context_settings={"allow_interspersed_args": False},
    )
    def exec_cmd(
        command: Annotated[list[str], typer.Argument(help="the command and its arguments")],
        instance: Annotated[
            str | None, typer.Option("--instance", help="instance name or ID")
        ] = None,
        workload: Annotated[
            str | None, typer.Option("--workload", help="any Ready instance of it")
        ] = None,
        interactive: Annotated[
            bool, typer.Option("--interactive", "-i", help="send stdin")
        ] = False,
        tty: Annotated[bool, typer.Option("--tty", "-t", help="allocate a terminal")] = False,
        org: OrgOpt = None,
        project: ProjectOpt = None,
        app_: AppOpt = None,
        env: EnvOpt = None,
        api_url: ApiUrlOpt = None,
    ) -> None:
        client, ctx = session(api_url=api_url)
        scope = {
            "org": org or ctx.org,
            "project": project or ctx.project,
            "app": app_ or ctx.app,
            "env": env or ctx.env or "prod",
        }
        target = instance
        if target is None:
            items = client.list_all("/v1/instances", **scope)
            ready = [
                i
                for i in items
                if (workload is None or (i.get("parent") or {}).get("name") == workload)
                and i["status"].get("state") == "running"
                and any(
                    c["type"] == "Ready" and c["status"] == "true"
                    for c in i["status"].get("conditions", [])
                )
            ]
            if not ready:
                raise errors.NotFound(
                    "no running instance to exec into"
                    + (f" for workload {workload}" if workload else ""),
                    hint="`cove instances list` shows them; pass --instance NAME",
                )
            target = sorted(ready, key=lambda i: i["name"])[0]["name"]
        if tty and not sys.stdin.isatty():
            raise errors.UserError("-t needs a terminal on stdin", hint="drop -t", code="usage")
        rows, cols = _size()
        query = [("cmd", c) for c in command] + [
            ("tty", "1" if tty else "0"),
            ("rows", str(rows)),
            ("cols", str(cols)),
        ]
        query += [(k, v) for k, v in scope.items() if v]
        base = ctx.api_url.rstrip("/")
        ws_base = "wss://" + base[8:] if base.startswith("https://") else "ws://" + base[7:]
        url = f"{ws_base}/v1/instances/{target}/exec?{urlencode(query)}"
        code = _run(url, ctx.token or "", tty=tty, interactive=interactive or tty)
        raise typer.Exit(code)


def _size() -> tuple[int, int]:
    try:
        s = os.get_terminal_size(sys.stdout.fileno())
        return s.lines, s.columns
    except OSError:
        return 24, 80


def _run(url: str, token: str, *, tty: bool, interactive: bool) -> int:
    from websockets.exceptions import ConnectionClosed, InvalidStatus
    from websockets.sync.client import connect

    try:
        ws = connect(url, additional_headers={"Authorization": f"Bearer {token}"}, max_size=None)
    except (OSError, InvalidStatus) as exc:
        raise errors.Transient(f"can't open the exec session: {exc}") from exc
    old_attrs = None
    old_winch: Any = None
    stop = threading.Event()
    pump: threading.Thread | None = None
    try:
        if tty:
            import termios
            import tty as ttymod

            old_attrs = termios.tcgetattr(sys.stdin.fileno())
            ttymod.setraw(sys.stdin.fileno())

            def on_winch(_s: int, _f: Any) -> None:
                r, c = _size()
                with contextlib.suppress(Exception):
                    ws.send(json.dumps({"type": "resize", "rows": r, "cols": c}))

            old_winch = signal.signal(signal.SIGWINCH, on_winch)

        def pump_stdin() -> None:
            fd = sys.stdin.fileno()
            while not stop.is_set():
                try:
                    # wait with a timeout: once the session ends this thread must not take
                    # the next keystroke (in `cove shell` the prompt reads it)
                    readable, _, _ = select.select([fd], [], [], 0.1)
                    if not readable:
                        continue
                    data = os.read(fd, 65536)
                except (OSError, ValueError):
                    break
                if not data:
                    break
                try:
                    ws.send(data)
                except ConnectionClosed:
                    return
            with contextlib.suppress(Exception):
                ws.send(json.dumps({"type": "eof"}))

        if interactive:
            pump = threading.Thread(target=pump_stdin, daemon=True)
            pump.start()
        else:
            with contextlib.suppress(ConnectionClosed):
                ws.send(json.dumps({"type": "eof"}))
        out = sys.stdout.buffer
        err = sys.stderr.buffer
        while True:
            try:
                frame = ws.recv()
            except ConnectionClosed:
                raise errors.Transient("the exec session ended without an exit code") from None
            if isinstance(frame, bytes):
                (err if frame[:1] == b"\x02" else out).write(frame[1:])
                (err if frame[:1] == b"\x02" else out).flush()
                continue
            msg = json.loads(frame)
            if msg.get("type") == "exit":
                return int(msg.get("code", 1))
            if msg.get("type") == "error":
                raise errors.from_problem(msg, int(msg.get("status") or 409))
    finally:
        stop.set()
        if pump is not None:
            pump.join(timeout=1)
        if old_winch is not None:
            signal.signal(signal.SIGWINCH, old_winch)
        if old_attrs is not None:
            import termios

            termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, old_attrs)
        with contextlib.suppress(Exception):
            ws.close()
