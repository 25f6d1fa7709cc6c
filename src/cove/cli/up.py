"""``cove up`` / ``cove down`` / ``cove server`` / ``cove agent``: running cove itself."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import httpx
import typer

from cove import errors
from cove.cli import config, output

DEFAULT_PORT = 8470


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _read_pid() -> int | None:
    try:
        pid = int((config.run_dir() / "up.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _pid_alive(pid) else None


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _cove_cmd() -> list[str]:
    return [sys.executable, "-m", "cove.cli"]


def register(app: typer.Typer) -> None:
    @app.command(
        "up",
        help="Start cove on this machine: API, controllers and one agent (SQLite under COVE_HOME).",
    )
    def up(
        detach: Annotated[
            bool, typer.Option("--detach", "-d", help="run in the background")
        ] = False,
        host: Annotated[
            str, typer.Option("--host", help="address the API listens on")
        ] = "127.0.0.1",
        port: Annotated[
            int, typer.Option("--port", help="API port (0: any free one)")
        ] = DEFAULT_PORT,
        timeout: Annotated[
            float, typer.Option("--timeout", help="seconds to wait for the API")
        ] = 60.0,
        driver: Annotated[
            str,
            typer.Option(
                "--driver",
                help="the agent's runtime: microvm, sandbox, auto (microvm when KVM works, "
                "else sandbox), none, or sim (simulated instances, nothing runs)",
            ),
        ] = "auto",
    ) -> None:
        run = config.run_dir()
        run.mkdir(parents=True, exist_ok=True)
        config.log_dir().mkdir(parents=True, exist_ok=True)
        pid = _read_pid()
        url = config.running_url()
        if pid is not None and url and _healthy(url):
            output.notice(f"cove is already running (pid {pid})")
            print(url)
            return
        if detach:
            log = config.log_dir() / "cove.log"
            with open(log, "ab") as lf:
                proc = subprocess.Popen(
                    [*_cove_cmd(), "up", "--host", host, "--port", str(port), "--driver", driver],
                    stdin=subprocess.DEVNULL,
                    stdout=lf,
                    stderr=lf,
                    start_new_session=True,
                    env=dict(os.environ, COVE_HOME=str(config.home())),
                )
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                url = config.running_url()
                if url and _healthy(url):
                    config.update(api_url=url)
                    output.notice(
                        f"cove is up (pid {proc.pid}); logs: {log}; stop it with `cove down`"
                    )
                    print(url)
                    return
                if proc.poll() is not None:
                    raise errors.Permanent(
                        f"cove exited during start-up (code {proc.returncode})",
                        hint=f"see {log}",
                    )
                time.sleep(0.1)
            proc.terminate()
            raise errors.WaitTimeout(f"cove did not answer within {timeout:g}s", hint=f"see {log}")
        _foreground(host, port, timeout, driver)

    @app.command("down", help="Stop the cove started by `cove up`.")
    def down(
        timeout: Annotated[
            float, typer.Option("--timeout", help="seconds to wait before killing it")
        ] = 20.0,
    ) -> None:
        pid = _read_pid()
        if pid is None:
            output.notice("cove is not running")
            return
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _pid_alive(pid):
            time.sleep(0.1)
        if _pid_alive(pid):
            try:  # a detached `cove up` leads its own process group: take its children too
                if os.getpgid(pid) == pid:
                    os.killpg(pid, signal.SIGKILL)
                else:
                    os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            output.notice(f"cove (pid {pid}) did not stop in {timeout:g}s; killed")
        for f in ("up.pid", "api.url"):
            (config.run_dir() / f).unlink(missing_ok=True)
        output.notice("cove stopped")

    @app.command(
        "server", help="Run the control plane (API + controllers). `cove up` runs one for you."
    )
    def server(
        host: Annotated[
            str, typer.Option("--host", help="address the API listens on")
        ] = "127.0.0.1",
        port: Annotated[
            int, typer.Option("--port", help="API port (0: any free one)")
        ] = DEFAULT_PORT,
        data_dir: Annotated[
            Path | None, typer.Option("--data-dir", help="default: COVE_HOME/data")
        ] = None,
        url_file: Annotated[
            Path | None, typer.Option("--url-file", help="write the API URL here once listening")
        ] = None,
        log_level: Annotated[
            str, typer.Option("--log-level", help="debug, info, warning or error")
        ] = "info",
        access_log: Annotated[
            bool, typer.Option("--access-log/--no-access-log", help="log every HTTP request")
        ] = False,
        public_ipv6: Annotated[
            str | None,
            typer.Option(
                "--public-ipv6",
                help="prefix endpoint IPv6 addresses come from (or COVE_PUBLIC_IPV6; "
                "default: a unique-local /64 for this machine)",
            ),
        ] = None,
        public_ipv4: Annotated[
            str | None,
            typer.Option(
                "--public-ipv4",
                help="pool for the dedicated IPv4 add-on (or COVE_PUBLIC_IPV4; "
                "default: a /24 in 127.0.0.0/8 for this machine)",
            ),
        ] = None,
        unix_socket: Annotated[
            Path | None,
            typer.Option("--unix-socket", help="also serve the API on this unix socket"),
        ] = None,
        price_list: Annotated[
            Path | None,
            typer.Option(
                "--price-list",
                help="the price list, TOML (or COVE_PRICE_LIST; default: DATA/prices.toml "
                "if it exists, else the documented defaults: docs/billing.md)",
            ),
        ] = None,
        node_grace: Annotated[
            str,
            typer.Option(
                "--node-grace",
                help="a node without a heartbeat this long is NotReady (at least 10s: "
                "agents beat every 5s)",
            ),
        ] = "15s",
        evict_after: Annotated[
            str,
            typer.Option(
                "--evict-after",
                help="then this long before its movable instances are replaced elsewhere",
            ),
        ] = "30s",
    ) -> None:
        from cove.cli.common import parse_duration
        from cove.model import pricing
        from cove.net.pools import configured
        from cove.server import serve, setup_logging

        grace, evict = parse_duration(node_grace), parse_duration(evict_after)
        if grace < 10:
            raise errors.UserError(
                f"--node-grace {node_grace} is too short",
                hint="agents send a heartbeat every 5s: give at least 10s",
                code="usage",
            )
        setup_logging(log_level)
        ddir = data_dir or config.data_dir()
        pools = configured(ddir, public_ipv6, public_ipv4)
        prices = pricing.configured(ddir, price_list)  # a wrong file stops here, said clearly
        try:
            serve(
                ddir,
                host,
                port,
                url_file=url_file,
                access_log=access_log,
                pools=pools,
                unix_socket=unix_socket,
                prices=prices,
                node_timing=(grace, evict),
            )
        except OSError as exc:
            if exc.errno == 98:
                raise errors.UserError(
                    f"port {port} on {host} is already in use",
                    hint="pick another with --port (0 picks any free port), or stop what uses it",
                ) from exc
            raise

    @app.command("agent", help="Run a node agent that joins a cove server.")
    def agent(
        server_url: Annotated[
            str | None,
            typer.Option(
                "--server",
                help="API URL (default: the local cove up); several replicas' URLs "
                "comma-separated: the agent moves to the next when one is unreachable",
            ),
        ] = None,
        join_token: Annotated[
            str | None,
            typer.Option("--join-token", help="the cluster's join token (or COVE_JOIN_TOKEN)"),
        ] = None,
        join_token_file: Annotated[
            Path | None,
            typer.Option(
                "--join-token-file", help="file holding it (default: COVE_HOME/data/join-token)"
            ),
        ] = None,
        name: Annotated[
            str | None, typer.Option("--name", help="node name (default: host name)")
        ] = None,
        region: Annotated[str, typer.Option("--region", help="region this node is in")] = "local",
        driver: Annotated[
            str,
            typer.Option(
                "--driver",
                help="microvm (KVM, or TCG emulation when KVM can't run a guest), sandbox, "
                "auto (microvm when KVM works, else sandbox), none, or sim (simulated "
                "instances: nothing runs, for control-plane scale tests; needs no root)",
            ),
        ] = "auto",
        state_dir: Annotated[
            Path | None,
            typer.Option(
                "--state-dir", help="runtime state and image cache (default: COVE_HOME/agent)"
            ),
        ] = None,
        bridge: Annotated[
            str | None, typer.Option("--bridge", help="instances' bridge (default: per state dir)")
        ] = None,
        pool4: Annotated[
            str | None, typer.Option("--pool4", help="instances' IPv4 pool, e.g. 10.213.5.0/24")
        ] = None,
        pool6: Annotated[
            str | None, typer.Option("--pool6", help="instances' IPv6 pool, a /64")
        ] = None,
        address: Annotated[
            str | None,
            typer.Option(
                "--address",
                help="this node's address for the other nodes, which route its instances' "
                "subnet via it (default: the address this host reaches the server from; none "
                "over loopback or a unix socket)",
            ),
        ] = None,
        log_level: Annotated[
            str, typer.Option("--log-level", help="debug, info, warning or error")
        ] = "info",
    ) -> None:
        from cove.agent.main import default_network, default_state_dir, run_agent
        from cove.server import setup_logging

        setup_logging(log_level)
        url = server_url or os.environ.get("COVE_API_URL") or config.running_url()
        if not url:
            raise errors.UserError("which server?", hint="pass --server URL", code="usage")
        token = join_token or os.environ.get("COVE_JOIN_TOKEN")
        if not token:
            f = join_token_file or (config.data_dir() / "join-token")
            try:
                token = f.read_text().strip()
            except OSError as exc:
                raise errors.UserError(
                    f"no join token ({f} unreadable)", hint="pass --join-token or --join-token-file"
                ) from exc
        sdir = state_dir or default_state_dir(config.home(), driver)
        dbridge, dpool4, dpool6 = default_network(sdir, driver)
        run_agent(
            url,
            token,
            name=name,
            region=region,
            driver=driver,
            state_dir=sdir,
            network=(bridge or dbridge, pool4 or dpool4, pool6 or dpool6),
            fixed_network=pool4 is not None or pool6 is not None,
            address=address,
        )


def _foreground(host: str, port: int, timeout: float, driver: str) -> None:
    """Supervise a server and an agent until SIGINT/SIGTERM, then stop both."""
    run = config.run_dir()
    url_file = run / "api.url"
    url_file.unlink(missing_ok=True)
    (run / "up.pid").write_text(f"{os.getpid()}\n")
    env = dict(os.environ, COVE_HOME=str(config.home()))
    # one machine, one operator: deploys may name local image paths (oci:DIR, archives)
    env.setdefault("COVE_LOCAL_IMAGES", "1")
    server = subprocess.Popen(
        [*_cove_cmd(), "server", "--host", host, "--port", str(port), "--url-file", str(url_file)],
        env=env,
        stdin=subprocess.DEVNULL,
    )
    procs = [server]
    stopping = False

    def stop(_sig: int, _frm: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        deadline = time.monotonic() + timeout
        url = None
        while not stopping and time.monotonic() < deadline:
            url = config.running_url()
            if url and _healthy(url):
                break
            if server.poll() is not None:
                raise errors.Permanent(
                    f"the server exited during start-up (code {server.returncode})",
                    hint="its log is above",
                )
            time.sleep(0.1)
        else:
            if not stopping:
                raise errors.WaitTimeout(f"the server did not answer within {timeout:g}s")
        if url and not stopping:
            config.update(api_url=url)
            output.notice(f"cove API: {url}   data: {config.data_dir()}")
            agent = subprocess.Popen(
                [*_cove_cmd(), "agent", "--server", url, "--driver", driver],
                env=env,
                stdin=subprocess.DEVNULL,
            )
            procs.append(agent)
            output.notice("cove is up; Ctrl-C stops it")
        while not stopping:
            for p in procs:
                if p.poll() is not None and not stopping:
                    if p is server:
                        raise errors.Permanent(f"the server exited (code {p.returncode})")
                    output.notice(f"the agent exited (code {p.returncode}); restarting it")
                    time.sleep(1)
                    procs[procs.index(p)] = subprocess.Popen(
                        p.args, env=env, stdin=subprocess.DEVNULL
                    )
            time.sleep(0.2)
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
        for p in reversed(procs):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for f in ("up.pid", "api.url"):
            (run / f).unlink(missing_ok=True)
        output.notice("cove stopped")
