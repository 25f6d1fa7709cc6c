"""Where the CLI keeps its state, and the fixed lookup order for every setting:

    flag  >  COVE_* environment variable  >  cove.toml (app directory)  >  saved context

All state lives under ``COVE_HOME`` (default ``~/.cove``): ``config.json`` (API URL, token,
current org/project/app/env; mode 0600), ``data/`` (the embedded server's database),
``run/`` (pid and URL of a running ``cove up``), ``logs/``.
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cove import errors


def home() -> Path:
    return Path(os.environ.get("COVE_HOME") or Path.home() / ".cove").expanduser()


def data_dir() -> Path:
    return home() / "data"


def run_dir() -> Path:
    return home() / "run"


def log_dir() -> Path:
    return home() / "logs"


def config_path() -> Path:
    return home() / "config.json"


def load() -> dict[str, Any]:
    p = config_path()
    if not p.exists():
        return {}
    try:
        doc = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise errors.UserError(
            f"can't read {p}: {exc}", hint=f"fix or remove {p} (then sign in again)"
        ) from exc
    return doc if isinstance(doc, dict) else {}


def save(doc: dict[str, Any]) -> None:
    p = config_path()
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(f".{os.getpid()}.tmp")  # two writers never share a temp file
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    tmp.replace(p)


def update(**changes: Any) -> dict[str, Any]:
    doc = load()
    for k, v in changes.items():
        if v is None:
            doc.pop(k, None)
        else:
            doc[k] = v
    save(doc)
    return doc


def app_toml() -> dict[str, Any]:
    """``cove.toml`` in the current directory (or a parent), if any. Not in the web
    console's shell (``COVE_CONSOLE=1``): it runs on the server's host, where a cove.toml in
    a parent directory (/tmp/cove.toml) would be someone else's."""
    if os.environ.get("COVE_CONSOLE") == "1":
        return {}
    here = Path.cwd()
    for d in (here, *here.parents):
        p = d / "cove.toml"
        if p.is_file():
            try:
                return tomllib.loads(p.read_text())
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise errors.UserError(
                    f"can't read {p}: {exc}", hint="fix the TOML syntax"
                ) from exc
    return {}


@dataclass
class Context:
    api_url: str
    token: str | None
    org: str | None
    project: str | None
    app: str | None
    env: str | None

    def scope(self) -> dict[str, str | None]:
        return {"org": self.org, "project": self.project, "app": self.app, "env": self.env}


def running_url() -> str | None:
    p = run_dir() / "api.url"
    try:
        return p.read_text().strip() or None
    except OSError:
        return None


def resolve(
    *,
    api_url: str | None = None,
    org: str | None = None,
    project: str | None = None,
    app: str | None = None,
    env: str | None = None,
) -> Context:
    saved = load()
    toml = app_toml()

    def pick(flag: str | None, var: str, toml_key: str | None, saved_key: str) -> str | None:
        if flag:
            return flag
        if os.environ.get(var):
            return os.environ[var]
        if toml_key and isinstance(toml.get(toml_key), str):
            return str(toml[toml_key])
        v = saved.get(saved_key)
        return str(v) if v else None

    url = pick(api_url, "COVE_API_URL", None, "api_url") or running_url()
    if not url:
        raise errors.UserError(
            "no cove API to talk to",
            hint="start one with `cove up`, or pass --api-url / set COVE_API_URL",
            code="no_api",
        )
    return Context(
        api_url=url,
        token=os.environ.get("COVE_TOKEN") or saved.get("token"),
        org=pick(org, "COVE_ORG", "org", "org"),
        project=pick(project, "COVE_PROJECT", "project", "project"),
        app=pick(app, "COVE_APP", "app", "app"),
        env=pick(env, "COVE_ENV", "env", "env"),
    )
