"""The reference docs keep up with the code (after sqlite-utils' tests/test_docs.py).

- every visible CLI command has help text and a section in docs/cli.md;
- docs/cli.md and docs/deferred.md are exactly what scripts/gen_cli_docs.py generates now;
- every API route in the OpenAPI schema has a summary or docstring, and docs/api.md covers
  every kind's route family with what the API really allows on it;
- docs/cove-toml.md documents every key of cove.toml (the top-level keys the CLI accepts and
  every field of the workload schema, with its default and choices), every size, and an
  example that the CLI and the API accept;
- the README names the two set-up commands.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, Literal, get_args, get_origin

import pytest
import typer
from fastapi.routing import APIRoute
from pydantic import BaseModel

from cove import errors
from cove.api import create_app
from cove.api.deploys import DeployBody
from cove.cli.deploy import load_workloads
from cove.cli.main import build
from cove.model.kinds import KINDS
from cove.model.workload import SIZES, Check, Mount, Restart, WorkloadTemplate
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


# --------------------------------------------------------------------------- cove.toml

COVE_TOML = DOCS / "cove-toml.md"

# model -> the heading (its start) of the docs/cove-toml.md section whose table documents it
SCHEMA_SECTIONS: dict[type[BaseModel], str] = {
    WorkloadTemplate: "## Workload keys",
    Check: "### Checks",
    Restart: "### Restart",
    Mount: "### Mounts",
}


def _section(heading: str) -> str:
    """The text of the docs/cove-toml.md section that starts with *heading*, up to the next
    heading of any level."""
    text = COVE_TOML.read_text()
    m = re.search(rf"^{re.escape(heading)}.*$", text, re.M)
    assert m is not None, f"docs/cove-toml.md has no section '{heading} ...'"
    rest = text[m.end() :]
    end = re.search(r"^#{1,6} ", rest, re.M)
    return rest[: end.start()] if end else rest


def _table(heading: str) -> dict[str, list[str]]:
    """{key: [cells after the first]} for the table rows of a section; a first cell that
    names several keys (`org`, `project`) gives each of them a row."""
    rows: dict[str, list[str]] = {}
    for line in _section(heading).splitlines():
        if not line.startswith("| `"):
            continue
        first, *cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        for key in re.findall(r"`([^`]+)`", first):
            rows[key] = cells
    return rows


def _toml_literal(value: Any) -> str:
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value!r}`"


def _documented_default(field: Any) -> str | None:
    """What the Default column must say for a schema field (None: free text allowed)."""
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, list | dict):
            return f"`{value!r}`"
        return None  # a nested table (restart): its own section documents its defaults
    if field.default is None:
        return None
    return _toml_literal(field.default)


def _choices(annotation: Any) -> tuple[str, ...]:
    if get_origin(annotation) is Literal:
        return tuple(str(a) for a in get_args(annotation))
    return ()


SCHEMA_FIELDS = [
    (model, name, field) for model in SCHEMA_SECTIONS for name, field in model.model_fields.items()
]


@pytest.mark.parametrize(
    ("model", "name", "field"),
    SCHEMA_FIELDS,
    ids=[f"{m.__name__}.{n}" for m, n, _ in SCHEMA_FIELDS],
)
def test_cove_toml_docs_every_workload_field(model: type[BaseModel], name: str, field: Any) -> None:
    heading = SCHEMA_SECTIONS[model]
    rows = _table(heading)
    assert name in rows, (
        f"docs/cove-toml.md: no row for `{name}` ({model.__name__}) in section '{heading}'"
    )
    _type, default, *_rest = rows[name]
    want = _documented_default(field)
    if want is not None:
        assert default == want, (
            f"docs/cove-toml.md: `{name}` ({model.__name__}) has default {default!r}; "
            f"the code says {want}"
        )
    row = " | ".join(rows[name])
    for choice in _choices(field.annotation):
        assert f"`{choice}`" in row, (
            f"docs/cove-toml.md: `{name}` ({model.__name__}) does not mention `{choice}`"
        )


def test_cove_toml_docs_document_nothing_the_schema_lacks() -> None:
    for model, heading in SCHEMA_SECTIONS.items():
        extra = set(_table(heading)) - set(model.model_fields)
        assert not extra, f"docs/cove-toml.md '{heading}' documents unknown keys {sorted(extra)}"


def test_cove_toml_docs_cover_the_top_level_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "cove.toml").write_text("surely_not_a_key = 1\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(errors.UserError) as refused:
        load_workloads("registry.example.com/app:1")
    hint = refused.value.hint or ""
    assert "top-level keys are " in hint, hint
    accepted = set(hint.split("top-level keys are ", 1)[1].split(", "))
    documented = set(_table("## Top-level keys"))
    assert accepted == documented, (
        f"docs/cove-toml.md top-level keys: missing {sorted(accepted - documented)}, "
        f"not accepted {sorted(documented - accepted)}"
    )


def test_cove_toml_docs_list_every_size() -> None:
    rows = _table("### Sizes")
    assert set(rows) == set(SIZES), "docs/cove-toml.md: the sizes table differs from SIZES"
    for size, (millis, memory_mb) in SIZES.items():
        assert rows[size][:2] == [f"{millis / 1000:g}", str(memory_mb)], size


def test_cove_toml_docs_example_is_accepted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocks = re.findall(r"```toml\n(.*?)```", COVE_TOML.read_text(), re.S)
    assert blocks, "docs/cove-toml.md has no ```toml example"
    (tmp_path / "cove.toml").write_text(blocks[0])
    monkeypatch.chdir(tmp_path)
    image, workloads, variables = load_workloads(None)
    body = DeployBody.model_validate(
        {"image": image, "workloads": workloads, "variables": variables}
    )
    assert {"web", "worker"} <= set(body.workloads)
    assert any(w.mounts for w in body.workloads.values()), "the example mounts a volume"
    assert {c.type for w in body.workloads.values() for c in w.checks} >= {"http", "exec"}


# --------------------------------------------------------------------------- README


def test_readme_names_the_two_setup_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme
    assert "make test" in readme
