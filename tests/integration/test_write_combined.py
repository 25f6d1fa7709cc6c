"""``Store.write_combined`` (both backends): writes submitted by many threads at once are
committed together, each caller gets its own result, and one that fails leaves nothing of
itself while the others in its transaction still land."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from cove import errors
from cove.store import Store, Tx

pytestmark = pytest.mark.timeout(120)


def _orgs(store: Store, n: int) -> list[dict[str, Any]]:
    with store.write() as tx:
        return [tx.create("org", f"org{i}", spec={}) for i in range(n)]


def test_many_writers_share_few_transactions_and_each_gets_its_result(store: Store) -> None:
    orgs = _orgs(store, 40)
    commits: list[int] = []
    store.on_commit(commits.append)
    start = threading.Barrier(40)

    def label(i: int) -> dict[str, Any]:
        start.wait()

        def write(tx: Tx) -> dict[str, Any]:
            return tx.update(orgs[i]["id"], labels={"n": str(i)})

        return store.write_combined(write)

    with ThreadPoolExecutor(40) as pool:
        out = list(pool.map(label, range(40)))
    assert [o["labels"] for o in out] == [{"n": str(i)} for i in range(40)]
    for i, org in enumerate(orgs):
        assert store.get(org["id"])["labels"] == {"n": str(i)}
    assert len(commits) < 40, "the writes were combined into fewer transactions"


def test_a_failing_write_fails_alone_and_leaves_nothing(store: Store) -> None:
    orgs = _orgs(store, 3)
    gate = threading.Event()
    results: dict[int, Any] = {}

    def hold(tx: Tx) -> None:  # keeps the first batch busy while the others queue
        gate.wait(5)

    def good(i: int) -> Any:
        return store.write_combined(lambda tx: tx.update(orgs[i]["id"], labels={"ok": "1"}))

    def bad(tx: Tx) -> None:
        tx.update(orgs[1]["id"], labels={"half": "written"})
        raise errors.NotFound("no such thing")

    first = threading.Thread(target=store.write_combined, args=(hold,))
    first.start()
    threads = []
    for i, fn in (
        (0, lambda: good(0)),
        (1, lambda: store.write_combined(bad)),
        (2, lambda: good(2)),
    ):

        def run(i: int = i, fn: Any = fn) -> None:
            try:
                results[i] = fn()
            except errors.CoveError as exc:
                results[i] = exc

        threads.append(threading.Thread(target=run))
    for th in threads:
        th.start()
    gate.set()
    first.join(10)
    for th in threads:
        th.join(10)
    assert isinstance(results[1], errors.NotFound)
    assert results[0]["labels"] == {"ok": "1"} and results[2]["labels"] == {"ok": "1"}
    assert store.get(orgs[1]["id"])["labels"] == {}  # its savepoint was rolled back
    assert store.get(orgs[0]["id"])["labels"] == {"ok": "1"}
