"""Table output prints server and user text literally: rich would otherwise read a bracketed
word (an IPv6 address such as ``[fd12::1]``) as markup and silently drop it."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from cove.cli import output

EP = {
    "kind": "endpoint",
    "id": "ep_1",
    "name": "web",
    "parent": {"kind": "environment", "id": "env_1", "name": "prod"},
    "labels": {},
    "spec": {"protocol": "tcp", "ports": [{"port": 80, "workload": "web", "target_port": 8080}]},
    "status": {
        "addresses": {"ipv6": "fdcf::1", "ipv4": None},
        "note": "[bold]not a style[/bold]",
        "conditions": [
            {
                "type": "Ready",
                "status": "false",
                "reason": "NoReadyInstances",
                "message": "listening on [fdcf::1]; no instance is Ready",
                "last_transition": "2026-11-28T10:00:00Z",
            }
        ],
        "observed_generation": 1,
    },
    "metadata": {
        "generation": 1,
        "revision": 5,
        "created_at": "2026-11-28T10:00:00Z",
        "updated_at": "2026-11-28T10:00:00Z",
    },
}


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    buf = io.StringIO()
    monkeypatch.setattr(output, "out", Console(file=buf, width=200, highlight=False))
    return buf


def test_describe_keeps_bracketed_text(captured: io.StringIO) -> None:
    output.describe(EP, output.Format.table)
    text = captured.getvalue()
    assert "listening on [fdcf::1]; no instance is Ready" in text
    assert "[bold]not a style[/bold]" in text
