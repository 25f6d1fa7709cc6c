"""``api.batch.WriteBatcher`` over ``Store.write_each`` (both backends): writes that many
requests park at once are committed together, each request gets its own result, one that
fails leaves nothing of itself while the others in its transaction still land, and no
request holds a thread while it waits."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from cove import errors
from cove.api.batch import WriteBatcher
from cove.store import Store, Tx

pytestmark = pytest.mark.timeout(120)


def _orgs(store: Store, n: int) -> list[dict[str, Any]]:
    with store.write() as tx:
        return [tx.create("org", f"org{i}", spec={}) for i in range(n)]


def test_many_requests_share_few_transactions_and_each_gets_its_result(store: Store) -> None:
    orgs = _orgs(store, 200)
    commits: list[int] = []
    store.on_commit(commits.append)

    async def run() -> tuple[list[dict[str, Any]], int]:
        batcher = WriteBatcher(store, batch=64)

        def label(i: int) -> Any:
            return lambda tx: tx.update(orgs[i]["id"], labels={"n": str(i)})

        threads_before = threading.active_count()
        out = await asyncio.gather(*(batcher.write(label(i)) for i in range(200)))
        # one writer thread at most, not one per request
        return out, threading.active_count() - threads_before

    out, extra_threads = asyncio.run(run())
    assert [o["labels"] for o in out] == [{"n": str(i)} for i in range(200)]
    for i, org in enumerate(orgs):
        assert store.get(org["id"])["labels"] == {"n": str(i)}
    assert len(commits) <= 8, f"{len(commits)} transactions for 200 writes"
    assert extra_threads <= 1


def test_a_failing_write_fails_alone_and_leaves_nothing(store: Store) -> None:
    orgs = _orgs(store, 3)

    def bad(tx: Tx) -> None:
        tx.update(orgs[1]["id"], labels={"half": "written"})
        raise errors.NotFound("no such thing")

    async def run() -> list[Any]:
        batcher = WriteBatcher(store)
        return await asyncio.gather(
            batcher.write(lambda tx: tx.update(orgs[0]["id"], labels={"ok": "1"})),
            batcher.write(bad),
            batcher.write(lambda tx: tx.update(orgs[2]["id"], labels={"ok": "1"})),
            return_exceptions=True,
        )

    results = asyncio.run(run())
    assert isinstance(results[1], errors.NotFound)
    assert results[0]["labels"] == {"ok": "1"} and results[2]["labels"] == {"ok": "1"}
    assert store.get(orgs[1]["id"])["labels"] == {}  # its savepoint was rolled back
    assert store.get(orgs[0]["id"])["labels"] == {"ok": "1"}


def test_when_the_transaction_fails_every_write_in_it_fails(store: Store) -> None:
    orgs = _orgs(store, 2)
    # a view fenced on a setting that does not hold: its transaction refuses to begin
    fenced = store.fenced("bench.fence", "someone-else")
    results = fenced.write_each(
        [lambda tx, o=o: tx.update(o["id"], labels={"lost": "yes"}) for o in orgs]
    )
    assert [type(err) for _, err in results] == [errors.Transient, errors.Transient]
    assert all(store.get(o["id"])["labels"] == {} for o in orgs)
