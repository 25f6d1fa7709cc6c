"""`make demo`: start cove on this machine and walk through a real deploy with the CLI.

Every step prints the command it runs, then its output, so a newcomer can retype any of
them. The image is built here (umoci, no Docker) and served by a local registry (Debian's
docker-registry) for the length of the demo. cove keeps running afterwards
(COVE_HOME=.cove in the checkout); `cove down` stops the control plane.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fixtures.images import ImageBuilder, push, start_registry  # noqa: E402

HOME = ROOT / ".cove"
APP_DIR = HOME / "demo-app"
COVE = str(ROOT / ".venv" / "bin" / "cove")
ENV = dict(os.environ, COVE_HOME=str(HOME), COLUMNS=os.environ.get("COLUMNS", "120"))
EMAIL, PASSWORD, ORG = "demo@cove.local", "demo-password-1", "demo"

APP_SCRIPT = """
echo "starting $COVE_INSTANCE ($COVE_RELEASE) as $(id -un)"
S=/run/cove/secrets.json
if [ -r $S ]; then echo "secrets file: $(stat -c '%a %U' $S)"; fi
mkdir -p /tmp/www
echo "hello from $COVE_INSTANCE, release $COVE_RELEASE, {version}" > /tmp/www/index.html
(while true; do echo "tick $(date +%T)"; sleep 5; done) &
exec httpd -f -p 8080 -h /tmp/www
"""

COVE_TOML = """# what runs: one workload, two instances, an HTTP health check
image = "{image}"

[workloads.web]
count = 2
size = "small"
ports = [8080]
env = {{ GREETING = "hi" }}
restart = {{ policy = "always", backoff = "1s", max_backoff = "30s" }}

[[workloads.web.checks]]
type = "http"
port = 8080
path = "/"
interval = "2s"
timeout = "1s"

# how clients reach it: an L4 endpoint with its own IPv6 address, plus the paid
# dedicated-IPv4 add-on; port 80 of both goes to port 8080 of Ready instances
[endpoints.web]
ports = ["80:web:8080"]
ipv4 = true
"""


def say(text: str) -> None:
    print(f"\n\033[1;36m# {text}\033[0m", flush=True)


def cove(*args: str, check: bool = True, capture: bool = False) -> subprocess.CompletedProcess[str]:
    print(f"\033[1m$ cove {shlex.join(args)}\033[0m", flush=True)
    proc = subprocess.run(
        [COVE, *args], env=ENV, cwd=APP_DIR, text=True, capture_output=capture, check=False
    )
    if capture:
        sys.stdout.write(proc.stdout)
        sys.stderr.write(proc.stderr)
    if check and proc.returncode != 0:
        sys.exit(f"demo: `cove {shlex.join(args)}` failed with exit code {proc.returncode}")
    return proc


def missing(*args: str) -> bool:
    """True when `cove ARGS` fails (used to make the demo re-runnable), silently."""
    return subprocess.run([COVE, *args], env=ENV, cwd=APP_DIR, capture_output=True).returncode != 0


def build(builder: ImageBuilder, version: str) -> object:
    return builder.build(
        f"web-{version}",
        cmd=["sh", "-c", APP_SCRIPT.format(version=version)],
        user="app",
        exposed_ports=["8080/tcp"],
    )


def main() -> None:
    APP_DIR.mkdir(parents=True, exist_ok=True)
    say(f"Start cove on this machine: API, controllers and one node agent (data in {HOME})")
    cove("up", "--detach")
    say("Sign up (or sign in again if the demo account exists)")
    if cove("auth", "login", "--email", EMAIL, "--password", PASSWORD, check=False).returncode:
        cove("auth", "signup", "--email", EMAIL, "--password", PASSWORD, "--org", ORG)
    say("The node agent registered itself and says which runtime it uses")
    cove("nodes", "list")
    nodes = subprocess.run(
        [COVE, "nodes", "list", "-o", "json"], env=ENV, cwd=APP_DIR, capture_output=True, text=True
    )
    for node in json.loads(nodes.stdout or "[]"):
        st = node["status"]
        accel = f" ({st['accel'].upper()})" if st.get("accel") else ""
        print(f"  {node['name']}: {st.get('driver')}{accel} - {st.get('driver_detail')}")
    print(
        "  (`cove up --driver microvm` runs each instance in its own microVM: KVM where the\n"
        "   host's KVM can run a guest, else TCG emulation - slower boots, same isolation)"
    )
    say("A project and an app; every app comes with environments prod, staging and dev")
    if missing("projects", "describe", "shop", "--org", ORG):
        cove("projects", "create", "shop", "--org", ORG, "--wait")
    if cove(
        "apps", "describe", "web", "--org", ORG, "--project", "shop", check=False, capture=True
    ).returncode:
        cove("apps", "create", "web", "--org", ORG, "--project", "shop", "--wait")
    cove("use", f"{ORG}/shop", "--app", "web", "--env", "prod")

    say(
        "Build two versions of a small OCI image (umoci, no Docker) and push them to a "
        "local registry"
    )
    for scratch in ("demo-images", "demo-registry"):  # rebuilt each run
        shutil.rmtree(HOME / scratch, ignore_errors=True)
    builder = ImageBuilder(HOME / "demo-images")
    with start_registry(HOME / "demo-registry") as registry:
        v1 = push(build(builder, "v1"), registry, "demo/web", "v1")  # type: ignore[arg-type]
        v2 = push(build(builder, "v2"), registry, "demo/web", "v2")  # type: ignore[arg-type]
        print(f"pushed {v1} and {v2}")
        (APP_DIR / "cove.toml").write_text(COVE_TOML.format(image=v1))
        say(f"The app's cove.toml ({APP_DIR / 'cove.toml'})")
        print((APP_DIR / "cove.toml").read_text())

        say("Deploy: the tag is pinned to a digest, a release is written, instances roll out")
        cove("deploy", "--timeout", "5m")
        cove("status")
        cove("instances", "list")

        say(
            "The endpoint: its own IPv6 address and the IPv4 add-on (this machine's pools: a "
            "unique-local /64 and a 127.x /24, routed locally by the node's edge)"
        )
        cove("wait", "endpoint/web", "--timeout", "60s")
        cove("endpoints", "describe", "web")
        ep = json.loads(
            subprocess.run(
                [COVE, "endpoints", "describe", "web", "-o", "json"],
                env=ENV,
                cwd=APP_DIR,
                text=True,
                capture_output=True,
                check=True,
            ).stdout
        )
        for family in ("ipv6", "ipv4"):
            addr = ep["status"]["addresses"][family]
            url = f"http://[{addr}]/" if family == "ipv6" else f"http://{addr}/"
            say(
                f"Reach the app through the edge over {family.upper()}, balanced over Ready "
                "instances"
            )
            for _ in range(3):
                print(f"$ curl -s {url}", flush=True)
                subprocess.run(["curl", "-sS", "--max-time", "5", url], check=True)

        say("Logs, merged across instances and labelled with each")
        cove("logs", "--tail", "6")

        say("Exec into an instance through the API (the exit code comes back)")
        cove(
            "exec",
            "--workload",
            "web",
            "--",
            "sh",
            "-c",
            'echo "I am $(hostname), uid $(id -u)"; wget -qO- http://127.0.0.1:8080/',
        )

        say("Secrets: encrypted at rest, delivered as /run/cove/secrets.json; a new release")
        cove("secrets", "set", "DATABASE_URL=postgres://demo:s3cret@db/demo")
        cove("secrets", "list")
        cove(
            "exec",
            "--workload",
            "web",
            "--",
            "sh",
            "-c",
            "stat -c '%a %U %n' /run/cove/secrets.json; cat /run/cove/secrets.json; echo",
        )

        say("Deploy v2, then roll back: a new release with v2's predecessor's contents")
        cove("deploy", "--image", v2, "--timeout", "5m")
        cove("exec", "--workload", "web", "--", "wget", "-qO-", "http://127.0.0.1:8080/")
        cove("rollback", "--timeout", "5m")
        cove("exec", "--workload", "web", "--", "wget", "-qO-", "http://127.0.0.1:8080/")
        cove("releases", "list")

    say("Pay for what you use: per second while running, from the operator's price list")
    cove("usage", "--by", "resource")
    cove("billing", "invoice")
    cove("projects", "quotas")

    say("Everything is inspectable: one JSON document on stdout for scripts")
    print("$ cove status -o json | ...")
    doc = json.loads(
        subprocess.run(
            [COVE, "status", "-o", "json"],
            env=ENV,
            cwd=APP_DIR,
            text=True,
            capture_output=True,
            check=True,
        ).stdout
    )
    envs = doc["apps"][0]["environments"]
    print(f"(parsed status: {[(e['environment']['name'], e['caught_up']) for e in envs]})")

    say("What v1 deliberately does not do answers with an explanation and an alternative")
    cove(
        "endpoints",
        "create",
        "web",
        "--port",
        "443:web:8443",
        "--hostname",
        "app.example.com",
        check=False,
    )
    say("The web console: a terminal in your browser running `cove shell` as you")
    cove("console", "--no-open")
    say("More machines: README, 'More machines' (agents on other hosts, server replicas).")
    print(
        f"\ncove is still running (the demo registry has stopped; images stay cached on the "
        f"node). Try it yourself:\n  export COVE_HOME={HOME}\n"
        f"  export PATH={ROOT / '.venv' / 'bin'}:$PATH\n  cd {APP_DIR}\n"
        "  cove status; cove logs -f; cove exec -it --workload web -- sh\n"
        "  cove endpoints describe web   # addresses, backends, traffic counters\n"
        "  cove console   # the same commands in a browser terminal\n"
        f"    (sign in as {EMAIL}, password {PASSWORD})\n"
        "  cove down   # stop the control plane (instances keep running under their "
        "supervisors)"
    )


if __name__ == "__main__":
    main()
