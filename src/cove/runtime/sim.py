"""The ``sim`` runtime driver: no processes, only lifecycles (ARCHITECTURE §4).

It exists to test the control plane at scale: an agent with ``--driver sim`` registers,
takes placements and reports instances through the real API, but nothing runs on the node.
The driver plays each instance's lifecycle:

    create -> created;  start -> running after ``start_delay`` seconds (``status`` says
    ``created`` until then);  stop -> exited, code 0;  destroy -> gone.

``logs`` returns two synthetic lines per run; ``exec`` is refused with a clear error. The
state of every instance is kept in one small JSON file per instance under
``state_dir/instances/`` (so ``adopt`` after an agent restart finds the instances that were
running), and nothing needs root: no cgroups, namespaces, bridges or image layers.
``simulated`` tells the agent to skip what only a real instance needs (pulling the image,
mounting volumes, probing health checks, which a simulated instance always passes).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from cove.errors import Conflict, NotFound, UserError
from cove.runtime._util import now_ts
from cove.runtime.base import ExecProcess, InstanceSpec, InstanceStatus, LogLine
from cove.runtime.supervised import HOSTNAME_RE, ID_RE

DETAIL = "simulated instances (sim): lifecycles only, nothing runs - for control-plane scale tests"


class SimDriver:
    """Plays instance lifecycles without running anything."""

    name = "sim"
    simulated = True
    accel_name: str | None = None

    def __init__(self, state_dir: Path, *, start_delay: float = 0.05) -> None:
        if start_delay < 0:
            raise UserError(f"start_delay must be >= 0, not {start_delay}")
        self.state_dir = Path(state_dir)
        self.instances_dir = self.state_dir / "instances"
        self.start_delay = start_delay
        self._docs: dict[str, dict[str, Any]] = {}
        self._ended: dict[str, asyncio.Event] = {}  # per instance: its current run ended

    # -- state -------------------------------------------------------------------------------

    def _path(self, instance_id: str) -> Path:
        if not ID_RE.fullmatch(instance_id):
            raise UserError(
                f"bad instance id {instance_id!r}",
                hint="1-63 characters: letters, digits, '_', '.', '-'",
            )
        return self.instances_dir / f"{instance_id}.json"

    def _load(self, instance_id: str) -> dict[str, Any]:
        doc = self._docs.get(instance_id)
        if doc is not None:
            return doc
        path = self._path(instance_id)
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            raise NotFound(f"no sim instance {instance_id!r} on this node") from None
        except (OSError, ValueError) as exc:
            raise NotFound(f"sim instance {instance_id!r} has unreadable state: {exc}") from exc
        assert isinstance(doc, dict)
        self._docs[instance_id] = doc
        return doc

    def _save(self, instance_id: str, doc: dict[str, Any]) -> None:
        self._docs[instance_id] = doc
        path = self._path(instance_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(doc, sort_keys=True))
        os.replace(tmp, path)

    def _ended_event(self, instance_id: str) -> asyncio.Event:
        return self._ended.setdefault(instance_id, asyncio.Event())

    # -- lifecycle ---------------------------------------------------------------------------

    async def create(self, spec: InstanceSpec) -> None:
        self._path(spec.instance_id)
        if not HOSTNAME_RE.fullmatch(spec.hostname):
            raise UserError(f"bad hostname {spec.hostname!r}", hint="a DNS label, 1-63 chars")
        if not spec.argv or not spec.argv[0]:
            raise UserError("empty command", hint="the image needs an entrypoint or cmd")
        spec_doc = spec.to_json()
        try:
            doc = self._load(spec.instance_id)
        except NotFound:
            doc = None
        if doc is not None:
            if doc["spec"] != spec_doc:
                raise Conflict(
                    f"instance {spec.instance_id!r} exists with a different spec",
                    hint="destroy it first, or use a new instance id",
                )
            return
        self._save(
            spec.instance_id,
            {"spec": spec_doc, "status": InstanceStatus(state="created").to_json(), "runs": 0},
        )

    async def start(self, instance_id: str) -> None:
        doc = self._load(instance_id)
        st = InstanceStatus.from_json(doc["status"])
        if st.state == "running" or doc.get("running_at") is not None:
            return  # already running, or about to be
        doc = dict(doc, running_at=time.time() + self.start_delay, runs=int(doc["runs"]) + 1)
        self._save(instance_id, doc)
        self._ended_event(instance_id).clear()

    async def status(self, instance_id: str) -> InstanceStatus:
        doc = self._load(instance_id)
        due = doc.get("running_at")
        if due is not None and time.time() >= float(due):
            st = InstanceStatus(state="running", started_at=now_ts(), message="simulated")
            doc = dict(doc, status=st.to_json(), running_at=None)
            self._save(instance_id, doc)
        return InstanceStatus.from_json(doc["status"])

    async def stop(
        self, instance_id: str, sig: int = signal.SIGTERM, timeout: float = 10.0
    ) -> InstanceStatus:
        st = await self.status(instance_id)
        doc = self._load(instance_id)
        if st.state != "running" and doc.get("running_at") is None:
            return st
        ended = InstanceStatus(
            state="exited",
            started_at=st.started_at,
            finished_at=now_ts(),
            exit_code=0,
            reason="exited",
            message=f"simulated stop (signal {int(sig)})",
        )
        self._save(instance_id, dict(doc, status=ended.to_json(), running_at=None))
        self._ended_event(instance_id).set()
        return ended

    async def destroy(self, instance_id: str) -> None:
        path = self._path(instance_id)
        self._docs.pop(instance_id, None)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        ended = self._ended.pop(instance_id, None)
        if ended is not None:
            ended.set()

    # -- logs, exec, adopt -------------------------------------------------------------------

    async def logs(
        self, instance_id: str, *, after_seq: int = 0, follow: bool = False
    ) -> AsyncIterator[LogLine]:
        doc = self._load(instance_id)
        runs = max(1, int(doc["runs"]))
        argv = " ".join(doc["spec"]["argv"])
        for run in range(1, runs + 1):
            ts = now_ts()
            lines = (
                f"[sim] run {run} of {doc['spec']['hostname']}: nothing runs, the sim driver "
                "plays the lifecycle",
                f"[sim] command: {argv}",
            )
            for i, text in enumerate(lines):
                seq = (run - 1) * len(lines) + i + 1
                if seq > after_seq:
                    yield LogLine(ts=ts, stream="stdout", line=text, seq=seq)
        if follow:
            st = await self.status(instance_id)
            if st.state == "running" or self._load(instance_id).get("running_at") is not None:
                await self._ended_event(instance_id).wait()

    async def exec(
        self,
        instance_id: str,
        argv: list[str],
        *,
        tty: bool,
        env: dict[str, str] | None = None,
        rows: int = 24,
        cols: int = 80,
    ) -> ExecProcess:
        self._load(instance_id)
        raise UserError(
            f"can't exec in {instance_id}: it runs on the sim driver, which runs no processes",
            hint="sim nodes exist for control-plane scale tests; use a microvm or sandbox "
            "node to exec into an instance",
            code="exec_unsupported",
        )

    async def adopt(self) -> list[str]:
        """Instances this driver's state says are running (or starting)."""
        found: list[str] = []
        if not self.instances_dir.is_dir():
            return found
        for path in sorted(self.instances_dir.glob("*.json")):
            iid = path.name[: -len(".json")]
            if not ID_RE.fullmatch(iid):
                continue
            try:
                doc = self._load(iid)
            except NotFound:
                continue
            if doc["status"].get("state") == "running" or doc.get("running_at") is not None:
                found.append(iid)
        return found
