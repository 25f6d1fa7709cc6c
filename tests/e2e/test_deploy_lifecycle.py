"""Deploys that work: from a registry tag to a healthy instance pinned to a digest,
rollback (image and secrets), scale, logs, secrets inside the instance, isolation; and the
bad input a deploy refuses without writing anything. One ``cove up`` for the module."""

from __future__ import annotations

import json
import queue
import secrets
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fixtures.images import BuiltImage, ImageBuilder, RegistryServer, push

from .deploy_support import (  # noqa: F401  (fixtures)
    BOTH_DRIVERS,
    HTTP_CHECK,
    Cluster,
    app_image,
    build_app_image,
    builder,
    cluster,
    condition,
    decode_secrets,
    instance_events,
    is_ready,
    registry,
    ts,
    wait_for,
)
from .helpers import Result, assert_clean_error, run_many

MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json, "
    "application/vnd.docker.distribution.manifest.v2+json"
)


def registry_digest(reg: RegistryServer, repo: str, tag: str) -> str:
    """What the registry itself says the tag points at (Docker-Content-Digest)."""
    req = urllib.request.Request(
        f"http://{reg.address}/v2/{repo}/manifests/{tag}",
        method="HEAD",
        headers={"Accept": MANIFEST_TYPES},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return str(resp.headers["Docker-Content-Digest"])


def serves(ins: dict[str, Any]) -> str:
    """The body the instance serves on its private IPv4 address (from this host)."""
    ip = ins["status"]["addresses"]["ipv4"]
    return httpx.get(f"http://{ip}:8080/", timeout=5).text.strip()


@pytest.fixture(scope="module")
def image_b(builder: ImageBuilder) -> BuiltImage:  # noqa: F811
    return build_app_image(builder, "b")


# ----------------------------------------------------------------------------- 1. digests


@pytest.mark.timeout(90)
def test_deploy_from_a_registry_tag_pins_the_digest(
    cluster: Cluster,  # noqa: F811
    builder: ImageBuilder,  # noqa: F811
    registry: RegistryServer,  # noqa: F811
) -> None:
    first = build_app_image(builder, "pin-1")
    second = build_app_image(builder, "pin-2")
    ref = push(first, registry, "pin", "1")
    d = cluster.deployment()
    d.write_toml(ref, checks=[HTTP_CHECK], deadline="30s")

    started = time.monotonic()
    r = d.deploy()
    wall = time.monotonic() - started
    assert r.code == 0, f"{r}\n--- log ---\n{cluster.log()}"

    [ins] = d.instances()
    assert ins["status"]["state"] == "running", ins["status"]
    assert ins["status"]["health"] == "passing", ins["status"]
    assert is_ready(ins), ins["status"]
    assert serves(ins) == "ok pin-1"

    [v1] = d.releases()
    assert v1["spec"]["image"] == ref, "the release keeps the tag as written"
    assert v1["spec"]["digest"] == registry_digest(registry, "pin", "1") == first.digest
    assert ins["spec"]["release"] == v1["id"]

    evs = instance_events(d.events(), ins["name"])
    reasons = [e["spec"]["reason"] for e in sorted(evs, key=lambda e: e["metadata"]["revision"])]
    assert reasons.index("Started") < reasons.index("Healthy"), reasons
    ready = condition(ins, "Ready")
    assert ready is not None
    latency = ts(ready["last_transition"]) - ts(v1["metadata"]["created_at"])
    print(
        f"\ndeploy-to-healthy: {latency:.2f}s (release written -> instance Ready); "
        f"`cove deploy` wall time {wall:.2f}s"
    )
    assert 0 < latency < 30

    # the tag moves: a new deploy of the same reference resolves it again
    push(second, registry, "pin", "1")
    assert registry_digest(registry, "pin", "1") == second.digest != first.digest
    r = d.deploy()
    assert r.code == 0, str(r)
    v1_again, v2 = d.releases()
    assert v1_again["spec"]["digest"] == first.digest, "an old release never changes"
    assert v2["spec"]["image"] == ref
    assert v2["spec"]["digest"] == second.digest
    [ins2] = d.wait_converged(1, "v2")
    assert ins2["id"] != ins["id"]
    assert serves(ins2) == "ok pin-2"


# ----------------------------------------------------------------------------- 4. rollback


@pytest.mark.timeout(120)
def test_rollback_restores_image_and_secrets(
    cluster: Cluster,  # noqa: F811
    app_image: BuiltImage,  # noqa: F811
    image_b: BuiltImage,
    registry: RegistryServer,  # noqa: F811
) -> None:
    ref_a = push(app_image, registry, "rb", "a")
    ref_b = push(image_b, registry, "rb", "b")
    d = cluster.deployment()
    d.write_toml(ref_a, checks=[HTTP_CHECK], deadline="30s")

    for step in (
        ("deploy", "--timeout", "60s"),  # v1: image A, no secrets
        ("secrets", "set", "X=1"),  # v2: A, secrets version 1
        ("deploy", "--image", ref_b, "--timeout", "60s"),  # v3: B, secrets version 1
        ("secrets", "set", "X=2"),  # v4: B, secrets version 2
    ):
        r = d.cove(*step)
        assert r.code == 0, str(r)
    v1, v2, v3, v4 = d.releases()
    assert v3["spec"]["digest"] == image_b.digest
    assert v2["spec"]["secrets"]["version"] == 1
    assert v4["spec"]["secrets"]["version"] == 2

    r = d.cove("rollback", "v2")
    assert r.code == 0, str(r)
    rels = d.releases()
    assert [x["name"] for x in rels] == ["v1", "v2", "v3", "v4", "v5"], "history stays linear"
    v5 = rels[-1]
    assert v5["spec"]["reason"] == "rollback" and v5["spec"]["rolled_back_to"] == "v2"
    assert v5["spec"]["digest"] == v1["spec"]["digest"] == app_image.digest
    assert v5["spec"]["secrets"] == v2["spec"]["secrets"]

    [ins] = d.wait_converged(1, "v5")
    assert serves(ins) == "ok a", "the rolled-back instance runs image A"

    def printed() -> list[dict[str, Any]] | None:
        docs = decode_secrets(d.api_logs(instance=ins["id"]))
        return docs or None

    [doc] = wait_for(printed, timeout=10, what="the instance to print its secrets")
    assert doc["values"] == {"X": "1"}
    assert doc["version"] == 1
    # and what the CLI shows agrees
    lines = d.logs("--instance", ins["name"])
    assert decode_secrets(lines) == [doc]


# ----------------------------------------------------------------------------- 5. scale


@pytest.mark.timeout(90)
def test_scale_up_and_down(
    cluster: Cluster,  # noqa: F811
    app_image: BuiltImage,  # noqa: F811
    registry: RegistryServer,  # noqa: F811
) -> None:
    d = cluster.deployment()
    d.write_toml(push(app_image, registry, "scale", "1"), checks=[HTTP_CHECK], deadline="30s")
    assert (r := d.deploy()).code == 0, str(r)

    r = d.cove("scale", "web=3", "--wait")
    assert r.code == 0, str(r)
    three = d.wait_converged(3, "v1")
    assert len({i["status"]["addresses"]["ipv4"] for i in three}) == 3
    assert len(d.instances()) == 3
    st = d.status()
    assert st["desired"]["scale"] == {"web": 3}
    assert st["current"]["workloads"]["web"] == {"desired": 3, "running": 3, "ready": 3}, st
    assert [x["name"] for x in d.releases()] == ["v1"], "scaling writes no release"

    r = d.cove("scale", "web=1", "--wait")
    assert r.code == 0, str(r)
    [one] = d.wait_converged(1, "v1")
    assert one["id"] in {i["id"] for i in three}, "scaling down keeps a running instance"
    assert len(d.instances()) == 1

    def settled() -> dict[str, Any] | None:
        st = d.status()
        return st if st["current"]["workloads"]["web"]["running"] == 1 else None

    st = wait_for(settled, timeout=15, what="cove status to show 1 running")
    assert st["desired"]["scale"] == {"web": 1}
    assert st["current"]["workloads"]["web"] == {"desired": 1, "running": 1, "ready": 1}, st


# ----------------------------------------------------------------------------- 6. logs


def _reader(proc: subprocess.Popen[str], out: queue.Queue[str]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        out.put(line)


@pytest.mark.timeout(90)
def test_logs_follow_and_per_instance(
    cluster: Cluster,  # noqa: F811
    app_image: BuiltImage,  # noqa: F811
) -> None:
    d = cluster.deployment()
    d.write_toml(app_image.ref, count=2, env={"TICK": "1"}, checks=[HTTP_CHECK], deadline="30s")
    assert (r := d.deploy()).code == 0, str(r)
    instances = {i["id"]: i for i in d.instances()}
    assert len(instances) == 2

    started = time.time()
    proc = d.popen("logs", "-f", "-o", "json")
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_reader, args=(proc, lines), daemon=True).start()
    got: list[dict[str, Any]] = []
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                raw = lines.get(timeout=0.5)
            except queue.Empty:
                continue
            if not raw.strip():
                continue
            got.append(json.loads(raw))  # one JSON document per line
            fresh = [g for g in got if g["line"].startswith("tick ") and ts(g["ts"]) > started]
            if len(fresh) >= 2:
                break
        else:
            raise AssertionError(f"`cove logs -f` did not stream 2 new lines: {got}")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for g in got:
        assert {"ts", "stream", "instance", "workload", "line"} <= set(g), g
        assert g["instance"] in instances and g["workload"] == "web", g
        assert g["stream"] in ("stdout", "stderr")
    assert any(g["line"].startswith("start instance=") for g in got), "history comes first"

    # one instance only, by name
    name, iid = next((i["name"], i["id"]) for i in instances.values())
    mine = d.logs("--instance", name)
    assert mine and {x["instance"] for x in mine} == {iid}
    assert any(x["line"] == f"start instance={name} release=v1 version=a" for x in mine), mine
    both = d.logs()
    assert {x["instance"] for x in both} == set(instances)
    last = d.logs("--instance", name, "--tail", "1")
    assert len(last) == 1 and last[0]["instance"] == iid, last


# ----------------------------------------------------------------------------- 7. secrets


@BOTH_DRIVERS
@pytest.mark.timeout(90)
def test_secrets_reach_the_instance_only(
    cluster: Cluster,  # noqa: F811
    app_image: BuiltImage,  # noqa: F811
) -> None:
    value = "s3cr3t-" + secrets.token_hex(12)
    d = cluster.deployment()
    d.write_toml(app_image.ref, checks=[HTTP_CHECK], deadline="30s")
    assert (r := d.deploy()).code == 0, str(r)
    r = d.cove("secrets", "set", f"API_KEY={value}", "DB_URL=postgres://u@db/x")
    assert r.code == 0, str(r)
    assert value not in r.out + r.err
    [ins] = d.wait_converged(1, "v2")
    # which runtime runs it, and (microVMs) KVM or TCG, in the status and in describe
    assert ins["status"]["driver"] == cluster.driver, ins["status"]
    if cluster.driver == "microvm":
        accel = ins["status"]["accel"]
        assert accel in ("kvm", "tcg"), ins["status"]
        r = d.cove("instances", "describe", ins["name"])
        assert r.code == 0 and f"accel: {accel}" in r.out, r.out

    def printed() -> list[dict[str, Any]] | None:
        lines = d.api_logs(instance=ins["id"])
        return lines if any(x["line"].startswith("secrets-b64 ") for x in lines) else None

    lines = wait_for(printed, timeout=10, what="the instance to print its secrets")
    assert "secrets-stat 400 root" in [x["line"] for x in lines], lines
    [doc] = decode_secrets(lines)
    assert doc["values"] == {"API_KEY": value, "DB_URL": "postgres://u@db/x"}

    listed = d.cove("secrets", "list", "-o", "json")
    assert listed.code == 0, str(listed)
    assert value not in listed.out
    keys = {k["name"]: k for k in listed.json()[0]["spec"]["keys"]}
    assert set(keys) == {"API_KEY", "DB_URL"} and keys["API_KEY"]["digest"]

    # at rest: never in clear in the database (main file and WAL) nor the server's log
    data = cluster.home / "data"
    files = sorted(data.glob("cove.db*"))
    assert {p.name for p in files} >= {"cove.db", "cove.db-wal"}, files
    for path in [*files, cluster.home / "logs" / "cove.log"]:
        blob = path.read_bytes()
        assert value.encode() not in blob, f"the secret is in clear in {path}"
        assert b"postgres://u@db/x" not in blob, f"the secret is in clear in {path}"


# ----------------------------------------------------------------------------- 10. isolation


@pytest.mark.timeout(90)
def test_instances_see_neither_the_host_nor_each_other(
    cluster: Cluster,  # noqa: F811
    app_image: BuiltImage,  # noqa: F811
) -> None:
    marker = Path("/root") / f"cove-e2e-marker-{secrets.token_hex(6)}"
    marker.write_text("host only\n")
    try:
        d = cluster.deployment()
        d.write_toml(app_image.ref, count=2, checks=[HTTP_CHECK], deadline="30s")
        assert (r := d.deploy()).code == 0, str(r)
        instances = d.instances()
        assert len(instances) == 2
        host_hostname = Path("/etc/hostname").read_text().strip()
        probe = (
            'echo "hostname=$(hostname)"; '
            'echo "etc_hostname=$(cat /etc/hostname 2>/dev/null)"; '
            f"test -e {marker} && echo marker=visible || echo marker=absent; "
            "test -e /work && echo work=visible || echo work=absent; "
            "ps -o pid,ppid,args | sed 's/^/ps: /'"
        )
        for ins in instances:
            r = d.cove("exec", "--instance", ins["name"], "--", "sh", "-c", probe)
            assert r.code == 0, str(r)
            out = r.out.splitlines()
            assert f"hostname={ins['name']}" in out, r.out
            etc = next(x for x in out if x.startswith("etc_hostname="))
            assert etc != f"etc_hostname={host_hostname}", "the host's /etc/hostname leaks in"
            assert "marker=absent" in out and "work=absent" in out, r.out
            rows = [x[4:].split(None, 2) for x in out if x.startswith("ps: ")][1:]  # no header
            httpd = {pid for pid, _, args in rows if "httpd -f -p 8080" in args}
            # busybox httpd forks a child per connection (a health check may be in flight):
            # the child's parent is the server; count servers only
            procs = [args for pid, ppid, args in rows if not (pid in httpd and ppid in httpd)]
            servers = [p for p in procs if "httpd -f -p 8080" in p and "bwrap" not in p]
            assert len(servers) == 1, f"sees another instance's processes:\n{r.out}"
            host_side = ("python", "cove.cli", "supervisor", "pytest")
            assert not [p for p in procs if any(h in p for h in host_side)], r.out
            assert len(procs) <= 6, f"too many processes visible:\n{r.out}"
    finally:
        marker.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- 11. bad input


@pytest.mark.timeout(90)
def test_bad_deploy_input_is_refused_and_writes_nothing(
    cluster: Cluster,  # noqa: F811
    app_image: BuiltImage,  # noqa: F811
) -> None:
    d = cluster.deployment()
    d.write_toml(app_image.ref, checks=[HTTP_CHECK])
    before = d.releases()
    assert before == []

    jobs: dict[str, Callable[[], Result]] = {}
    expected: dict[str, tuple[int, str]] = {}
    for image, code, needle in (
        ("UPPER/case:tag", 1, "invalid image reference"),
        ("no-registry:tag", 1, "no registry host"),
        ("oci:/does/not/exist", 4, "not found"),
        ("127.0.0.1:1/app:1", 1, "cannot reach"),
    ):
        jobs[image] = lambda image=image: d.deploy("--image", image)
        expected[image] = (code, needle)

    ref = app_image.ref
    check = f'image = "{ref}"\n[[workloads.web.checks]]\n'
    for tag, text, code, needle in (
        ("top-key", f'image = "{ref}"\ncolour = "red"\n', 1, "unknown key(s) colour"),
        (
            "workload-key",
            f'image = "{ref}"\n[workloads.web]\nreplicas = 3\n',
            1,
            "workloads.web.replicas: unknown field",
        ),
        ("no-port", check + 'type = "http"\n', 1, "a http check needs a port"),
        ("type", check + 'type = "grpc"\nport = 80\n', 1, "workloads.web.checks.0.type"),
        ("no-command", check + 'type = "exec"\n', 1, "an exec check needs a command"),
        (
            "timeout",
            check + 'type = "tcp"\nport = 80\ninterval = "1s"\ntimeout = "5s"\n',
            1,
            "timeout can't be longer than its interval",
        ),
        (
            "interval",
            check + 'type = "tcp"\nport = 80\ninterval = "soon"\n',
            1,
            "workloads.web.checks.0.interval",
        ),
        (
            "port-range",
            check + 'type = "tcp"\nport = 70000\n',
            1,
            "workloads.web.checks.0.port",
        ),
        (
            "policy",
            f'image = "{ref}"\n[workloads.web]\nrestart = {{policy = "sometimes"}}\n',
            1,
            "workloads.web.restart.policy",
        ),
        ("syntax", f'image = "{ref}\n[workloads', 1, "fix the toml syntax"),
        ("no-image", "[workloads.web]\ncount = 1\n", 2, "which image?"),
    ):
        other = d.sibling(tag)
        other.write_toml_text(text)
        jobs[tag] = other.deploy
        expected[tag] = (code, needle)

    for key, r in run_many(jobs).items():
        code, needle = expected[key]
        assert_clean_error(r, code, needle, "hint:")

    assert d.releases() == before, "a refused deploy must not write a release"
    assert d.api_instances() == []
    assert not [e for e in d.api_events() if e["spec"]["reason"] == "Deploying"]
