"""The registry of what v1 does not do is complete and consistent."""

from __future__ import annotations

import re

from cove import deferred, errors
from cove.model import KINDS
from cove.model.kinds import get_kind


def test_keys_are_unique() -> None:
    keys = [d.key for d in deferred.REGISTRY]
    assert len(keys) == len(set(keys))
    assert set(deferred.BY_KEY) == set(keys)


def test_every_entry_says_why_and_what_instead_and_where() -> None:
    for d in deferred.REGISTRY:
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", d.key), d.key
        assert d.feature.strip(), d.key
        assert len(d.why.strip()) > 10, d.key
        assert len(d.instead.strip()) > 10, d.key
        assert d.api_fields or d.api_routes or d.cli, f"{d.key}: nowhere to reach for it"


def test_places_are_well_formed_and_claimed_once() -> None:
    kinds = {k.name for k in KINDS}
    fields: list[str] = []
    routes: list[str] = []
    cli: list[str] = []
    for d in deferred.REGISTRY:
        for f in d.api_fields:
            kind, _, path = f.partition(".")
            assert kind in kinds or kind == "member", f
            assert path, f
            fields.append(f)
        for r in d.api_routes:
            assert r.startswith("/v1/") and not r.endswith("/"), r
            routes.append(r)
        cli.extend(d.cli)
    for places in (fields, routes, cli):
        assert len(places) == len(set(places)), places


def test_deferred_spec_fields_are_not_real_fields() -> None:
    """A deferred field that is also a real spec field would be silently accepted."""
    for d in deferred.REGISTRY:
        for f in d.api_fields:
            kind, _, path = f.partition(".")
            if kind == "member":
                continue
            section, _, name = path.partition(".")
            assert section == "spec", f
            assert name not in get_kind(kind).spec_model.model_fields, f


def test_lookups_find_each_entry() -> None:
    for d in deferred.REGISTRY:
        for f in d.api_fields:
            kind, _, path = f.partition(".")
            assert deferred.for_field(kind, path) is d
        for r in d.api_routes:
            assert deferred.for_route(r) is d
            assert deferred.for_route(r + "/anything/below") is d
        for c in d.cli:
            assert deferred.for_cli(c) is d
    assert deferred.for_field("endpoint", "spec.ports") is None
    assert deferred.for_route("/v1/projects") is None
    assert deferred.for_route("/v1/databasesx") is None


def test_error_carries_the_explanation() -> None:
    d = deferred.BY_KEY["autoscaling"]
    err = d.error("environment field spec.autoscale")
    assert isinstance(err, errors.NotInV1)
    doc = err.problem()
    assert doc["status"] == 400
    assert doc["code"] == "not_in_v1"
    assert doc["feature"] == "autoscaling"
    assert doc["instead"] == d.instead
    assert doc["hint"] == d.instead
    assert d.why in doc["detail"] and "spec.autoscale" in doc["detail"]
