"""Conditions: last_transition moves only when the status value changes."""

from __future__ import annotations

from typing import Any

import pytest

from cove.model import resource
from cove.model.resource import get_condition, is_caught_up, set_condition


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    tick = [0]

    def fake_now() -> str:
        tick[0] += 1
        return f"2030-01-01T00:00:{tick[0]:02d}.000Z"

    monkeypatch.setattr(resource, "now_iso", fake_now)
    return tick


def test_new_condition_is_added(clock: list[int]) -> None:
    status: dict[str, Any] = {}
    assert set_condition(status, "Ready", "false", "Starting", "booting")
    c = get_condition(status, "Ready")
    assert c == {
        "type": "Ready",
        "status": "false",
        "reason": "Starting",
        "message": "booting",
        "last_transition": "2030-01-01T00:00:01.000Z",
    }


def test_same_condition_is_no_change(clock: list[int]) -> None:
    status: dict[str, Any] = {}
    set_condition(status, "Ready", "true", "Up", "fine")
    before = [dict(c) for c in status["conditions"]]
    assert not set_condition(status, "Ready", "true", "Up", "fine")
    assert status["conditions"] == before


def test_reason_or_message_change_keeps_last_transition(clock: list[int]) -> None:
    status: dict[str, Any] = {}
    set_condition(status, "Ready", "false", "Pulling", "image 1/3")
    first = get_condition(status, "Ready")
    assert first is not None
    assert set_condition(status, "Ready", "false", "Pulling", "image 2/3")
    assert set_condition(status, "Ready", "false", "Starting", "")
    c = get_condition(status, "Ready")
    assert c is not None
    assert (c["reason"], c["message"]) == ("Starting", "")
    assert c["last_transition"] == first["last_transition"]


def test_status_change_moves_last_transition(clock: list[int]) -> None:
    status: dict[str, Any] = {}
    set_condition(status, "Ready", "false", "Starting")
    t0 = get_condition(status, "Ready")["last_transition"]  # type: ignore[index]
    assert set_condition(status, "Ready", "true", "Up")
    t1 = get_condition(status, "Ready")["last_transition"]  # type: ignore[index]
    assert t1 > t0
    set_condition(status, "Ready", "true", "StillUp")
    assert get_condition(status, "Ready")["last_transition"] == t1  # type: ignore[index]


def test_conditions_of_other_types_are_untouched(clock: list[int]) -> None:
    status: dict[str, Any] = {}
    set_condition(status, "Ready", "true", "Up")
    set_condition(status, "Schedulable", "false", "Cordoned")
    ready = dict(get_condition(status, "Ready") or {})
    set_condition(status, "Schedulable", "true", "Uncordoned")
    assert get_condition(status, "Ready") == ready
    assert [c["type"] for c in status["conditions"]] == ["Ready", "Schedulable"]


def test_set_condition_does_not_mutate_shared_lists(clock: list[int]) -> None:
    old: dict[str, Any] = {}
    set_condition(old, "Ready", "false", "Starting")
    new = dict(old)  # a shallow copy, as controllers make before changing status
    set_condition(new, "Ready", "true", "Up")
    assert get_condition(old, "Ready")["status"] == "false"  # type: ignore[index]
    assert get_condition(new, "Ready")["status"] == "true"  # type: ignore[index]


def test_is_caught_up() -> None:
    assert is_caught_up({"metadata": {"generation": 3}, "status": {"observed_generation": 3}})
    assert not is_caught_up({"metadata": {"generation": 4}, "status": {"observed_generation": 3}})
    assert not is_caught_up({"metadata": {"generation": 1}, "status": {}})
