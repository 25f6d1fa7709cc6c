"""Endpoints end to end: a server, an agent (in a network namespace the test made) with its
edge, real sandboxes, and clients connecting from inside that namespace.

Connections reach the app over IPv6 and over the IPv4 add-on; a PROXY v2 header reaches the
app with the client's exact address; UDP round trips; a failing instance leaves rotation
within its check interval; a rolling deploy under continuous load loses no connection;
destroy frees the addresses.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from decimal import Decimal
from typing import Any

import pytest
from proxyprotocol.v2 import ProxyProtocolV2

from tests.fixtures.images import BuiltImage, ImageBuilder

from .deploy_support import builder, cove_toml, toml_value
from .edge_support import (
    CHECKS,
    EdgeCluster,
    agent_log,
    body,
    build_edge_image,
    edge_cluster,
    http_get,
    in_netns,
    tcp_request,
    wait_until,
)

__all__ = ["builder", "edge_cluster"]

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def images(builder: ImageBuilder, edge_cluster: EdgeCluster) -> dict[str, BuiltImage]:
    return {v: build_edge_image(builder, v, edge_cluster.scratch) for v in ("a", "b")}


def endpoint_toml(name: str, ports: list[str], **opts: Any) -> str:
    lines = [f"\n[endpoints.{name}]", f"ports = {toml_value(ports)}"]
    lines += [f"{k} = {toml_value(v)}" for k, v in opts.items()]
    return "\n".join(lines) + "\n"


def app_toml(image: str, count: int = 2, **endpoints: str) -> str:
    text = cove_toml(image, {"web": {"count": count, "checks": CHECKS}})
    return text + "".join(endpoints.values())


def serving(ep: dict[str, Any], n: int | None = None) -> bool:
    ready = next((c for c in ep["status"].get("conditions", []) if c["type"] == "Ready"), {})
    if ready.get("status") != "true":
        return False
    # the edge has applied the rotation the store has (and not only listens)
    wanted = {b["instance"] for b in ep["status"]["backends"]}
    if set(ep["status"]["edge"].get("backends") or []) != wanted:
        return False
    return n is None or len(wanted) == n


@pytest.mark.both_drivers
def test_ipv6_and_the_ipv4_add_on_reach_every_instance(
    edge_cluster: EdgeCluster, images: dict[str, BuiltImage]
) -> None:
    c = edge_cluster
    d = c.deployment()
    d.write_toml_text(
        app_toml(images["a"].ref, web=endpoint_toml("web", ["80:web:8080"], ipv4=True))
    )
    r = d.deploy()
    assert r.code == 0, (
        f"{r}\n{[(e['spec']['reason'], e['spec']['message']) for e in d.api_events()]}"
    )
    ep = c.wait_endpoint(d, "web", lambda e: serving(e, 2), "endpoint web serving 2 instances")
    v6, v4 = ep["status"]["addresses"]["ipv6"], ep["status"]["addresses"]["ipv4"]
    assert v6.startswith("2001:db8:"), ep["status"]
    assert v4.startswith("192.0.2."), ep["status"]
    assert ep["status"]["billable"], "the IPv4 add-on is shown as billable"

    # describe says it in words too
    r = d.cove("endpoints", "describe", "web")
    assert r.code == 0 and v6 in r.out and v4 in r.out and "paid add-on" in r.out, r.out

    names = {i["name"] for i in d.api_instances()}
    seen6 = {body(in_netns(c.netns, lambda: http_get(v6, 80))).split()[-1] for _ in range(6)}
    seen4 = {body(in_netns(c.netns, lambda: http_get(v4, 80))).split()[-1] for _ in range(6)}
    assert seen6 == names, (seen6, names)
    assert seen4 == names, (seen4, names)

    # counters reach the endpoint's status (the edge reports every few seconds)
    ep = c.wait_endpoint(
        d,
        "web",
        lambda e: (e["status"].get("traffic") or {}).get("connections_total", 0) >= 12,
        "traffic counters on the endpoint",
        timeout=30,
    )
    assert ep["status"]["traffic"]["bytes_out"] > 0
    # ... and are metered as egress of this endpoint, billed with its dedicated IPv4
    usage = d.json("usage", "--project", c.project, "--app", d.app, "--by", "resource")
    [egress] = [i for i in usage["items"] if i["item"] == "egress"]
    assert egress["resource"] == ep["id"], usage
    metered = Decimal(egress["quantity"]) * 1_000_000_000
    assert metered >= ep["status"]["traffic"]["bytes_out"], (usage, ep["status"]["traffic"])
    assert [i for i in usage["items"] if i["item"] == "dedicated IPv4"], usage
    cost = d.json("endpoints", "describe", "web")["status"]["cost"]
    assert cost["per_month"] == "2.000000" and "egress" in cost["basis"], cost


def test_proxy_protocol_v2_carries_the_exact_client_address(
    edge_cluster: EdgeCluster, images: dict[str, BuiltImage]
) -> None:
    c = edge_cluster
    d = c.deployment()
    d.write_toml_text(
        app_toml(
            images["a"].ref,
            count=1,
            echo=endpoint_toml("echo", ["7000:web:8081"], ipv4=False, proxy_protocol="v2"),
        )
    )
    assert d.deploy().code == 0
    ep = c.wait_endpoint(d, "echo", lambda e: serving(e, 1), "endpoint echo serving")
    v6 = ep["status"]["addresses"]["ipv6"]
    client_addr = v6.rsplit(":", 1)[0] + ":beef"  # another address of the pool, as the source
    subprocess.run(
        ["ip", "-n", c.netns, "addr", "add", f"{client_addr}/128", "dev", "lo"], check=True
    )

    def exchange() -> tuple[bytes, tuple[str, int]]:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind((client_addr, 0))
            s.settimeout(5)
            s.connect((v6, 7000))
            src = s.getsockname()[:2]
            s.sendall(b"hello through the edge\n")
            s.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        return data, (src[0], src[1])

    echoed, src = in_netns(c.netns, exchange)
    header_len = 16 + int.from_bytes(echoed[14:16], "big")
    # the header exactly as the app received it, read by an independent implementation
    result = ProxyProtocolV2().unpack(echoed[:header_len])
    assert str(result.source[0]) == src[0] and result.source[1] == src[1], result
    assert str(result.dest[0]) == v6 and result.dest[1] == 7000, result
    assert echoed[header_len:] == b"hello through the edge\n"


def test_udp_round_trip(edge_cluster: EdgeCluster, images: dict[str, BuiltImage]) -> None:
    c = edge_cluster
    d = c.deployment()
    d.write_toml_text(
        app_toml(
            images["a"].ref,
            count=1,
            dns=endpoint_toml("dns", ["53:web:5353"], protocol="udp", ipv4=True),
        )
    )
    assert d.deploy().code == 0
    ep = c.wait_endpoint(d, "dns", lambda e: serving(e, 1), "udp endpoint serving")
    (ins,) = d.api_instances()

    def ask(addr: str) -> bytes:
        fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
        with socket.socket(fam, socket.SOCK_DGRAM) as s:
            s.settimeout(5)
            s.connect((addr, 53))
            s.send(b"question")
            reply = s.recv(65536)
            assert s.getpeername()[0] == addr  # connected: only the endpoint could answer
            return reply

    for addr in (ep["status"]["addresses"]["ipv6"], ep["status"]["addresses"]["ipv4"]):
        assert in_netns(c.netns, lambda a=addr: ask(a)) == f"{ins['name']} question".encode()


@pytest.mark.both_drivers
def test_a_failing_instance_leaves_rotation_within_its_check_interval(
    edge_cluster: EdgeCluster, images: dict[str, BuiltImage]
) -> None:
    c = edge_cluster
    d = c.deployment()
    d.write_toml_text(app_toml(images["a"].ref, web=endpoint_toml("web", ["80:web:8080"])))
    assert d.deploy().code == 0
    ep = c.wait_endpoint(d, "web", lambda e: serving(e, 2), "endpoint serving 2")
    v6 = ep["status"]["addresses"]["ipv6"]
    sick, well = sorted(d.api_instances(), key=lambda i: i["name"])
    r = d.cove("exec", "--instance", sick["name"], "--", "touch", "/tmp/sick")
    assert r.code == 0, str(r)
    t0 = time.monotonic()

    def only_well() -> bool:
        answers = {body(in_netns(c.netns, lambda: http_get(v6, 80))).split()[-1] for _ in range(4)}
        return answers == {well["name"]}

    wait_until(only_well, timeout=10, what="the sick instance out of rotation")
    took = time.monotonic() - t0
    print(f"out of rotation {took:.2f}s after the check began failing (interval 1s)")
    # one interval (1 s) until the check runs, its own timeout (1 s) at worst, then the
    # report's way to the edge
    assert took <= 1.0 + 1.0 + 0.5, f"out of rotation after {took:.2f}s (check interval 1s)"
    # and back once it recovers
    assert d.cove("exec", "--instance", sick["name"], "--", "rm", "/tmp/sick").code == 0
    c.wait_endpoint(d, "web", lambda e: serving(e, 2), "the instance back in rotation")


def test_a_rolling_deploy_under_load_loses_no_connection(
    edge_cluster: EdgeCluster, images: dict[str, BuiltImage]
) -> None:
    c = edge_cluster
    d = c.deployment()
    web = endpoint_toml("web", ["80:web:8080"])
    d.write_toml_text(app_toml(images["a"].ref, web=web))
    assert d.deploy().code == 0
    ep = c.wait_endpoint(d, "web", lambda e: serving(e, 2), "endpoint serving 2")
    v6 = ep["status"]["addresses"]["ipv6"]
    stop = threading.Event()
    results: list[str] = []
    failures: list[str] = []

    def load() -> None:
        while not stop.is_set():
            try:
                results.append(body(http_get(v6, 80)).split()[1])
            except OSError as exc:
                failures.append(f"{time.monotonic():.3f} {exc!r}")

    workers = [
        threading.Thread(target=in_netns, args=(c.netns, load, 300), daemon=True) for _ in range(2)
    ]
    for w in workers:
        w.start()
    try:
        time.sleep(1.0)
        d.write_toml_text(app_toml(images["b"].ref, web=web))
        r = d.deploy("--timeout", "120s")
        assert r.code == 0, f"{r}\n{agent_log(c)}"
        wait_until(lambda: results[-20:] == ["b"] * 20, timeout=20, what="only b answering")
    finally:
        stop.set()
        for w in workers:
            w.join(30)
    print(f"rolling deploy under load: {len(results)} requests, {len(failures)} failed")
    assert not failures, f"{len(failures)} failed of {len(results) + len(failures)}: {failures[:5]}"
    assert "a" in results and "b" in results
    assert len(results) > 50, len(results)


def test_destroy_frees_the_addresses(
    edge_cluster: EdgeCluster, images: dict[str, BuiltImage]
) -> None:
    c = edge_cluster
    d = c.deployment()
    d.write_toml_text(
        app_toml(images["a"].ref, count=1, web=endpoint_toml("web", ["80:web:8080"], ipv4=True))
    )
    assert d.deploy().code == 0
    ep = c.wait_endpoint(d, "web", lambda e: serving(e, 1), "endpoint serving")
    v6, v4 = ep["status"]["addresses"]["ipv6"], ep["status"]["addresses"]["ipv4"]
    assert "ok a" in in_netns(c.netns, lambda: http_get(v4, 80))
    r = d.cove("endpoints", "destroy", "web", "--yes", "--wait")
    assert r.code == 0, str(r)

    def refused(addr: str) -> bool:
        try:
            in_netns(c.netns, lambda: tcp_request(addr, 80, b"x", timeout=2))
        except ConnectionRefusedError:
            return True
        return False

    assert refused(v6) and refused(v4)
    # the IPv4 is back in the pool: the next IPv4 endpoint gets it (lowest free first)
    r = d.cove("endpoints", "create", "again", "--port", "80:web:8080", "--ipv4", "--wait")
    assert r.code == 0, str(r)
    again = d.json("endpoints", "describe", "again")
    assert again["status"]["addresses"]["ipv4"] == v4


def test_bad_endpoint_input_is_refused_and_nothing_is_written(
    edge_cluster: EdgeCluster, images: dict[str, BuiltImage]
) -> None:
    c = edge_cluster
    d = c.deployment()
    d.write_toml_text(app_toml(images["a"].ref, count=1))
    assert d.deploy().code == 0

    def nothing_changed() -> None:  # over the API: the CLI's own listings are tested elsewhere
        assert [r["name"] for r in d._get("/v1/releases")["items"]] == ["v1"]
        assert d._get("/v1/endpoints")["items"] == []

    cases = [
        # cove.toml: (endpoint table, exit code, words in the error)
        (endpoint_toml("e", ["80:wbe:8080"]), 1, "no workload 'wbe'"),
        (endpoint_toml("e", ["80:web"]), 2, "PUBLIC:WORKLOAD:TARGET"),
        (endpoint_toml("e", ["80:web:70000"]), 2, "1-65535"),
        (endpoint_toml("e", ["80:web:8080", "80:web:8081"]), 1, "listed twice"),
        (endpoint_toml("e", ["80:web:8080"], protocol="sctp"), 1, "protocol"),
        (endpoint_toml("e", ["80:web:8080"], hostname="app.example.com"), 6, "not in v1"),
        (endpoint_toml("e", ["80:web:8080"], tls=True), 6, "not in v1"),
        ('\n[endpoints.e]\nports = "80:web:8080"\n', 1, "non-empty list"),
    ]
    for table, code, words in cases:
        d.write_toml_text(app_toml(images["a"].ref, count=1, e=table))
        r = d.deploy()
        assert r.code == code and words in r.err, f"{table}\n{r}"
        nothing_changed()

    # the CLI's own flags
    for args, code, words in [
        (["--port", "80"], 2, "PUBLIC:WORKLOAD:TARGET"),
        (["--port", "0:web:80"], 2, "1-65535"),
        (["--port", "x:web:80"], 2, "numbers"),
        (["--port", "80:web:80", "--proxy-protocol", "v3"], 1, "proxy_protocol"),
        (["--port", "80:web:80", "--hostname", "a.example"], 6, "not in v1"),
        (["--port", "80:web:80", "--http"], 6, "not in v1"),
        (["--port", "80:nope:80"], 1, "no workload 'nope'"),
    ]:
        r = d.cove("endpoints", "create", "e", *args)
        assert r.code == code and words in r.err, f"{args}\n{r}"
        nothing_changed()

    # the IPv4 add-on beyond the project's quota: the whole deploy is refused
    api = c.api()
    try:
        used = len(
            [
                e
                for e in api.call("GET", "/v1/endpoints", org=c.org, project=c.project)["items"]
                if e["spec"]["ipv4"]
            ]
        )
        prj = api.call("GET", f"/v1/projects/{c.project}", org=c.org)
        quotas = prj["spec"]["quotas"]
        api.call(
            "PATCH",
            f"/v1/projects/{prj['id']}",
            {"spec": {"quotas": dict(quotas, dedicated_ipv4=used)}},
        )
        d.write_toml_text(
            app_toml(images["a"].ref, count=1, e=endpoint_toml("e", ["80:web:8080"], ipv4=True))
        )
        r = d.deploy()
        assert r.code == 1 and "quota" in r.err, str(r)
        nothing_changed()
        r = d.cove("endpoints", "create", "e", "--port", "80:web:8080", "--ipv4")
        assert r.code == 1 and "quota" in r.err and "IPv6" in r.err, str(r)
        nothing_changed()
    finally:
        api.call("PATCH", f"/v1/projects/{prj['id']}", {"spec": {"quotas": quotas}})
        api.close()
