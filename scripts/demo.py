"""`make demo`: start cove on this machine and walk through it with the real CLI.

Every step prints the command it runs, then its output, so a newcomer can retype any of
them. cove keeps running afterwards (COVE_HOME=.cove in the checkout); `cove down` stops it.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOME = ROOT / ".cove"
COVE = str(ROOT / ".venv" / "bin" / "cove")
ENV = dict(os.environ, COVE_HOME=str(HOME), COLUMNS=os.environ.get("COLUMNS", "110"))
EMAIL, PASSWORD, ORG = "demo@cove.local", "demo-password-1", "demo"


def say(text: str) -> None:
    print(f"\n\033[1;36m# {text}\033[0m", flush=True)


def cove(*args: str, check: bool = True, capture: bool = False) -> subprocess.CompletedProcess[str]:
    print(f"\033[1m$ cove {shlex.join(args)}\033[0m", flush=True)
    proc = subprocess.run([COVE, *args], env=ENV, text=True, capture_output=capture, check=False)
    if capture:
        sys.stdout.write(proc.stdout)
        sys.stderr.write(proc.stderr)
    if check and proc.returncode != 0:
        sys.exit(f"demo: `cove {shlex.join(args)}` failed with exit code {proc.returncode}")
    return proc


def main() -> None:
    say(f"Start cove on this machine: API, controllers and one node agent (data in {HOME})")
    cove("up", "--detach")
    say("Sign up (or sign in again if the demo account exists)")
    if cove("auth", "login", "--email", EMAIL, "--password", PASSWORD, check=False).returncode != 0:
        cove("auth", "signup", "--email", EMAIL, "--password", PASSWORD, "--org", ORG)
    cove("auth", "whoami")
    say("A project, and an app in it; every mutation answers with a receipt you can wait on")
    if cove("projects", "describe", "shop", "--org", ORG, check=False, capture=True).returncode == 4:
        cove("projects", "create", "shop", "--org", ORG, "--wait")
    cove("use", f"{ORG}/shop")
    if cove("apps", "describe", "web", check=False, capture=True).returncode == 4:
        cove("apps", "create", "web", "--wait")
    say("Every app comes with environments prod, staging and dev")
    cove("environments", "list", "--app", "web")
    say("Desired vs current, and whether status has caught up with the spec")
    cove("status")
    say("Machine-readable output: exactly one JSON document on stdout")
    proc = cove("apps", "describe", "web", "-o", "json", capture=True)
    doc = json.loads(proc.stdout)
    print(f"(parsed: kind={doc['kind']} generation={doc['metadata']['generation']} "
          f"observed={doc['status'].get('observed_generation')})")
    say("Everything that happened, as events (resume with --since REVISION, follow with -f)")
    cove("events", "--for", "app/web")
    say("The node agent registered itself; it has no runtime driver yet")
    cove("nodes", "list")
    say("What v1 deliberately does not do answers with an explanation and an alternative")
    cove("endpoints", "create", "web", "--app", "web", "--env", "prod", "--port", "443:web:8443",
         "--hostname", "app.example.com", check=False)
    say("Coming next: deploying OCI images (sandbox and microVM runtimes), L4 endpoints over "
        "IPv6 with an IPv4 add-on, metering and the terminal console.")
    print(f"\ncove is still running. Try it yourself:\n  export COVE_HOME={HOME}\n"
          f"  export PATH={ROOT / '.venv' / 'bin'}:$PATH\n  cove --help\n  cove down   # stop it")


if __name__ == "__main__":
    main()
