"""`cove events` (narrowed with --for, resumed with --since, followed with -f) and
`cove status` (desired vs current)."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from .helpers import COVE, RESOURCE_KEYS, User, assert_clean_error, cove_env, uniq


@pytest.fixture(scope="module")
def eve(make_user: Callable[..., User]) -> User:
    """A user of her own, so her org's event history holds only what these tests did."""
    return make_user("eve")


def _create_app(u: User, name: str | None = None) -> tuple[str, dict[str, Any]]:
    api = u.api()
    name = name or uniq("app")
    rec = api.create("apps", name, **u.scope())
    api.close()
    return name, rec


@pytest.mark.timeout(60)
def test_events_for_one_resource(eve: User) -> None:
    name, rec = _create_app(eve)
    app_id = rec["resource"]["id"]
    r = eve.cove("events", "--for", f"app/{name}", "-o", "json")
    assert r.code == 0, str(r)
    evs = r.json()
    assert evs, str(r)
    for ev in evs:
        assert set(ev) == RESOURCE_KEYS and ev["kind"] == "event"
        assert ev["parent"]["id"] == app_id, "--for must narrow to that one resource"
    reasons = [e["spec"]["reason"] for e in evs]
    assert "Created" in reasons and "EnvironmentsReady" in reasons

    # the per-kind form answers the same
    r = eve.cove("apps", "events", name, "-o", "json")
    assert r.code == 0, str(r)
    assert [e["id"] for e in r.json()] == [e["id"] for e in evs]

    # and the form for people
    r = eve.cove("events", "--for", f"app/{name}")
    assert r.code == 0, str(r)
    assert f"app/{name}" in r.out and "Created" in r.out


@pytest.mark.timeout(60)
def test_events_since_a_revision(eve: User) -> None:
    _create_app(eve)
    r = eve.cove("events", "-o", "json")
    assert r.code == 0, str(r)
    everything = r.json()
    revs = [e["metadata"]["revision"] for e in everything]
    assert revs == sorted(revs) and len(revs) >= 3, "events come in revision order"
    cut = revs[len(revs) // 2]

    r = eve.cove("events", "--since", str(cut), "-o", "json")
    assert r.code == 0, str(r)
    later = r.json()
    assert [e["id"] for e in later] == [
        e["id"] for e in everything if e["metadata"]["revision"] > cut
    ]

    r = eve.cove("events", "--since", str(revs[-1] + 10_000), "-o", "json")
    assert r.code == 0 and r.json() == [], str(r)


def _reader(stream: Any, lines: queue.Queue[str]) -> None:
    for line in stream:
        lines.put(line)


@pytest.mark.timeout(60)
def test_events_follow_streams_json_lines(eve: User) -> None:
    proc = subprocess.Popen(
        [str(COVE), "events", "-f", "-o", "json"],
        env=cove_env(eve.home, eve.env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=eve.home,
        # a shell without job control starts background jobs with SIGINT ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_reader, args=(proc.stdout, lines), daemon=True).start()
    try:
        first = lines.get(timeout=30)  # connected: the history comes first
        assert json.loads(first)["kind"] == "event"
        name = uniq("live")
        _create_app(eve, name)  # after the stream started
        deadline = time.monotonic() + 20
        seen = None
        while seen is None:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            ev = json.loads(line)  # every line is one JSON document
            assert set(ev) == RESOURCE_KEYS
            if ev["parent"].get("name") == name:
                seen = ev
        assert seen["spec"]["reason"] in ("Created", "EnvironmentsReady")
        assert proc.poll() is None, "-f must keep streaming"
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, proc.returncode  # Ctrl-C: 130, like any CLI
    assert proc.stderr is not None
    assert "Traceback" not in proc.stderr.read()


@pytest.mark.timeout(60)
def test_events_follow_refuses_yaml(eve: User) -> None:
    r = eve.cove("events", "-f", "-o", "yaml", timeout=20)
    assert_clean_error(r, 2, "-f streams JSON lines")


@pytest.mark.timeout(60)
def test_status_desired_vs_current(eve: User) -> None:
    name, _ = _create_app(eve)
    api = eve.api()
    env = api.call("GET", "/v1/environments/staging", app=name, **eve.scope())
    api.call("GET", f"/v1/environments/{env['id']}/wait", **{"for": "caught-up", "timeout": "20s"})
    api.close()

    r = eve.cove("status", "-o", "json")
    assert r.code == 0, str(r)
    doc = r.json()
    assert doc["org"]["name"] == eve.org and doc["project"]["name"] == eve.project
    assert isinstance(doc["revision"], int)
    apps = {a["app"]["name"]: a for a in doc["apps"]}
    assert name in apps
    envs = {e["environment"]["name"]: e for e in apps[name]["environments"]}
    assert set(envs) == {"prod", "staging", "dev"}
    for e in envs.values():
        assert set(e) >= {"desired", "current", "caught_up", "generation", "ready"}
        assert e["caught_up"] is True
        assert e["observed_generation"] == e["generation"]
    assert envs["staging"]["desired"]["scale"] == {}
    assert envs["staging"]["generation"] == 1
    assert envs["prod"]["desired"]["release"] is None  # nothing deployed
    assert envs["prod"]["desired"]["scale"] == {}

    # narrowed to one app
    r = eve.cove("status", "--app", name, "-o", "json")
    assert r.code == 0, str(r)
    assert [a["app"]["name"] for a in r.json()["apps"]] == [name]

    r = eve.cove("status")
    assert r.code == 0, str(r)
    for part in (f"{eve.org}/{eve.project}", f"app {name}", "DESIRED", "CURRENT", "CAUGHT UP"):
        assert part in r.out, f"{part!r} missing\n{r}"
    for env_name in ("prod", "staging", "dev"):
        assert env_name in r.out
