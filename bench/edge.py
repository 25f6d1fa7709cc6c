#!/usr/bin/env python3
"""The edge (``python -m cove.net``) beside HAProxy in tcp mode, on this host's loopback.

Two measurements, each path measured in the same run:

1. throughput: iperf3 client -> server direct, -> HAProxy (tcp mode) -> server, and
   -> cove edge -> server; one stream and 4 parallel streams, ``--seconds`` each; Gbit/s;
2. new connections per second: ``ab -n N -c 32`` (HTTP/1.0: one connection per request)
   against a fast backend (a second HAProxy, http mode, ``http-request return status 200``)
   direct, via HAProxy tcp mode and via the edge; ``--rounds`` rounds taken in turn, the
   median is the figure. Beside it: CPU time the proxy process used per connection.

The goal stated by the issue: the edge at or above HAProxy's throughput, and within 20% of
its connection rate (edge/HAProxy >= 0.8). It is a benchmark: it prints figures and the
goal and exits 0 whether or not the goal is met (non-zero only if it cannot run).

    .venv/bin/python bench/edge.py [--seconds 5] [--requests 20000] [--rounds 3]
                                   [--loops uvloop[,asyncio]] [--haproxy-nbthread N]

Progress goes to stderr; the tables and a final ``RESULT {json}`` line go to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import loadavg, note, stop_on_signals

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
GOAL_THROUGHPUT = 1.0  # edge / HAProxy
GOAL_CONN_RATE = 0.8
CONCURRENCY = 32


class BenchError(Exception):
    """The benchmark cannot go on (a tool is missing, a process did not start...)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def listening(port: int) -> bool:
    """Whether something listens on HOST:port (probed by binding, not connecting: a
    connection would count as a test for iperf3)."""
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return True
    return False


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 10) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with status {proc.returncode} before listening")
        if listening(port):
            return
        time.sleep(0.05)
    raise BenchError(f"{what} did not listen on {HOST}:{port} within {timeout:.0f}s")


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------------- processes


@dataclass
class Procs:
    """Every process the bench started, stopped by ``stop`` (also on errors and signals)."""

    tmp: Path
    started: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)

    def start(self, what: str, argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        log = open(self.tmp / f"{what.replace(' ', '_')}.log", "wb")  # noqa: SIM115
        try:
            kw.setdefault("stdout", log)
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stderr=log, start_new_session=True, **kw
            )
        finally:
            log.close()
        self.started.append((what, proc))
        return proc

    def log(self, what: str) -> str:
        path = self.tmp / f"{what.replace(' ', '_')}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        for _, proc in reversed(self.started):
            if proc.poll() is None:
                proc.terminate()
        for what, proc in reversed(self.started):
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                note(f"{what} did not stop on SIGTERM; killing it")
                proc.kill()
                proc.wait()


HAPROXY_GLOBAL = """\
global
    maxconn 2000
    stats socket {sock} mode 600 level user
{nbthread}
defaults
    timeout connect 5s
    timeout client 60s
    timeout server 60s
"""


def haproxy_nbthread(sock: Path) -> int | None:
    """HAProxy's thread count, from its stats socket (``show info``)."""
    for _ in range(50):
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(2)
                s.connect(str(sock))
                s.sendall(b"show info\n")
                out = b""
                while chunk := s.recv(65536):
                    out += chunk
            m = re.search(rb"^Nbthread: (\d+)", out, re.M)
            return int(m.group(1)) if m else None
        except OSError:
            time.sleep(0.1)
    return None


@dataclass
class Setup:
    iperf: int  # iperf3 server
    web: int  # the fast http backend (HAProxy http mode)
    hap_iperf: int  # HAProxy tcp mode -> iperf
    hap_web: int  # HAProxy tcp mode -> web
    hap_proc: subprocess.Popen[bytes] | None = None
    hap_threads: int | None = None
    haproxy_version: str = ""
    edges: dict[str, tuple[int, int, subprocess.Popen[bytes], str]] = field(default_factory=dict)
    # loop -> (iperf port, web port, process, what it said it runs on)


def start_all(args: argparse.Namespace, procs: Procs) -> Setup:
    for tool in ("iperf3", "haproxy", "ab"):
        if not shutil.which(tool):
            raise BenchError(f"{tool} is not installed (bash scripts/setup.sh installs it)")
    st = Setup(iperf=free_port(), web=free_port(), hap_iperf=free_port(), hap_web=free_port())
    version = subprocess.run(["haproxy", "-v"], capture_output=True, text=True, check=False)
    m = re.search(r"version (\S+)", version.stdout)
    st.haproxy_version = m.group(1) if m else "?"

    note(f"iperf3 server on {HOST}:{st.iperf}")
    iperf = procs.start("iperf3 server", ["iperf3", "-s", "-B", HOST, "-p", str(st.iperf)])
    wait_port(st.iperf, iperf, "iperf3 -s")

    # the fast backend: its own HAProxy process, so it does not share the reference's threads
    cfg = procs.tmp / "web.cfg"
    cfg.write_text(
        HAPROXY_GLOBAL.format(sock=procs.tmp / "web.sock", nbthread="")
        + f"frontend web\n    mode http\n    bind {HOST}:{st.web}\n"
        "    http-request return status 200 content-type text/plain string ok\n"
    )
    note(f"backend: HAProxy http mode on {HOST}:{st.web}")
    web = procs.start("haproxy web", ["haproxy", "-db", "-f", str(cfg)])
    try:
        wait_port(st.web, web, "haproxy (web backend)")
    except BenchError as exc:
        raise BenchError(f"{exc}: {procs.log('haproxy web')[-1000:]}") from None

    nbthread = f"    nbthread {args.haproxy_nbthread}" if args.haproxy_nbthread else ""
    cfg = procs.tmp / "proxy.cfg"
    cfg.write_text(
        HAPROXY_GLOBAL.format(sock=procs.tmp / "proxy.sock", nbthread=nbthread)
        + f"listen iperf\n    mode tcp\n    bind {HOST}:{st.hap_iperf}\n"
        f"    server s {HOST}:{st.iperf}\n"
        f"listen web\n    mode tcp\n    bind {HOST}:{st.hap_web}\n"
        f"    server s {HOST}:{st.web}\n"
    )
    note(f"reference: HAProxy tcp mode on {HOST}:{st.hap_iperf} and {HOST}:{st.hap_web}")
    st.hap_proc = procs.start("haproxy proxy", ["haproxy", "-db", "-f", str(cfg)])
    try:
        wait_port(st.hap_web, st.hap_proc, "haproxy (tcp mode)")
    except BenchError as exc:
        raise BenchError(f"{exc}: {procs.log('haproxy proxy')[-1000:]}") from None
    st.hap_threads = haproxy_nbthread(procs.tmp / "proxy.sock")

    for loop in args.loops:
        p_iperf, p_web = free_port(), free_port()
        argv = [
            sys.executable,
            "-m",
            "cove.net",
            "--tcp",
            f"{HOST}:{p_iperf}={HOST}:{st.iperf}",
            "--tcp",
            f"{HOST}:{p_web}={HOST}:{st.web}",
            "--uvloop" if loop == "uvloop" else "--no-uvloop",
        ]
        note(f"cove edge ({loop}): python -m cove.net on {HOST}:{p_iperf} and {HOST}:{p_web}")
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
        proc = procs.start(f"edge {loop}", argv, stdout=subprocess.PIPE, env=env)
        assert proc.stdout is not None
        line = proc.stdout.readline().decode().strip()
        if line != "ready":
            raise BenchError(f"the edge did not start: {procs.log(f'edge {loop}')[-2000:]}")
        said = procs.log(f"edge {loop}")
        m = re.search(r"listener\(s\) on (.+)", said)
        runs_on = m.group(1).strip() if m else loop
        if loop == "uvloop" and not runs_on.startswith("uvloop"):
            raise BenchError(f"asked for uvloop, the edge runs on {runs_on}")
        st.edges[loop] = (p_iperf, p_web, proc, runs_on)
    return st


# ----------------------------------------------------------------------------- measurements


def iperf3(port: int, seconds: int, streams: int) -> float:
    """Gbit/s the iperf3 server received from one run through *port*."""
    cmd = ["iperf3", "-c", HOST, "-p", str(port), "-t", str(seconds), "-J"]
    cmd += ["-P", str(streams)] if streams > 1 else []
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"iperf3 through port {port} did not finish") from exc
    try:
        doc = json.loads(out.stdout)
        return round(doc["end"]["sum_received"]["bits_per_second"] / 1e9, 2)
    except (ValueError, KeyError) as exc:
        raise BenchError(f"iperf3 through port {port} failed: {out.stdout[-500:]}") from exc


@dataclass
class AbRun:
    rate: float  # requests (= connections) per second
    failed: int
    non_2xx: int
    cpu_us_per_conn: float | None  # the proxy process's CPU time per connection


def ab(port: int, requests: int, pid: int | None) -> AbRun:
    cpu0 = proc_cpu_seconds(pid) if pid else 0.0
    cmd = ["ab", "-q", "-r", "-n", str(requests), "-c", str(CONCURRENCY), f"http://{HOST}:{port}/"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300).stdout
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"ab through port {port} did not finish") from exc
    cpu = (proc_cpu_seconds(pid) - cpu0) if pid else None

    def figure(label: str) -> float:
        m = re.search(rf"^{label}:\s+([\d.]+)", out, re.M)
        return float(m.group(1)) if m else 0.0

    rate = figure("Requests per second")
    if not rate:
        raise BenchError(f"ab through port {port} printed no rate: {out[-500:]}")
    return AbRun(
        rate=rate,
        failed=int(figure("Failed requests")),
        non_2xx=int(figure("Non-2xx responses")),
        cpu_us_per_conn=None if cpu is None else round(cpu * 1e6 / requests, 1),
    )


def run(args: argparse.Namespace, procs: Procs) -> dict[str, Any]:
    st = start_all(args, procs)
    assert st.hap_proc is not None
    paths: list[tuple[str, str, int, int, int | None]] = [  # key, label, iperf, web, pid
        ("direct", "direct", st.iperf, st.web, None),
        ("haproxy", "HAProxy tcp mode", st.hap_iperf, st.hap_web, st.hap_proc.pid),
    ]
    for loop, (p_iperf, p_web, proc, _) in st.edges.items():
        paths.append((f"edge_{loop}", f"cove edge ({loop})", p_iperf, p_web, proc.pid))

    throughput: dict[str, dict[str, float]] = {}
    for streams in (1, 4):
        for key, label, p_iperf, _, _ in paths:
            note(f"throughput, {streams} stream(s): {label}")
            gbit = iperf3(p_iperf, args.seconds, streams)
            throughput.setdefault(f"{streams}", {})[key] = gbit

    note(f"connection rate: warm-up, then {args.rounds} round(s) of ab -n {args.requests}")
    for _, _, _, p_web, pid in paths:
        ab(p_web, min(2000, args.requests), pid)
    runs: dict[str, list[AbRun]] = {key: [] for key, *_ in paths}
    for r in range(args.rounds):
        for key, label, _, p_web, pid in paths:
            note(f"connection rate, round {r + 1}: {label}")
            runs[key].append(ab(p_web, args.requests, pid))

    edge_counters = {}
    for loop, (_, _, proc, _) in st.edges.items():
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        m = re.search(r"^(\{\"counters\".*)$", procs.log(f"edge {loop}"), re.M)
        edge_counters[loop] = json.loads(m.group(1))["counters"] if m else None

    conn: dict[str, Any] = {}
    for key, *_ in paths:
        rates = [x.rate for x in runs[key]]
        cpus = [x.cpu_us_per_conn for x in runs[key] if x.cpu_us_per_conn is not None]
        conn[key] = {
            "median": round(statistics.median(rates)),
            "min": round(min(rates)),
            "max": round(max(rates)),
            "rates": [round(x) for x in rates],
            "proxy_cpu_us_per_conn": round(statistics.median(cpus), 1) if cpus else None,
            "failed": sum(x.failed for x in runs[key]),
            "non_2xx": sum(x.non_2xx for x in runs[key]),
        }
    return {
        "labels": {key: label for key, label, *_ in paths},
        "throughput_gbit_s": throughput,
        "conn_per_s": conn,
        "edge_loops": {loop: v[3] for loop, v in st.edges.items()},
        "edge_counters": edge_counters,
        "haproxy": {"version": st.haproxy_version, "nbthread": st.hap_threads},
        "loadavg": loadavg(),
    }


# ----------------------------------------------------------------------------- report


def verdict(ratio: float, goal: float) -> str:
    return "yes" if ratio >= goal else "NO"


def print_report(result: dict[str, Any], args: argparse.Namespace) -> None:
    labels: dict[str, str] = result["labels"]
    hap = result["haproxy"]
    print(
        f"\ncove edge vs HAProxy on {HOST} (loopback), {os.cpu_count()} CPUs; "
        f"HAProxy {hap['version']}, nbthread {hap['nbthread']}; "
        f"edge loop: {', '.join(result['edge_loops'].values())}"
    )
    print(f"\nthroughput: iperf3, {args.seconds} s per run, Gbit/s received by the server")
    head = f"{'path':<26}{'1 stream':>10}{'4 streams':>11}{'edge/HAProxy':>16}{'goal >= 1.0':>13}"
    print(head)
    print("-" * len(head))
    t = result["throughput_gbit_s"]
    for key, label in labels.items():
        one, four = t["1"][key], t["4"][key]
        ratio = goal = ""
        if key.startswith("edge_"):
            r1, r4 = one / t["1"]["haproxy"], four / t["4"]["haproxy"]
            ratio = f"{r1:.2f} / {r4:.2f}"
            goal = verdict(min(r1, r4), GOAL_THROUGHPUT)
        print(f"{label:<26}{one:>10.2f}{four:>11.2f}{ratio:>16}{goal:>13}")

    print(
        f"\nnew connections per second: ab -n {args.requests} -c {CONCURRENCY} (HTTP/1.0), "
        f"median of {args.rounds} round(s) (min-max); proxy CPU = CPU time of the proxy "
        "process per connection"
    )
    head = (
        f"{'path':<26}{'conn/s':>9}{'min-max':>15}{'proxy CPU':>12}"
        f"{'edge/HAProxy':>14}{'goal >= 0.8':>13}"
    )
    print(head)
    print("-" * len(head))
    c = result["conn_per_s"]
    for key, label in labels.items():
        row = c[key]
        cpu = "-" if row["proxy_cpu_us_per_conn"] is None else f"{row['proxy_cpu_us_per_conn']} us"
        ratio = goal = ""
        if key.startswith("edge_"):
            r = row["median"] / c["haproxy"]["median"]
            ratio, goal = f"{r:.2f}", verdict(r, GOAL_CONN_RATE)
        span = f"{row['min']}-{row['max']}"
        print(f"{label:<26}{row['median']:>9}{span:>15}{cpu:>12}{ratio:>14}{goal:>13}")
        if row["failed"] or row["non_2xx"]:
            print(f"  WARNING: {label}: {row['failed']} failed, {row['non_2xx']} non-2xx")
    for loop, counters in result["edge_counters"].items():
        if counters:
            total = sum(ep["connections_total"] for ep in counters.values())
            fails = sum(ep["connect_failures"] for ep in counters.values())
            print(f"edge ({loop}) counted {total} connections, {fails} connect failures")
    print(
        "\nGoal (the issue): edge throughput >= HAProxy's, connection rate >= 0.8 x HAProxy's."
        " NO marks a miss; the run still exits 0.\nThe figures come from one run on one"
        " machine; the processes share its CPUs (and any other load: see the load average)."
    )


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=int, default=5, help="iperf3 run length (default 5)")
    p.add_argument("--requests", type=int, default=20000, help="ab -n per round (20000)")
    p.add_argument("--rounds", type=int, default=3, help="ab rounds, paths in turn (3)")
    p.add_argument(
        "--loops",
        default="uvloop",
        help="event loops to run the edge on, comma-separated: uvloop, asyncio (uvloop)",
    )
    p.add_argument(
        "--haproxy-nbthread", type=int, default=0, help="force HAProxy's nbthread (its default)"
    )
    args = p.parse_args(argv)
    args.loops = [x.strip() for x in args.loops.split(",") if x.strip()]
    if not args.loops or set(args.loops) - {"uvloop", "asyncio"}:
        p.error("--loops takes uvloop and/or asyncio")
    if args.seconds < 1 or args.requests < 100 or args.rounds < 1:
        p.error("--seconds >= 1, --requests >= 100, --rounds >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop_on_signals()
    t0 = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="cove-bench-edge-"))
    procs = Procs(tmp)
    try:
        result = run(args, procs)
    except KeyboardInterrupt:
        note("interrupted; cleaning up")
        return 130
    except BenchError as exc:
        note(f"benchmark failed: {exc}")
        return 1
    finally:
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            procs.stop()
            shutil.rmtree(tmp, ignore_errors=True)
        finally:
            signal.signal(signal.SIGINT, old)
    total = time.monotonic() - t0
    print_report(result, args)
    print(f"\nTotal run time: {total:.0f}s on {os.cpu_count()} CPUs (load average {loadavg()})")
    t, c = result["throughput_gbit_s"], result["conn_per_s"]
    summary = {
        "bench": "edge",
        "params": {
            "seconds": args.seconds,
            "requests": args.requests,
            "rounds": args.rounds,
            "concurrency": CONCURRENCY,
            "loops": args.loops,
        },
        "goals": {"throughput_ratio": GOAL_THROUGHPUT, "conn_rate_ratio": GOAL_CONN_RATE},
        "meets_goals": {
            loop: {
                "throughput": min(t[s][f"edge_{loop}"] / t[s]["haproxy"] for s in ("1", "4"))
                >= GOAL_THROUGHPUT,
                "conn_rate": c[f"edge_{loop}"]["median"] / c["haproxy"]["median"] >= GOAL_CONN_RATE,
            }
            for loop in args.loops
        },
        "host": {"cpus": os.cpu_count(), "python": platform.python_version()},
        **result,
        "total_seconds": round(total, 1),
    }
    print("RESULT " + json.dumps(summary, separators=(",", ":")), flush=True)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
