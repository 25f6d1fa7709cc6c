"""Deploys that go wrong: a crash loop (backoff, then the rollout halts and the previous
release keeps serving), a health check that starts failing (restart for "health"), and a
hostile image (refused, nothing left in the layer cache). One ``cove up`` for the module."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fixtures.images import BuiltImage, hostile_image

from .deploy_support import (  # noqa: F401  (fixtures)
    BOTH_DRIVERS,
    HTTP_CHECK,
    Cluster,
    app_image,
    backoff_delays,
    builder,
    cluster,
    condition,
    instance_events,
    is_ready,
    wait_for,
)

FAST_RESTART = {"policy": "always", "backoff": "0.2s", "max_backoff": "1s"}


def _halted(d: Any) -> None:
    """The environment shows the halt, in `cove status` and on the environment itself."""
    st = d.status()
    assert st["ready"]["status"] == "false" and st["ready"]["reason"] == "RolloutHalted", st
    env = d.json("environments", "describe", "prod")
    failed = condition(env, "Failed")
    assert failed and failed["status"] == "true" and failed["reason"] == "RolloutHalted", env


# ----------------------------------------------------------------------------- 2. crash loop


@pytest.mark.timeout(120)
def test_crash_loop_backs_off_then_the_rollout_halts(
    cluster: Cluster,  # noqa: F811
    app_image: BuiltImage,  # noqa: F811
) -> None:
    d = cluster.deployment()
    d.write_toml(app_image.ref, checks=[HTTP_CHECK], deadline="30s")
    assert (r := d.deploy()).code == 0, str(r)
    [old] = d.instances()

    d.write_toml(
        app_image.ref,
        env={"MODE": "crash", "CRASH_AFTER": "0.3"},
        checks=[HTTP_CHECK],
        restart=FAST_RESTART,
        deadline="9s",
    )
    proc = d.popen("deploy", "--timeout", "60s")
    seen: list[dict[str, Any]] = []

    def crashing() -> dict[str, Any] | None:
        items = d.api_instances()
        serving = [i for i in items if i["spec"]["release_name"] == "v1"]
        assert [(i["id"], is_ready(i)) for i in serving] == [(old["id"], True)], serving
        new = [i for i in items if i["spec"]["release_name"] == "v2"]
        if new:
            seen.append(new[0]["status"])
            if int(new[0]["status"].get("restart_count") or 0) >= 3:
                return new[0]
        return None

    try:
        crasher = wait_for(crashing, timeout=30, what="the v2 instance to restart 3 times")
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert crasher["status"]["last_exit_code"] == 1, crasher["status"]
    counts = [int(s.get("restart_count") or 0) for s in seen]
    assert counts == sorted(counts), f"restart_count went down: {counts}"

    # `cove deploy` reports the halt and fails
    assert proc.returncode != 0, f"cove deploy exited 0\n{out}\n{err}"
    assert "RolloutHalted" in err and "previous instances keep serving" in err, err
    _halted(d)
    [v1, v2] = d.releases()
    assert v2["status"]["state"] == "failed"
    assert v1["status"]["state"] == "active"

    # the instance's story: it exited with 1, then backed off ever longer, up to the cap
    evs = instance_events(d.events(), crasher["name"])
    exits = [e for e in evs if e["spec"]["reason"] == "Exited"]
    assert exits and all("exited with code 1" in e["spec"]["message"] for e in exits), exits
    delays = backoff_delays(evs)
    assert len(delays) >= 3, delays
    assert delays[:3] == [0.2, 0.4, 0.8], delays
    assert delays == sorted(delays) and max(delays) <= 1.0, delays
    assert any(e["spec"]["reason"] == "Stopping" for e in evs), "a halt stops new instances"

    # the previous release kept serving throughout (checked above while v2 crashed), untouched
    [still] = d.wait_converged(1, "v1")
    assert still["id"] == old["id"]
    assert still["status"]["restart_count"] == 0
    assert still["status"]["started_at"] == old["status"]["started_at"]
    ip = still["status"]["addresses"]["ipv4"]
    assert httpx.get(f"http://{ip}:8080/", timeout=5).text.strip() == "ok a"


# ----------------------------------------------------------------------------- 3. health


@BOTH_DRIVERS
@pytest.mark.timeout(90)
def test_failing_health_check_restarts_the_instance(
    cluster: Cluster,  # noqa: F811
    app_image: BuiltImage,  # noqa: F811
) -> None:
    d = cluster.deployment()
    check = dict(HTTP_CHECK, unhealthy_threshold=2)
    # serves for 7 s, then stops serving but stays alive: only the check can tell. That is
    # after the rollout's deadline: a live release is restarted, never halted. (A microVM
    # under TCG boots in seconds: both times are longer there.)
    slow = cluster.driver == "microvm"
    d.write_toml(
        app_image.ref,
        env={"SERVE_FOR": "14" if slow else "7"},
        checks=[check],
        restart=FAST_RESTART,
        deadline="12s" if slow else "5s",
    )
    assert (r := d.deploy()).code == 0, str(r)
    [ins] = d.instances()
    assert is_ready(ins) and ins["status"]["restart_count"] == 0

    def restarted() -> dict[str, Any] | None:
        items = d.api_instances()
        assert [(i["id"], i["spec"]["desired"]) for i in items] == [(ins["id"], "running")], (
            f"the live release's instance was stopped or replaced: {items}"
        )
        [now] = items
        st = now["status"]
        ok = int(st.get("restart_count") or 0) >= 1 and is_ready(now)
        return now if ok else None

    wait_for(restarted, timeout=60, what="a restart for health, then Ready again")
    [after] = d.instances()
    assert after["id"] == ins["id"], "a health restart keeps the instance"
    evs = instance_events(d.events(), ins["name"])
    story = "\n".join(f"{e['spec']['reason']}: {e['spec']['message']}" for e in evs)
    assert after["status"]["last_termination_reason"] == "health", f"{after['status']}\n{story}"
    assert after["status"]["restart_count"] >= 1
    assert after["status"]["started_at"] != ins["status"]["started_at"]

    [unhealthy, *_] = [e for e in evs if e["spec"]["reason"] == "Unhealthy"]
    msg = unhealthy["spec"]["message"]
    assert unhealthy["spec"]["type"] == "Warning"
    assert "http check :8080/ failed 2 times" in msg and "restarting" in msg, msg
    reasons = [e["spec"]["reason"] for e in evs]
    assert "Restarted" in reasons, reasons
    # the process itself never exited on its own: no crash, no OOM
    assert "OOMKilled" not in reasons
    assert not [e for e in evs if e["spec"]["reason"] == "Exited"], evs
    logs = [x["line"] for x in d.logs("--instance", ins["name"])]
    assert logs.count(f"start instance={ins['name']} release=v1 version=a") >= 2, logs
    assert "stopped serving, still alive" in logs

    # the release stays live: no halt, the environment is Ready again
    assert not [e for e in d.api_events() if e["spec"]["reason"] == "RolloutHalted"]
    [v1] = d.releases()
    assert v1["status"]["state"] == "active", v1["status"]
    st = wait_for(
        lambda: (s := d.status())["ready"]["status"] == "true" and s,
        timeout=10,
        what="the environment to be Ready again",
    )
    assert st["ready"]["reason"] == "RolloutComplete", st


# ----------------------------------------------------------------------------- microVM crashes


@BOTH_DRIVERS
@pytest.mark.timeout(180)
def test_a_guest_panic_and_a_killed_qemu_are_crashes_and_restart(
    cluster: Cluster,  # noqa: F811
    app_image: BuiltImage,  # noqa: F811
) -> None:
    if cluster.driver != "microvm":
        pytest.skip("a guest kernel and a QEMU process are a microVM's")
    d = cluster.deployment()
    d.write_toml(app_image.ref, checks=[HTTP_CHECK], restart=FAST_RESTART, deadline="60s")
    assert (r := d.deploy()).code == 0, str(r)
    [ins] = d.instances()

    def restarted(n: int) -> dict[str, Any] | None:
        [now] = d.api_instances()
        st = now["status"]
        return now if int(st.get("restart_count") or 0) >= n and is_ready(now) else None

    # the guest's kernel panics (root in the guest may do that to its own kernel)
    d.cove("exec", "--instance", ins["name"], "--", "sh", "-c", "echo c > /proc/sysrq-trigger")
    wait_for(lambda: restarted(1), timeout=90, what="a restart after the guest's kernel panic")
    # QEMU itself is killed on the host
    vm = json.loads(
        (cluster.state_dir / "microvm" / "instances" / ins["id"] / "sandbox.json").read_text()
    )
    os.kill(int(vm["qemu_pid"]), signal.SIGKILL)
    after = wait_for(lambda: restarted(2), timeout=90, what="a restart after QEMU was killed")
    assert after["id"] == ins["id"]
    evs = instance_events(d.events(), ins["name"])
    crashes = [e["spec"]["message"] for e in evs if e["spec"]["reason"] == "Crashed"]
    assert len(crashes) >= 2, [(e["spec"]["reason"], e["spec"]["message"]) for e in evs]
    assert crashes[0].startswith("guest kernel panic: "), crashes
    assert "QEMU ended by signal 9" in crashes[1], crashes
    assert after["status"]["last_termination_reason"] == "crashed", after["status"]


# ----------------------------------------------------------------------------- 9. hostile image


@pytest.mark.timeout(90)
def test_hostile_image_is_refused_and_leaves_no_layers(
    cluster: Cluster,  # noqa: F811
    tmp_path: Path,
) -> None:
    img = hostile_image("path_traversal", tmp_path / "hostile")
    d = cluster.deployment()
    d.write_toml(img.ref, checks=[HTTP_CHECK], deadline="30s")
    r = d.deploy()
    assert r.code != 0, str(r)
    assert "Traceback" not in r.err
    assert "escapes the layer" in r.err and "RolloutHalted" in r.err, str(r)
    _halted(d)

    evs = d.events()
    failed = [e for e in evs if e["spec"]["reason"] == "StartFailed"]
    assert len(failed) == 1, evs
    msg = failed[0]["spec"]["message"]
    assert failed[0]["spec"]["type"] == "Warning"
    assert "etc/../../../escaped" in msg and "escapes the layer with '..'" in msg, msg
    assert not [e for e in evs if e["spec"]["reason"] in ("Started", "Restarted", "BackOff")]

    # the agent's layer cache holds complete layers of images it pulled, and nothing else
    cache = cluster.state_dir / "images"
    records = [json.loads(p.read_text()) for p in (cache / "images").glob("*.json")]
    assert img.digest.split(":")[1] not in {p.stem for p in (cache / "images").iterdir()}
    wanted: set[str] = set()
    for rec in records:
        wanted |= {str(x).split(":")[-1] for x in rec["diff_ids"]}
    layers = {p.name for p in (cache / "layers").iterdir()}
    assert layers <= wanted, f"layers no image needs (partial unpacks?): {layers - wanted}"
    for diff_id in img.diff_ids:
        assert diff_id.split(":")[1] not in layers, "a layer of the refused image was kept"
    assert list((cache / "tmp").iterdir()) == [], "staging left behind"
    # and the traversal went nowhere
    assert not list(cluster.state_dir.rglob("escaped"))
    assert not (cluster.state_dir.parent / "escaped").exists()

    # the instance was stopped and removed: nothing runs for this release
    wait_for(lambda: d.api_instances() == [], timeout=20, what="the failed instance to go")
