"""IDs: prefixed, sortable by creation time, unique."""

from __future__ import annotations

from cove.ids import looks_like_id, new_id, split_id
from cove.model import KINDS, kind_by_prefix


def test_every_kind_prefix_makes_a_recognisable_id() -> None:
    for kind in KINDS:
        rid = new_id(kind.prefix)
        assert rid.startswith(kind.prefix + "_")
        assert looks_like_id(rid), rid
        assert split_id(rid) == (kind.prefix, rid.split("_", 1)[1])
        assert kind_by_prefix(kind.prefix) is kind


def test_ids_sort_by_creation_time() -> None:
    base = 1_700_000_000.0
    ids = [new_id("ins", now=base + i * 0.001) for i in range(200)]
    ids += [new_id("ins", now=base + 86400 * 365 * 30)]  # decades later still sorts last
    assert sorted(ids) == ids


def test_ids_are_unique_within_one_millisecond() -> None:
    ids = {new_id("evt", now=1_700_000_000.0) for _ in range(10_000)}
    assert len(ids) == 10_000


def test_names_and_junk_are_not_ids() -> None:
    for value in (
        "web",
        "ins",
        "ins_",
        "ins_short",
        "INS_" + "0" * 26,
        "toolong_" + "0" * 26,
        "ins_" + "0" * 25 + "u",
        "ins_" + "0" * 27,
        "../ins_" + "0" * 26,
    ):
        assert not looks_like_id(value), value
        assert split_id(value) is None
