"""Property tests of the store's revisions and compare-and-swap (Hypothesis, stateful).

Random sequences of creates, updates (with the right, a stale or no expected revision),
status writes, events and multi-write transactions must keep these true:

- the global revision strictly increases across all writes, and a write that changes
  nothing takes no revision;
- every row's revision is unique (among resources and events together);
- a stale compare-and-swap raises Conflict and leaves the row byte-identical;
- ``generation`` increases exactly when the spec changes.
"""

from __future__ import annotations

import threading
import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)

from cove import errors
from cove.store import Store
from cove.store import schema as t

pytestmark = pytest.mark.timeout(120)

NAMES = st.sampled_from(["a", "b", "c", "d"])  # few, so that names collide
DESCRIPTIONS = st.sampled_from(["", "one", "two"])
LABELS = st.none() | st.sampled_from([{}, {"k": "v"}, {"k": "w"}])
REASONS = st.sampled_from(["Started", "Stopped"])
MESSAGES = st.sampled_from(["m1", "m2"])

RAW = sa.text(
    "SELECT id, kind, name, parent_id, CAST(labels AS TEXT), CAST(spec AS TEXT), "
    "CAST(status AS TEXT), generation, revision, created_at, updated_at, deleting "
    "FROM resources WHERE id = :id"
)


def _raw(store: Store, rid: str) -> tuple[Any, ...]:
    with store.read() as conn:
        row = conn.execute(RAW, {"id": rid}).one()
    return tuple(row)


def make_machine(store: Store) -> type[RuleBasedStateMachine]:
    class StoreMachine(RuleBasedStateMachine):
        resources = Bundle("resources")

        def __init__(self) -> None:
            super().__init__()
            self.store = store
            with store.write() as tx:  # each example works in its own org
                self.org = tx.create("org", f"o{uuid.uuid4().hex[:12]}")
            self.head = store.head_revision()
            self.model: dict[str, dict[str, Any]] = {}  # id -> {parent, name, spec, gen}
            self.counts: dict[tuple[str, str, str], int] = {}

        # -- helpers -------------------------------------------------------------------

        def _wrote(self, revision: int) -> None:
            """A write happened: it took the next revision, above everything before."""
            assert revision > self.head, (revision, self.head)
            assert self.store.head_revision() == revision
            self.head = revision

        def _taken(self, parent: str, name: str) -> bool:
            return any(m["parent"] == parent and m["name"] == name for m in self.model.values())

        def _create(self, kind: str, parent: str, name: str) -> Any:
            spec = {"description": ""}
            if self._taken(parent, name):
                with pytest.raises(errors.Conflict) as exc, self.store.write() as tx:
                    tx.create(kind, name, parent=parent, spec=spec)
                assert exc.value.code == "already_exists"
                assert self.store.head_revision() == self.head
                return multiple()
            with self.store.write() as tx:
                res = tx.create(kind, name, parent=parent, spec=spec)
            self._wrote(res["metadata"]["revision"])
            assert res["metadata"]["generation"] == 1
            self.model[res["id"]] = {"parent": parent, "name": name, "spec": spec, "gen": 1}
            return res["id"]

        # -- rules ---------------------------------------------------------------------

        @rule(target=resources, name=NAMES)
        def create_project(self, name: str) -> Any:
            return self._create("project", self.org["id"], name)

        @rule(target=resources, parent=resources, name=NAMES)
        def create_app(self, parent: str, name: str) -> Any:
            if self.model[parent]["parent"] != self.org["id"]:
                return multiple()  # apps go in projects only
            return self._create("app", parent, name)

        @rule(
            rid=resources,
            description=DESCRIPTIONS,
            labels=LABELS,
            how=st.sampled_from(["current", "blind", "stale", "stale-old"]),
        )
        def update(
            self, rid: str, description: str, labels: dict[str, str] | None, how: str
        ) -> None:
            cur = self.store.get(rid)
            rev = cur["metadata"]["revision"]
            spec = {"description": description}
            if how.startswith("stale"):
                expected = rev - 1 if how == "stale" else 1
                before = _raw(self.store, rid)
                with pytest.raises(errors.Conflict) as exc, self.store.write() as tx:
                    tx.update(rid, spec=spec, labels=labels, expected_revision=expected)
                assert exc.value.code == "stale_revision"
                assert exc.value.extra["current_revision"] == rev
                assert _raw(self.store, rid) == before  # byte-identical
                assert self.store.head_revision() == self.head
                return
            expected = rev if how == "current" else None
            with self.store.write() as tx:
                new = tx.update(rid, spec=spec, labels=labels, expected_revision=expected)
            m = self.model[rid]
            spec_changed = spec != m["spec"]
            changed = spec_changed or (labels is not None and labels != cur["labels"])
            if spec_changed:
                m["gen"] += 1
                m["spec"] = spec
            assert new["metadata"]["generation"] == m["gen"]
            if changed:
                self._wrote(new["metadata"]["revision"])
            else:  # nothing changed: nothing written
                assert new["metadata"]["revision"] == rev
                assert self.store.head_revision() == self.head

        @rule(rid=resources, state=st.sampled_from(["a", "b"]))
        def write_status(self, rid: str, state: str) -> None:
            cur = self.store.get(rid)
            with self.store.write() as tx:
                new = tx.update(rid, status=dict(cur["status"], state=state))
            assert new["metadata"]["generation"] == self.model[rid]["gen"]
            if cur["status"].get("state") != state:
                self._wrote(new["metadata"]["revision"])
            else:
                assert new["metadata"]["revision"] == cur["metadata"]["revision"]

        @rule(rid=resources, reason=REASONS, message=MESSAGES)
        def event(self, rid: str, reason: str, message: str) -> None:
            obj = self.store.get(rid)
            with self.store.write() as tx:
                ev = tx.event(obj, "Normal", reason, message)
            self._wrote(ev["metadata"]["revision"])
            key = (rid, reason, message)
            self.counts[key] = self.counts.get(key, 0) + 1
            assert ev["status"]["count"] == self.counts[key]
            assert self.store.get(rid) == obj  # an event does not touch its object

        @rule(rid=resources, name=NAMES)
        def several_writes_in_one_transaction(self, rid: str, name: str) -> None:
            if self.model[rid]["parent"] != self.org["id"] or self._taken(rid, name):
                return
            with self.store.write() as tx:
                app = tx.create("app", name, parent=rid, spec={"description": ""})
                ev = tx.event(app, "Normal", "Created", "in one go")
                upd = tx.update(app["id"], spec={"description": "one"})
            revs = [
                app["metadata"]["revision"],
                ev["metadata"]["revision"],
                upd["metadata"]["revision"],
            ]
            assert revs == sorted(set(revs)), revs
            assert revs[0] > self.head
            self._wrote(revs[-1])
            assert upd["metadata"]["generation"] == 2
            self.model[app["id"]] = {
                "parent": rid,
                "name": name,
                "spec": {"description": "one"},
                "gen": 2,
            }

        @rule(rid=consumes(resources))
        def forget(self, rid: str) -> None:
            """Delete a row for good (what the GC does last)."""
            if any(m["parent"] == rid for m in self.model.values()):
                return
            with self.store.write() as tx:
                tx.delete(rid)
                assert tx.last_revision > self.head
            self._wrote(self.store.head_revision())
            del self.model[rid]

        # -- invariants ----------------------------------------------------------------

        @invariant()
        def revisions_are_unique_and_below_the_head(self) -> None:
            with self.store.read() as conn:
                revs = [r[0] for r in conn.execute(sa.select(t.resources.c.revision))]
                revs += [r[0] for r in conn.execute(sa.select(t.events.c.revision))]
            assert len(revs) == len(set(revs)), "two rows share a revision"
            assert max(revs) <= self.store.head_revision() == self.head

        @invariant()
        def generations_match_the_model(self) -> None:
            for rid, m in self.model.items():
                res = self.store.get(rid)
                assert res["metadata"]["generation"] == m["gen"]
                assert res["spec"] == m["spec"]

    return StoreMachine


SETTINGS = settings(
    max_examples=30,
    stateful_step_count=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def test_revision_and_cas_properties(store: Store) -> None:
    # PostgreSQL round trips cost more: fewer examples there keep the file fast
    examples = 30 if store.dialect == "sqlite" else 12
    run_state_machine_as_test(
        make_machine(store), settings=settings(SETTINGS, max_examples=examples)
    )


@pytest.mark.timeout(60)
def test_concurrent_writers_never_hide_a_write_from_a_watcher(store: Store) -> None:
    """Writers on several threads; a watcher resuming from the last revision it saw
    (as controllers and event streams do) ends up having seen every row's last write."""
    with store.write() as tx:
        org = tx.create("org", "conc")
    writers, per_writer = 4, 25
    written: dict[str, int] = {}
    lock = threading.Lock()
    done = threading.Event()
    seen: dict[str, int] = {}
    failures: list[BaseException] = []

    def write(w: int) -> None:
        try:
            mine: list[int] = []
            for i in range(per_writer):
                with store.write() as tx:
                    p = tx.create("project", f"w{w}-{i}", parent=org["id"])
                    p = tx.update(p["id"], spec={"n": i})
                mine.append(p["metadata"]["revision"])
                with lock:
                    written[p["id"]] = p["metadata"]["revision"]
            assert mine == sorted(mine)
        except BaseException as exc:  # pragma: no cover - reported below
            failures.append(exc)

    def watch() -> None:
        cursor = 0
        while True:
            finished = done.is_set()
            for ch in store.changes_since(cursor):
                assert ch["revision"] > cursor
                cursor = ch["revision"]
                seen[ch["id"]] = max(seen.get(ch["id"], 0), ch["revision"])
            if finished:
                return

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    done.set()
    watcher.join(30)
    assert not failures, failures
    assert len(written) == writers * per_writer
    assert len(set(written.values())) == len(written)
    for rid, rev in written.items():
        assert seen.get(rid) == rev, f"the watcher missed {rid}@{rev}"
