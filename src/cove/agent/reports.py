"""What a node tells the API about its instances (their status, their events), sent for the
whole node at once.

Each instance's worker hands its report here and goes on; the reporter sends what has
gathered every ``every`` seconds in one ``PUT /v1/nodes/{id}/reports``. An instance's newer
status replaces the one not yet sent (the API keeps the current state; the events keep the
history), so an instance that goes from preparing to Ready within one interval costs the
store one write, not four, and a node starting fifty instances sends one request, not two
hundred. A report that could not be sent stays and goes with the next batch: nothing is
lost while the API is away, and a status is never sent again once it was accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from cove import errors
from cove.client import AsyncClient

log = logging.getLogger("cove.agent.reports")

EVERY = 0.1  # seconds a report waits for others to go with it
BATCH = 500  # instances' statuses (and events) per request, the API's limit
PENDING_EVENTS = 5000  # events kept while the API is away; the oldest go first
REFUSED = (400, 413, 422)  # the API refuses what was sent: sending it again cannot help


class Reporter:
    def __init__(self, client: AsyncClient, node_id: str, *, every: float = EVERY) -> None:
        self.client = client
        self.node_id = node_id
        self.every = every
        self.statuses: dict[str, dict[str, Any]] = {}  # instance -> newest status, not sent
        self.events: list[dict[str, Any]] = []
        self.sent: dict[str, dict[str, Any]] = {}  # instance -> the last status accepted
        self.dropped = 0  # events dropped while the API was away
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    def status(self, instance_id: str, body: dict[str, Any]) -> None:
        """Report *instance_id*'s status (the whole document: it replaces the last one)."""
        if body == self.sent.get(instance_id) and instance_id not in self.statuses:
            return  # the API has this one
        self.statuses[instance_id] = body
        self._pending()

    def event(self, instance_id: str, etype: str, reason: str, message: str) -> None:
        self.events.append(
            {"instance": instance_id, "type": etype, "reason": reason, "message": message}
        )
        if len(self.events) > PENDING_EVENTS:
            del self.events[: len(self.events) - PENDING_EVENTS]
            self.dropped += 1
        self._pending()

    def _pending(self) -> None:
        self._idle.clear()
        self._wake.set()

    async def flushed(self, timeout: float) -> bool:
        """Wait until everything reported so far was sent (or *timeout* seconds)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)
        return self._idle.is_set()

    async def run(self) -> None:
        delay = 0.5
        while True:
            await self._wake.wait()
            await asyncio.sleep(self.every)  # let the others that come meanwhile go with it
            self._wake.clear()
            try:
                await self.send()
                delay = 0.5
            except errors.CoveError as exc:
                log.warning("instance reports not sent (%s); again in %.1fs", exc.detail, delay)
                self._wake.set()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def send(self) -> None:
        """Send what is pending, in batches of ``BATCH``; raise ``CoveError`` when the API
        can't be reached (what was not accepted stays pending)."""
        while self.statuses or self.events:
            ids = list(self.statuses)[:BATCH]
            statuses = {i: self.statuses[i] for i in ids}
            events = self.events[:BATCH]
            try:
                res = await self.client.put(
                    f"/v1/nodes/{self.node_id}/reports", {"statuses": statuses, "events": events}
                )
            except errors.CoveError as exc:
                if exc.status not in REFUSED:
                    raise
                # the same batch would be refused again, and hold up every report after it
                log.error(
                    "the API refused %d instance status(es) and %d event(s), dropped: %s",
                    len(statuses), len(events), exc.detail,
                )  # fmt: skip
                res = {"missing": list(statuses)}
            for i, body in statuses.items():
                if self.statuses.get(i) is body:  # not replaced while this was on its way
                    del self.statuses[i]
                if i in (res.get("missing") or ()) or body.get("state") == "destroyed":
                    self.sent.pop(i, None)  # gone from the node: nothing more to say of it
                else:
                    self.sent[i] = body
            del self.events[: len(events)]
        if self.dropped:
            log.warning("%d instance event(s) dropped while the API was away", self.dropped)
            self.dropped = 0
        if not self.statuses and not self.events:
            self._idle.set()
