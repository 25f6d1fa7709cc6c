#!/usr/bin/env python3
"""API latency of a real ``cove server`` process: p50/p99 per operation, per backend.

For each backend (SQLite, the default; PostgreSQL on a throwaway server from
``scripts/pg.sh``) this starts ``cove server`` as a subprocess, signs up, fills one project
with apps through the API (several concurrent clients) up to each bulk level (1,000 then
10,000 by default) and, at each level, times with ONE sequential keep-alive client:

- GET  /healthz             the floor: HTTP only, no auth, no database     (every level)
- POST /v1/projects         create project, the light create               (first level)
- POST /v1/apps             create app: the app, its 3 environments,        (first level)
                            4 events and an operation, in one transaction
- GET  /v1/apps/{id}        describe app                                    (first level)
- GET  /v1/apps?org=..&project=..&limit=1000
                            list apps; beyond 1,000 apps the first page     (every level)

(--every-level times the creates and describe at every level too.)

Beside each figure stands "the direct path": the same operation done in this process on
``cove.store.Store`` against the same database (no HTTP, no auth, no JSON), so the table
shows what the API adds on top of the store. It is a benchmark: it prints figures and the
targets, and exits 0 whether or not the targets are met (non-zero only if it cannot run).

    .venv/bin/python bench/api_latency.py [--samples 300] [--bulk 1000,10000]
                                          [--backends sqlite,postgres] [--every-level]

Progress goes to stderr; the tables and a final ``RESULT {json}`` line go to stdout.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

from _common import note, stop_on_signals
from cove.api import service
from cove.api.auth import Principal
from cove.model.kinds import get_kind
from cove.store import Store
from cove.store import schema as t
from cove.store.db import Scope

ROOT = Path(__file__).resolve().parent.parent
PG_SH = ROOT / "scripts" / "pg.sh"
LIST_LIMIT = 1000  # the API's maximum page size

# Targets. The issue: mutating calls p99 < 50 ms, a list of 1,000 p99 < 200 ms.
# Kubernetes (SIG Scalability, API call latency SLO): p99 <= 1 s for single-object calls.
TARGET_MUTATING_MS = 50.0
TARGET_LIST_MS = 200.0
K8S_SINGLE_OBJECT_MS = 1000.0


class BenchError(Exception):
    """The benchmark cannot go on (server did not start, a call failed...)."""


# ----------------------------------------------------------------------------- statistics


def percentile(sorted_ms: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not sorted_ms:
        return float("nan")
    k = (len(sorted_ms) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(sorted_ms) - 1)
    return sorted_ms[lo] + (sorted_ms[hi] - sorted_ms[lo]) * (k - lo)


@dataclass(frozen=True)
class Stat:
    n: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    # CPU time the cove server process used during the series, per call (controllers
    # included; PostgreSQL's own processes not). None for the direct path.
    server_cpu_ms: float | None = None

    @classmethod
    def of(cls, samples_ns: list[int], server_cpu_s: float | None = None) -> Stat:
        ms = sorted(s / 1e6 for s in samples_ns)
        return cls(
            n=len(ms),
            p50_ms=round(percentile(ms, 0.50), 3),
            p99_ms=round(percentile(ms, 0.99), 3),
            mean_ms=round(sum(ms) / len(ms), 3),
            max_ms=round(ms[-1], 3),
            server_cpu_ms=None if server_cpu_s is None else round(server_cpu_s * 1e3 / len(ms), 2),
        )


@dataclass(frozen=True)
class Row:
    key: str  # machine name, e.g. "list_apps@10000"
    label: str  # what the table shows
    api: Stat
    direct: Stat | None
    target_ms: float | None
    target_text: str

    @property
    def meets(self) -> bool | None:
        return None if self.target_ms is None else self.api.p99_ms < self.target_ms

    def as_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "api": asdict(self.api),
            "direct": None if self.direct is None else asdict(self.direct),
            "target_p99_ms": self.target_ms,
            "target": self.target_text,
            "meets_target": self.meets,
        }


def measure(
    fn: Callable[[], object], n: int, warmup: int, cpu: Callable[[], float] | None = None
) -> Stat:
    """Call *fn* sequentially: *warmup* untimed calls, then *n* timed ones."""
    for _ in range(warmup):
        fn()
    samples: list[int] = []
    gc.collect()
    gc.disable()  # the client's own GC pauses are not the server's latency
    cpu0 = cpu() if cpu else 0.0
    try:
        for _ in range(n):
            t0 = time.perf_counter_ns()
            fn()
            samples.append(time.perf_counter_ns() - t0)
    finally:
        gc.enable()
    return Stat.of(samples, (cpu() - cpu0) if cpu else None)


# ----------------------------------------------------------------------------- processes


def cove_executable() -> str:
    for candidate in (ROOT / ".venv" / "bin" / "cove", Path(sys.executable).parent / "cove"):
        if candidate.exists():
            return str(candidate)
    found = shutil.which("cove")
    if found is None:
        raise BenchError("no `cove` executable (run `make setup`)")
    return found


class Server:
    """A ``cove server`` subprocess with its own COVE_HOME."""

    def __init__(self, home: Path, database_url: str | None) -> None:
        self.home = home
        self.url_file = home / "url"
        self.log_path = home / "server.log"
        env = dict(os.environ, COVE_HOME=str(home))
        env.pop("COVE_DATABASE_URL", None)
        if database_url is not None:
            env["COVE_DATABASE_URL"] = database_url
        cmd = [
            cove_executable(),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--data-dir",
            str(home / "data"),
            "--url-file",
            str(self.url_file),
            "--log-level",
            "warning",
        ]
        with open(self.log_path, "wb") as log:
            # own session: a Ctrl-C reaches only us, and we stop the server in order
            self.proc = subprocess.Popen(
                cmd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.url = ""

    def wait_ready(self, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(
                    f"cove server exited during start-up (code {self.proc.returncode})\n"
                    + self.log_tail()
                )
            if self.url_file.exists():
                url = self.url_file.read_text().strip()
                if url:
                    try:
                        if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                            self.url = url
                            return url
                    except httpx.HTTPError:
                        pass
            time.sleep(0.05)
        raise BenchError(f"cove server did not answer within {timeout:g}s\n" + self.log_tail())

    def cpu_seconds(self) -> float:
        """User + system CPU of the server process (all its threads) so far."""
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan")
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no server log)"
        return "server log (tail):\n" + "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextmanager
def postgres(workdir: Path) -> Iterator[str | None]:
    """A throwaway PostgreSQL (scripts/pg.sh); yields its URL, or None if it won't start."""
    pg_dir = workdir / "pg"
    try:
        try:
            out = subprocess.run(
                [str(PG_SH), "start", str(pg_dir)],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=180,
                start_new_session=True,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            note(f"PostgreSQL could not start ({exc}); continuing with SQLite only")
            yield None
            return
        url = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
        if out.returncode != 0 or not url.startswith("postgresql"):
            tail = "\n".join(out.stderr.strip().splitlines()[-10:])
            note(f"PostgreSQL could not start (pg.sh exit {out.returncode}):\n{tail}")
            note("continuing with SQLite only")
            yield None
            return
        yield url
    finally:
        if pg_dir.exists():
            subprocess.run(
                [str(PG_SH), "stop", str(pg_dir)],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=120,
                start_new_session=True,
                check=False,
            )


# ----------------------------------------------------------------------------- API client


class Client:
    """One keep-alive HTTP connection to the server."""

    def __init__(self, url: str, token: str | None = None) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=url, headers=headers, timeout=120)

    def call(
        self,
        method: str,
        path: str,
        *,
        body: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
        ok: tuple[int, ...] = (200, 201, 202),
    ) -> httpx.Response:
        r = self.http.request(method, path, json=body, params=params)
        if r.status_code not in ok:
            raise BenchError(f"{method} {path} -> {r.status_code}: {r.text[:300]}")
        return r

    def close(self) -> None:
        self.http.close()


# ----------------------------------------------------------------------------- one backend


@dataclass
class Setup:
    url: str
    token: str
    org: str
    org_id: str
    project: str  # the project filled with apps (listed)
    project_id: str
    side: str  # the project timed app creates go to (keeps the listed one at its size)
    side_id: str
    who: Principal


class Bench:
    def __init__(
        self,
        backend: str,
        server: Server,
        setup: Setup,
        store: Store,
        args: argparse.Namespace,
    ) -> None:
        self.backend = backend
        self.server = server
        self.s = setup
        self.store = store
        self.args = args
        self.client = Client(setup.url, setup.token)
        self.names = itertools.count()
        self.rng = random.Random(args.seed)
        self.rows: list[Row] = []
        self.populate_info: list[dict[str, Any]] = []
        self.settles: list[dict[str, Any]] = []
        self.loads: list[float] = []  # 1-min load average when each timed series ended
        self.project_spec = get_kind("project").spec_model().model_dump(mode="json")
        self.app_spec = get_kind("app").spec_model().model_dump(mode="json")

    def name(self, prefix: str) -> str:
        return f"{prefix}-{next(self.names)}"

    # -- population ----------------------------------------------------------------------

    def app_count(self) -> int:
        return self.store.count("app", ancestors={"project": self.s.project_id})

    def populate(self, target: int) -> None:
        have = self.app_count()
        todo = max(0, target - have)
        if todo == 0:
            return
        note(
            f"[{self.backend}] populating project {self.s.project}: {have} -> {target} apps "
            f"through the API ({self.args.workers} concurrent clients)"
        )
        lock = threading.Lock()
        counter = itertools.count(have)
        stop = threading.Event()
        done = 0

        def worker() -> None:
            nonlocal done
            c = Client(self.s.url, self.s.token)
            try:
                while not stop.is_set():
                    with lock:
                        i = next(counter)
                    if i >= target:
                        return
                    body = {"name": f"app-{i:05d}", "org": self.s.org, "project": self.s.project}
                    for attempt in range(5):
                        r = c.call("POST", "/v1/apps", body=body, ok=(202, 409, 429, 503))
                        if r.status_code in (202, 409):  # 409: a retry after a lost answer
                            break
                        time.sleep(0.1 * (attempt + 1))
                    else:
                        raise BenchError(f"POST /v1/apps kept failing: {r.status_code}")
                    with lock:
                        done += 1
            finally:
                c.close()

        t0 = time.monotonic()
        pool = ThreadPoolExecutor(max_workers=self.args.workers)
        try:
            futures = [pool.submit(worker) for _ in range(self.args.workers)]
            last = t0
            while True:
                finished, _ = wait(futures, timeout=1.0, return_when=FIRST_EXCEPTION)
                for f in finished:
                    f.result()  # re-raise a worker's failure
                if len(finished) == len(futures):
                    break
                if time.monotonic() - last >= 10:
                    last = time.monotonic()
                    note(f"[{self.backend}]   {have + done}/{target} apps")
        finally:
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
        elapsed = time.monotonic() - t0
        count = self.app_count()
        if count != target:
            raise BenchError(f"project {self.s.project} holds {count} apps, expected {target}")
        note(f"[{self.backend}]   {todo} apps in {elapsed:.1f}s ({todo / elapsed:.0f} apps/s)")
        self.populate_info.append(
            {
                "to": target,
                "created": todo,
                "seconds": round(elapsed, 2),
                "workers": self.args.workers,
            }
        )

    def pending(self) -> int:
        """Controller work the writes so far still call for: operations not yet settled,
        projects/apps/environments whose status was never reconciled."""
        c = t.resources.c
        state = c.status["state"].as_string()
        observed = c.status["observed_generation"].as_string()
        ops = sa.select(sa.func.count()).where(
            c.kind == "operation",
            sa.or_(state.is_(None), state.not_in(["succeeded", "failed"])),
        )
        res = sa.select(sa.func.count()).where(
            c.kind.in_(["project", "app", "environment"]),
            c.deleting.is_(False),
            observed.is_(None),
        )
        with self.store.read() as conn:
            return int(conn.execute(ops).scalar_one()) + int(conn.execute(res).scalar_one())

    def settle(self, why: str) -> dict[str, Any]:
        """Wait until the controllers have caught up with the writes so far (nothing pending
        and the revision still for a second), at most --settle-timeout seconds."""
        cap = self.args.settle_timeout
        t0 = time.monotonic()
        rev = self.store.head_revision()
        still_since = t0
        pending = self.pending()
        last_note = t0
        while True:
            now = time.monotonic()
            if pending == 0 and now - still_since >= 1.0:
                break
            if now - t0 >= cap:
                break
            if now - last_note >= 30:
                last_note = now
                note(f"[{self.backend}]   waiting for the controllers: {pending:,} items pending")
            time.sleep(0.5)
            now_rev = self.store.head_revision()
            if now_rev != rev:
                rev, still_since = now_rev, time.monotonic()
            pending = self.pending()
        waited = time.monotonic() - t0
        info = {
            "after": why,
            "caught_up": pending == 0,
            "seconds": round(waited, 1),
            "pending": pending,
            "revision": rev,
        }
        if pending == 0:
            note(f"[{self.backend}]   controllers caught up after {waited:.1f}s (revision {rev})")
        else:
            note(
                f"[{self.backend}]   controllers NOT caught up after {waited:.0f}s "
                f"({pending:,} items pending); measuring anyway"
            )
        self.settles.append(info)
        return info

    # -- the measured operations -----------------------------------------------------------

    def add(
        self,
        key: str,
        label: str,
        api: Stat,
        direct: Stat | None,
        target: float | None,
        text: str,
    ) -> None:
        self.rows.append(Row(key, label, api, direct, target, text))
        self.loads.append(round(os.getloadavg()[0], 2))
        extra = (
            ""
            if direct is None
            else f" (direct p50 {direct.p50_ms:.2f} ms, p99 {direct.p99_ms:.2f} ms)"
        )
        note(
            f"[{self.backend}]   {label.strip()}: p50 {api.p50_ms:.1f} ms, "
            f"p99 {api.p99_ms:.1f} ms{extra}"
        )

    def pair(
        self,
        key: str,
        label: str,
        api_fn: Callable[[], object],
        direct_fn: Callable[[], object] | None,
        target: float | None,
        text: str,
        *,
        n: int,
        warmup: int,
        settle: bool = False,
    ) -> None:
        """Time the API series, then the direct-path series of the same operation; with
        *settle*, let the controllers catch up before each (creates leave work behind)."""
        if settle:
            self.settle(f"before {key} (API)")
        api = measure(api_fn, n, warmup, self.server.cpu_seconds)
        direct = None
        if direct_fn is not None:
            if settle:
                self.settle(f"before {key} (direct)")
            direct = measure(direct_fn, n, warmup)
        self.add(key, label, api, direct, target, text)

    def level(self, apps: int, *, all_ops: bool) -> None:
        n, warm = self.args.samples, self.args.warmup
        at = f"[{apps:,} apps]"
        s, c, store = self.s, self.client, self.store
        note(f"[{self.backend}] measuring at {apps:,} apps in project {s.project}")

        # The floor: an HTTP round trip with no auth and no database.
        self.pair(
            f"healthz@{apps}",
            f"GET /healthz (floor) {at}",
            lambda: c.call("GET", "/healthz"),
            None,
            None,
            "-",
            n=self.args.floor_samples,
            warmup=warm,
        )

        if all_ops:

            def api_project() -> None:
                c.call("POST", "/v1/projects", body={"name": self.name("p"), "org": s.org})

            def direct_project() -> None:
                with store.write() as tx:
                    service.create_resource(
                        tx,
                        s.who,
                        "project",
                        self.name("dp"),
                        parent=s.org_id,
                        spec=self.project_spec,
                        labels={},
                    )

            def api_app() -> None:
                body = {"name": self.name("c"), "org": s.org, "project": s.side}
                c.call("POST", "/v1/apps", body=body)

            def direct_app() -> None:
                with store.write() as tx:
                    service.create_resource(
                        tx,
                        s.who,
                        "app",
                        self.name("d"),
                        parent=s.side_id,
                        spec=self.app_spec,
                        labels={},
                    )

            self.pair(
                f"create_project@{apps}",
                f"create project {at}",
                api_project,
                direct_project,
                TARGET_MUTATING_MS,
                "< 50 ms",
                n=n,
                warmup=warm,
                settle=True,
            )
            self.pair(
                f"create_app@{apps}",
                f"create app {at}",
                api_app,
                direct_app,
                TARGET_MUTATING_MS,
                "< 50 ms",
                n=n,
                warmup=warm,
                settle=True,
            )
            self.settle(f"timed creates at {apps}")

            ids, _ = store.list(
                "app", Scope.everything(), ancestors={"project": s.project_id}, limit=apps
            )
            picks = iter([self.rng.choice(ids)["id"] for _ in range(2 * (n + warm))])
            self.pair(
                f"describe_app@{apps}",
                f"describe app {at}",
                lambda: c.call("GET", f"/v1/apps/{next(picks)}"),
                lambda: store.get(next(picks)),
                K8S_SINGLE_OBJECT_MS,
                "< 1 s (k8s SLO)",
                n=n,
                warmup=warm,
            )

        params = {"org": s.org, "project": s.project, "limit": LIST_LIMIT}
        scope = Scope(frozenset({s.org_id}))  # what the API's list uses for this caller
        ancestors = {"org": s.org_id, "project": s.project_id}
        page = c.call("GET", "/v1/apps", params=params).json()
        got = len(page["items"])
        if got != min(apps, LIST_LIMIT) or (apps > LIST_LIMIT) != (page["next"] is not None):
            raise BenchError(f"list returned {got} items (next={page['next']}) at {apps} apps")
        first = " (first page of 1,000)" if apps > LIST_LIMIT else f" ({got:,} items)"
        self.pair(
            f"list_apps@{apps}",
            f"list apps{first} {at}",
            lambda: c.call("GET", "/v1/apps", params=params),
            lambda: store.list("app", scope, ancestors=ancestors, limit=LIST_LIMIT),
            TARGET_LIST_MS,
            "< 200 ms",
            n=self.args.list_samples,
            warmup=min(warm, 3),
        )

    def close(self) -> None:
        self.client.close()


def setup_account(url: str, store: Store, backend: str) -> Setup:
    c = Client(url)
    try:
        org = "bench"
        r = c.call(
            "POST",
            "/v1/auth/signup",
            body={"email": "bench@example.com", "password": "bench-password-1", "org": org},
        ).json()
        token, org_id = r["token"], r["org"]["id"]
        user = r["user"]
    finally:
        c.close()
    c = Client(url, token)
    try:
        ids = {}
        for name in ("apps", "side"):
            rec = c.call("POST", "/v1/projects", body={"name": name, "org": org}).json()
            ids[name] = rec["resource"]["id"]
    finally:
        c.close()
    who = Principal("user", r["token_id"], "session", user_id=user["id"], email=user["email"])
    note(f"[{backend}] signed up {user['email']}, org {org}, projects apps and side")
    return Setup(url, token, org, org_id, "apps", ids["apps"], "side", ids["side"], who)


def run_backend(
    backend: str, database_url: str | None, home: Path, args: argparse.Namespace
) -> dict[str, Any]:
    home.mkdir(parents=True, exist_ok=True)
    db_url = database_url or f"sqlite:///{home / 'data' / 'cove.db'}"
    note(f"[{backend}] starting cove server (COVE_HOME={home})")
    server = Server(home, database_url)
    store: Store | None = None
    bench: Bench | None = None
    t0 = time.monotonic()
    try:
        url = server.wait_ready()
        note(f"[{backend}] cove server at {url}")
        store = Store(db_url)
        bench = Bench(backend, server, setup_account(url, store, backend), store, args)
        for i, level in enumerate(args.bulk):
            bench.populate(level)
            bench.settle(f"filling to {level}")
            bench.level(level, all_ops=i == 0 or args.every_level)
        if server.proc.poll() is not None:
            raise BenchError(f"cove server died (code {server.proc.returncode})")
        return {
            "backend": backend,
            "database": store.dialect,
            "rows": bench.rows,
            "populate": bench.populate_info,
            "settle": bench.settles,
            "seconds": round(time.monotonic() - t0, 1),
            "loadavg": bench.loads,
        }
    except BenchError:
        note(server.log_tail())
        raise
    finally:
        if bench is not None:
            bench.close()
        if store is not None:
            store.close()
        server.stop()


# ----------------------------------------------------------------------------- output


def _ms(value: float | None, width: int, digits: int = 2) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


def print_table(result: dict[str, Any], args: argparse.Namespace) -> None:
    rows: list[Row] = result["rows"]
    head = (
        f"{'operation':<48} {'n':>4} {'p50 ms':>8} {'p99 ms':>8} {'cpu/call':>8}   "
        f"{'direct p50':>10} {'direct p99':>10}   {'target p99':<15} {'meets':<5}"
    )
    print()
    print(
        f"cove API latency — {result['backend']} ({result['database']}): a real `cove server` "
        f"process, one sequential keep-alive client"
    )
    print("=" * len(head))
    print(head)
    print("-" * len(head))
    for r in rows:
        meets = {None: "", True: "yes", False: "NO"}[r.meets]
        d = r.direct
        print(
            f"{r.label:<48} {r.api.n:>4} {r.api.p50_ms:>8.2f} {r.api.p99_ms:>8.2f} "
            f"{_ms(r.api.server_cpu_ms, 8, 1)}   "
            f"{_ms(d.p50_ms if d else None, 10)} {_ms(d.p99_ms if d else None, 10)}   "
            f"{r.target_text:<15} {meets:<5}"
        )
    print("-" * len(head))
    pops = ", ".join(
        f"{p['created']:,} apps in {p['seconds']:.0f}s ({p['created'] / p['seconds']:.0f}/s)"
        for p in result["populate"]
        if p["seconds"] > 0
    )
    print(f"population through the API, {args.workers} concurrent clients: {pops or '-'}")
    waits = "; ".join(
        f"{w['after']}: "
        + (
            f"caught up in {w['seconds']:.0f}s"
            if w["caught_up"]
            else f"NOT caught up after {w['seconds']:.0f}s ({w['pending']:,} items pending)"
        )
        for w in result["settle"]
        if w["after"].startswith("filling")
    )
    print(f"controllers before timing (waited up to {args.settle_timeout:g}s): {waits}")
    print(f"backend run time: {result['seconds']:.0f}s")
    loads = result["loadavg"]
    if loads:
        cpus = os.cpu_count() or 1
        print(
            f"host load average (1 min) after the timed series: {min(loads):.1f} to "
            f"{max(loads):.1f} on {cpus} CPUs"
            + ("; other work was running, the figures are noisier" if max(loads) > cpus else "")
        )
    floors = [r.api.p50_ms for r in rows if r.key.startswith("healthz@")]
    if floors and min(floors) >= 20:
        print(
            f"NOTE: GET /healthz (no auth, no database) already takes {min(floors):.0f} ms at p50 "
            "on a keep-alive connection,\n      so every figure above carries that floor. ~40 ms "
            "is the signature of Nagle + delayed ACK:\n      responses written in two pieces "
            "(head, body) on connections without TCP_NODELAY."
        )


def print_legend() -> None:
    print(
        """
How to read this:
  [N apps]   apps in the listed project when the row was measured. Timed app creates go
             to a second project, so the listed one keeps its size.
  n          timed sequential calls (after untimed warm-up calls), one keep-alive client.
             Timing starts once the controllers have caught up with the filling (see
             "controllers before timing"), and each series of creates starts caught up.
  cpu/call   CPU time of the cove server process (API and controllers together) during
             the series, per call; PostgreSQL's own processes are not counted.
  create app writes the app, its 3 environments, 4 events and an operation in one tx.
  list apps  GET /v1/apps?org=..&project=..&limit=1000; beyond 1,000 apps it is the first
             page of 1,000 (with a next cursor), not the whole project.
  direct     the same operation in-process on cove.store.Store against the same database:
             Store.write() with the tx calls the API makes (service.create_resource),
             Store.get(id), Store.list(same kind/scope/filters, limit=1000). API minus
             direct is roughly what HTTP, auth, scope resolution, validation and JSON add.
  targets    p99: mutating < 50 ms and a list of 1,000 < 200 ms (the issue); Kubernetes'
             published API call latency SLO is p99 <= 1 s for single-object calls.
  A benchmark, not a test: "NO" marks a missed target; the exit status stays 0."""
    )


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--samples", type=int, default=300, help="timed calls per create/describe series"
    )
    p.add_argument(
        "--list-samples", type=int, default=None, help="timed calls per list (default: --samples)"
    )
    p.add_argument(
        "--floor-samples", type=int, default=100, help="timed GET /healthz calls per level"
    )
    p.add_argument(
        "--every-level",
        action="store_true",
        help="time creates and describe at every bulk level (default: the first only; "
        "lists are timed at every level)",
    )
    p.add_argument("--warmup", type=int, default=10, help="untimed calls before each series")
    p.add_argument(
        "--bulk",
        default="1000,10000",
        help="comma-separated app counts of the listed project to measure at",
    )
    p.add_argument("--backends", default="sqlite,postgres", help="sqlite and/or postgres")
    p.add_argument("--workers", type=int, default=16, help="concurrent clients for the population")
    p.add_argument(
        "--settle-timeout",
        type=float,
        default=300.0,
        help="seconds to wait for the controllers to catch up before timing",
    )
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    try:
        args.bulk = sorted({int(x.replace("_", "")) for x in args.bulk.split(",") if x.strip()})
    except ValueError:
        p.error("--bulk takes comma-separated integers, e.g. 1000,10000")
    if not args.bulk or args.bulk[0] < 1:
        p.error("--bulk needs positive app counts")
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    for b in args.backends:
        if b not in ("sqlite", "postgres"):
            p.error(f"unknown backend {b!r} (sqlite, postgres)")
    if args.list_samples is None:
        args.list_samples = args.samples
    if min(args.samples, args.list_samples, args.floor_samples, args.workers) < 1:
        p.error("sample counts and --workers must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop_on_signals()
    t0 = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="cove-bench-"))
    results: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    try:
        for backend in args.backends:
            if backend == "sqlite":
                results.append(run_backend("sqlite", None, work / "sqlite", args))
                continue
            note("[postgres] starting a throwaway PostgreSQL (scripts/pg.sh)")
            with postgres(work) as pg_url:
                if pg_url is None:
                    skipped["postgres"] = "PostgreSQL could not start"
                    print("PostgreSQL could not start: skipped; SQLite figures only.")
                    continue
                results.append(run_backend("postgres", pg_url, work / "postgres", args))
    except KeyboardInterrupt:
        note("interrupted; cleaning up")
        return 130
    except BenchError as exc:
        note(f"benchmark failed: {exc}")
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    total = time.monotonic() - t0

    for result in results:
        print_table(result, args)
    for backend, why in skipped.items():
        print(f"\n{backend}: skipped ({why})")
    print_legend()
    print(f"\nTotal run time: {total:.0f}s on {os.cpu_count()} CPUs")
    summary = {
        "bench": "api_latency",
        "samples": args.samples,
        "list_samples": args.list_samples,
        "floor_samples": args.floor_samples,
        "every_level": args.every_level,
        "bulk": args.bulk,
        "workers": args.workers,
        "targets_p99_ms": {
            "mutating": TARGET_MUTATING_MS,
            "list_1000": TARGET_LIST_MS,
            "k8s_single_object": K8S_SINGLE_OBJECT_MS,
        },
        "host": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "backends": {
            r["backend"]: {
                "database": r["database"],
                "seconds": r["seconds"],
                "populate": r["populate"],
                "settle": r["settle"],
                "loadavg_after_series": r["loadavg"],
                "ops": {row.key: row.as_json() for row in r["rows"]},
            }
            for r in results
        },
        "skipped": skipped,
        "total_seconds": round(total, 1),
    }
    print("RESULT " + json.dumps(summary, separators=(",", ":")), flush=True)
    return 0


if __name__ == "__main__":
    with suppress(BrokenPipeError):
        sys.exit(main())
