"""The reference docs keep up with the code (after sqlite-utils' tests/test_docs.py).

- every visible CLI command has help text and a section in docs/cli.md;
- docs/cli.md and docs/deferred.md are exactly what scripts/gen_cli_docs.py generates now;
- every API route in the OpenAPI schema has a summary or docstring, and docs/api.md covers
  every kind's route family with what the API really allows on it;
- the README names the two set-up commands.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import typer
from fastapi.routing import APIRoute

from cove.api import create_app
from cove.cli.main import build
from cove.model.kinds import KINDS
from cove.store import Store

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
REGENERATE = ".venv/bin/python scripts/gen_cli_docs.py"

# Routes without a summary or docstring today; they live in src/cove/api/app.py. Give the
# route a docstring and remove it from here (the test fails until both are done).
KNOWN_UNDOCUMENTED_ROUTES = {
    ("GET", "/healthz"),
    ("GET", "/v1/auth/whoami"),
    ("DELETE", "/v1/tokens/{token_id}"),
    ("GET", "/v1/orgs/{ref}/members"),
    ("POST", "/v1/nodes/{node_id}/heartbeat"),
}


def _generator() -> ModuleType:
    name = "gen_cli_docs"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / "gen_cli_docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- CLI


def _commands(command: Any, path: tuple[str, ...]) -> Iterator[tuple[str, Any]]:
    """(full path, command) for every visible command and group, walked independently of
    the generator so that a generator that skips commands is caught too."""
    yield " ".join(path), command
    for name, sub in (getattr(command, "commands", None) or {}).items():
        if not getattr(sub, "hidden", False):
            yield from _commands(sub, (*path, name))


CLI_COMMANDS = list(_commands(typer.main.get_command(build()), ("cove",)))


def test_the_cli_walk_finds_groups_and_leaves() -> None:
    names = {name for name, _ in CLI_COMMANDS}
    assert {"cove up", "cove apps list", "cove orgs members add", "cove wait"} <= names
    assert "cove envs" not in names, "hidden aliases are not documented"


@pytest.mark.parametrize(("name", "command"), CLI_COMMANDS, ids=[n for n, _ in CLI_COMMANDS])
def test_every_cli_command_has_help_and_a_docs_section(name: str, command: Any) -> None:
    assert (command.help or "").strip(), f"`{name}` has no help text: give it help=..."
    if name == "cove":
        return
    is_group = isinstance(getattr(command, "commands", None), dict)
    level = "##" if is_group and name.count(" ") == 1 else "###"
    headings = set(re.findall(r"^#{2,3} .+$", (DOCS / "cli.md").read_text(), re.M))
    assert f"{level} {name}" in headings, (
        f"docs/cli.md has no '{level} {name}' section: run {REGENERATE}"
    )


def test_generated_docs_are_up_to_date() -> None:
    stale = _generator().stale()
    report = "\n".join(f"{p.relative_to(ROOT)}:\n{diff[:3000]}" for p, diff in stale.items())
    assert not stale, f"generated docs are out of date; run {REGENERATE}\n{report}"


def test_the_check_notices_a_stale_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gen = _generator()
    doc = tmp_path / "cli.md"
    doc.write_text("# out of date\n")
    monkeypatch.setattr(gen, "ROOT", tmp_path)
    monkeypatch.setattr(gen, "TARGETS", {doc: gen.render_cli})
    assert list(gen.stale()) == [doc]
    assert gen.main(["--check"]) == 1
    assert gen.main([]) == 0
    assert gen.stale() == {} and gen.main(["--check"]) == 0
    assert "### cove apps list" in doc.read_text()


def test_the_hand_written_intro_survives_regeneration() -> None:
    intro = (DOCS / "_cli_intro.md").read_text()
    cli = (DOCS / "cli.md").read_text()
    assert intro.strip() in cli
    for topic in ("COVE_HOME", "-o json", "cove wait", "condition=TYPE", "Exit codes"):
        assert topic in intro, topic


# --------------------------------------------------------------------------- API


@pytest.fixture(scope="module")
def api_routes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[APIRoute]]:
    store = Store(f"sqlite:///{tmp_path_factory.mktemp('docs')}/cove.db")
    store.migrate()
    app = create_app(store)
    yield [r for r in app.routes if isinstance(r, APIRoute) and r.include_in_schema]
    store.close()


def _methods(routes: list[APIRoute]) -> set[tuple[str, str]]:
    return {(m, r.path) for r in routes for m in r.methods or ()}


def test_every_api_route_has_a_summary_or_docstring(api_routes: list[APIRoute]) -> None:
    missing = {
        (m, r.path)
        for r in api_routes
        for m in r.methods or ()
        if not (r.summary or (r.description or "").strip())
    }
    new = sorted(missing - KNOWN_UNDOCUMENTED_ROUTES)
    assert not new, f"API routes without a summary or docstring: {new}"
    fixed = sorted(KNOWN_UNDOCUMENTED_ROUTES - missing)
    assert not fixed, f"documented now, drop from KNOWN_UNDOCUMENTED_ROUTES: {fixed}"


def _kinds_table() -> dict[str, list[str]]:
    """The rows of docs/api.md's "what each kind supports" table, by route family."""
    rows = {}
    for line in (DOCS / "api.md").read_text().splitlines():
        m = re.match(r"^\| `(/v1/[a-z_]+)` \|(.*)\|$", line)
        if m:
            rows[m.group(1)] = [c.strip() for c in m.group(2).split("|")]
    return rows


def test_api_docs_cover_every_kind_and_what_it_allows(api_routes: list[APIRoute]) -> None:
    text = (DOCS / "api.md").read_text()
    have = _methods(api_routes)
    rows = _kinds_table()
    for kind in KINDS:
        base = f"/v1/{kind.plural}"
        assert f"`{base}`" in text, f"docs/api.md does not mention {base}"
        for method, path in (("GET", base), ("GET", base + "/{ref}")):
            assert (method, path) in have, f"{method} {path} is missing from the API"
        assert base in rows, f"docs/api.md: no row for {base} in the kinds table"
        _kind, create, update, delete = rows[base][:4]
        for cell, method, path in (
            (create, "POST", base),
            (update, "PATCH", base + "/{ref}"),
            (delete, "DELETE", base + "/{ref}"),
        ):
            documented = cell.startswith("yes")
            assert documented == ((method, path) in have), (
                f"docs/api.md says {method} {path} is {'' if documented else 'not '}"
                f"supported; the API says otherwise"
            )


def test_api_docs_list_the_problem_codes() -> None:
    text = (DOCS / "api.md").read_text()
    codes = ["bad_json", "invalid", "unauthenticated", "forbidden", "not_found"]
    codes += ["already_exists", "conflict", "stale_revision", "timeout", "wait_failed"]
    codes += ["too_large", "not_in_v1", "unavailable", "internal", "method_not_allowed"]
    for code in codes:
        assert f"| `{code}` |" in text, f"docs/api.md: no row for problem code {code}"


# --------------------------------------------------------------------------- README


def test_readme_names_the_two_setup_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme
    assert "make test" in readme
