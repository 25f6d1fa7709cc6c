"""``cove agent``: the node agent. It joins the cluster through the public API (node
credentials), heartbeats, long-polls the instances placed on its node and makes the runtime
match them: pull by digest, create, start, health checks, restarts with backoff, logs
shipped to the API, stop and destroy. It is just another API client.

Instances run under per-instance supervisors (``cove.runtime``) that outlive the agent; a
restarted agent adopts them without restarting them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import shutil
import signal
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cove import __version__, errors
from cove.agent import execs
from cove.agent.edge import EdgeRunner
from cove.agent.instance import InstanceWorker, NodeContext
from cove.agent.network import AddressPool
from cove.agent.reports import Reporter
from cove.agent.volumes import Volumes
from cove.client import AsyncClient
from cove.client.http import unless_reconnected

if TYPE_CHECKING:
    from cove.runtime.microvm.driver import MicroVMDriver

log = logging.getLogger("cove.agent")
HEARTBEAT_SECONDS = 5.0


def capacity() -> dict[str, float]:
    mem_mb = 0.0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_mb = int(line.split()[1]) / 1024
                    break
    except OSError:
        pass
    return {"vcpu": float(os.cpu_count() or 1), "memory_mb": round(mem_mb)}


def default_name() -> str:
    raw = socket.gethostname().lower()
    name = re.sub(r"[^a-z0-9-]+", "-", raw).strip("-")[:40] or "node"
    if not name[0].isalpha():
        name = "n-" + name[:37]
    return name.rstrip("-")


def _traversable(path: Path) -> bool:
    return all(p.stat().st_mode & 0o001 for p in path.resolve().parents if p.exists())


def default_state_dir(home: Path, driver: str = "auto") -> Path:
    """Sandboxes run as unprivileged host users that must reach their rootfs, so the state
    dir needs o+x on every parent; under a private home it moves to /var/lib/cove. The sim
    driver runs nothing, so it stays in the home."""
    wanted = home / "agent"
    if driver == "sim" or _traversable(wanted):
        return wanted
    digest = hashlib.sha256(str(home.resolve()).encode()).hexdigest()[:10]
    return Path("/var/lib/cove") / f"agent-{digest}"


def _sandbox_missing() -> list[str]:
    missing = []
    if shutil.which("bwrap") is None:
        missing.append("bubblewrap (bwrap) is not installed")
    if not Path("/sys/fs/cgroup/memory").is_dir():
        missing.append("the cgroup v1 memory controller is not mounted")
    if os.geteuid() != 0:
        missing.append("the agent is not running as root")
    return missing


def _microvm_missing() -> list[str]:
    missing = []
    for tool, pkg in (("qemu-system-x86_64", "qemu-system-x86"), ("qemu-img", "qemu-utils")):
        if shutil.which(tool) is None:
            missing.append(f"{tool} is not installed ({pkg})")
    if not list(Path("/boot").glob("vmlinuz-*")):
        missing.append("no host kernel in /boot (linux-image-amd64)")
    if not Path("/sys/fs/cgroup/memory").is_dir():
        missing.append("the cgroup v1 memory controller is not mounted")
    if os.geteuid() != 0:
        missing.append("the agent is not running as root")
    return missing


SANDBOX_DETAIL = (
    "bubblewrap sandboxes (namespaces, shifted ids, no capabilities, seccomp, "
    "cgroup limits) - weaker isolation than a microVM"
)


def probe_driver(requested: str, state_dir: Path) -> tuple[Any | None, str, str]:
    """(driver, name, detail).

    ``microvm`` runs microVMs, under KVM when the host's KVM can run a guest (probed), under
    TCG emulation otherwise - and says so. ``auto`` picks microvm when KVM works, else the
    sandbox (weaker isolation, said plainly in the detail), else nothing."""
    if requested == "none":
        return None, "none", "runtime disabled (--driver none)"
    if requested == "sim":
        from cove.runtime.sim import DETAIL, SimDriver

        return SimDriver(state_dir / "sim"), "sim", DETAIL
    if requested not in ("auto", "sandbox", "microvm"):
        raise errors.UserError(
            f"unknown driver {requested!r}", hint="use microvm, sandbox, auto, sim or none"
        )
    notes: list[str] = []
    drv: MicroVMDriver | None = None
    if requested in ("auto", "microvm"):
        missing = _microvm_missing()
        if missing and requested == "microvm":
            raise errors.UserError(
                "the microvm driver can't run here: " + "; ".join(missing),
                hint="run `make setup` (installs QEMU and a kernel) and run the agent as root",
            )
        if not missing:
            from cove.runtime.microvm.driver import MicroVMDriver

            try:
                drv = MicroVMDriver(state_dir / "microvm")
            except errors.CoveError as exc:
                if requested == "microvm":
                    raise
                drv = None
                notes.append(f"microVMs not available: {exc.detail}")
        if not missing and drv is not None:
            if drv.accel.name == "kvm" or requested == "microvm":
                speed = "" if drv.accel.name == "kvm" else " - emulated, boots take seconds"
                return drv, "microvm", f"microVMs under {drv.accel.detail}{speed}"
            notes.append(f"microVMs not chosen: {drv.accel.detail}")
        elif missing:
            notes.append("microVMs not available: " + "; ".join(missing))
    missing = _sandbox_missing()
    if missing:
        if requested == "sandbox":
            raise errors.UserError(
                "the sandbox driver can't run here: " + "; ".join(missing),
                hint="install bubblewrap and run the agent as root on a cgroup v1 host",
            )
        return None, "none", "no runtime: " + "; ".join([*missing, *notes])
    from cove.runtime import SandboxDriver

    detail = SANDBOX_DETAIL + "".join(f"; {n}" for n in notes)
    return SandboxDriver(state_dir / "runtime"), "sandbox", detail


class Agent:
    def __init__(
        self,
        server: str,
        join_token: str,
        *,
        name: str | None = None,
        region: str = "local",
        state_dir: Path,
        driver: str = "auto",
        bridge: str = "cove0",
        pool4: str = "10.213.0.0/24",
        pool6: str = "fd00:c0e:0:1::/64",
        fixed_network: bool = False,
        address: str | None = None,
    ) -> None:
        self.server = server
        self.fixed_network = fixed_network
        self.address = address
        self.join_token = join_token
        self.name = name or default_name()
        self.region = region
        self.state_dir = state_dir
        self.requested_driver = driver
        self.bridge = bridge
        self.pool4, self.pool6 = pool4, pool6
        self.workers: dict[str, InstanceWorker] = {}
        self.stopping = asyncio.Event()
        self.reconnected = asyncio.Event()  # set when heartbeats get through again

    def _network_proposal(self, driver_name: str) -> dict[str, Any] | None:
        """The instance subnets this node proposes and its address for the other nodes
        (the sim driver has no network: its fixed pools are only reported)."""
        if driver_name == "sim":
            return None
        address = self.address if self.address is not None else node_address(self.server)
        return {
            "ipv4": self.pool4,
            "ipv6": self.pool6,
            "fixed": self.fixed_network,
            "address": address or None,
        }

    def _take_network(self, got: dict[str, Any] | None, adopted: bool) -> None:
        """Use the subnets the server gave this node (another node may have had ours)."""
        if not got or (got["ipv4"], got["ipv6"]) == (self.pool4, self.pool6):
            return
        log.warning(
            "instance subnet %s / %s belongs to another node: this node takes %s / %s",
            self.pool4,
            self.pool6,
            got["ipv4"],
            got["ipv6"],
        )
        if adopted:
            log.error(
                "instances adopted from before keep their old addresses; redeploy them "
                "(or start this agent with --pool4/--pool6 set to the old subnets)"
            )
        self.pool4, self.pool6 = str(got["ipv4"]), str(got["ipv6"])
        save_network(self.state_dir, (self.bridge, self.pool4, self.pool6))

    async def _register(
        self, driver_name: str, detail: str, accel: str | None
    ) -> dict[str, Any] | None:
        delay = 0.5
        client = AsyncClient(self.server)
        network = self._network_proposal(driver_name)
        if network is not None:
            log.info(
                "instance subnets %s / %s; other nodes reach this one at %s",
                self.pool4,
                self.pool6,
                network["address"] or "(no address: a one-host cluster)",
            )
        try:
            while not self.stopping.is_set():
                try:
                    res: dict[str, Any] = await client.post(
                        "/v1/nodes/register",
                        {
                            "name": self.name,
                            "join_token": self.join_token,
                            "region": self.region,
                            "capacity": capacity(),
                            "driver": driver_name,
                            "driver_detail": detail,
                            "accel": accel,
                            "version": __version__,
                            "network": network,
                        },
                    )
                    return res
                except errors.Unauthenticated as exc:
                    log.error("the server refused the join token: %s", exc.detail)
                    return None
                except errors.CoveError as exc:
                    if exc.code == "subnet_taken":  # the operator's --pool4/--pool6: fix by hand
                        log.error("can't join: %s (%s)", exc.detail, exc.hint)
                        return None
                    log.warning("can't register yet (%s); retrying in %.1fs", exc.detail, delay)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.stopping.wait(), delay)
                    delay = min(delay * 2, 10.0)
            return None
        finally:
            await client.aclose()

    async def run(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        driver, driver_name, detail = probe_driver(self.requested_driver, self.state_dir)
        if driver is None:
            log.warning("%s", detail)
        elif driver_name == "sandbox" and self.requested_driver == "auto":
            log.warning("runtime driver: sandbox - NOTE: weaker isolation (%s)", detail)
        else:
            log.info("runtime driver: %s (%s)", driver_name, detail)
        accel = getattr(driver, "accel_name", None)
        adopted: set[str] = set()
        if driver is not None:
            adopted = set(await driver.adopt())
            if adopted:
                log.info("adopted %d running instance(s): %s", len(adopted), sorted(adopted))
        reg = await self._register(driver_name, detail, accel)
        if reg is None:
            return
        node_id, token = str(reg["node"]["id"]), str(reg["token"])
        self._take_network(reg.get("network"), bool(adopted))
        log.info("node %s (%s) registered with %s", self.name, node_id, self.server)
        client = AsyncClient(self.server, token, timeout=90.0)
        ctx = NodeContext(
            client=client,
            node_id=node_id,
            driver=driver,
            driver_name=driver_name,
            state_dir=self.state_dir,
            pool=AddressPool(self.state_dir / "net", self.bridge, self.pool4, self.pool6),
            volumes=Volumes(self.state_dir / "volumes"),
            reports=Reporter(client, node_id),
            edge=EdgeRunner(client, node_id),
        )
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._heartbeat(client, node_id, ctx.edge))
                if driver is not None:
                    tg.create_task(execs.channel(client.urls, token, node_id, driver))
                tg.create_task(self._assignments(ctx, adopted, tg))
                tg.create_task(ctx.edge.run())
                tg.create_task(ctx.reports.run())
                await self.stopping.wait()
                raise _Stop
        except* _Stop:
            pass
        finally:
            for w in self.workers.values():
                w.cancel()
            with contextlib.suppress(errors.CoveError, TimeoutError):  # the last reports
                await asyncio.wait_for(ctx.reports.send(), 5.0)
            await client.aclose()
            log.info("agent stopped (instances keep running under their supervisors)")

    async def _heartbeat(self, client: AsyncClient, node_id: str, edge: EdgeRunner) -> None:
        failing = False
        while True:
            try:
                await client.request(
                    "POST",
                    f"/v1/nodes/{node_id}/heartbeat",
                    json_body={"capacity": capacity()},
                    timeout=2 * HEARTBEAT_SECONDS,  # a lost link must not hold it for long
                )
                if failing:
                    # back from a partition: the long-polls in flight may hang on a dead
                    # connection until their timeout; ask again now (the server may have
                    # replaced this node's instances meanwhile: they must stop at once)
                    log.info("the server answers again: fetching assignments anew")
                    self.reconnected.set()
                    edge.reconnected.set()
                failing = False
            except errors.Unauthenticated:
                log.error("node credentials refused (another agent registered this node?)")
                self.stopping.set()
                return
            except errors.CoveError as exc:
                failing = True
                log.warning("heartbeat failed: %s", exc.detail)
            await asyncio.sleep(HEARTBEAT_SECONDS)

    async def _assignments(
        self, ctx: NodeContext, adopted: set[str], tg: asyncio.TaskGroup
    ) -> None:
        since = 0
        while True:
            try:
                data = await unless_reconnected(
                    ctx.client.get(
                        f"/v1/nodes/{ctx.node_id}/assignments", since=since, wait=25, timeout=60
                    ),
                    self.reconnected,
                )
                if data is None:
                    continue
            except errors.CoveError as exc:
                log.warning("can't fetch assignments: %s", exc.detail)
                await asyncio.sleep(1.0)
                continue
            since = int(data["revision"])
            seen = set()
            for item in data["items"]:
                iid = item["instance"]["id"]
                seen.add(iid)
                w = self.workers.get(iid)
                if w is None or w.finished:
                    w = InstanceWorker(ctx, item, adopted=iid in adopted)
                    self.workers[iid] = w
                    w.task = tg.create_task(w.run())
                else:
                    w.update(item)
            for vol_id in data.get("release_volumes") or []:
                if any(vol_id in {v["id"] for v in w.volumes()} for w in self.workers.values()):
                    continue  # still mounted by an instance that is going away
                try:
                    await ctx.volumes.delete(vol_id)
                    await ctx.client.post(f"/v1/volumes/{vol_id}/released")
                    log.info("deleted the data of volume %s", vol_id)
                except errors.CoveError as exc:
                    log.warning("can't delete volume %s: %s", vol_id, exc.detail)
            for iid, w in list(self.workers.items()):
                if iid not in seen:
                    w.update(None)  # gone from the API: stop and clean up
                if w.finished:
                    self.workers.pop(iid, None)


class _Stop(Exception):
    pass


def _ipv4_in_use() -> set[str]:
    """The /24s of every IPv4 address on this host's interfaces (``10.213.37``)."""
    import subprocess

    try:
        out = subprocess.run(
            ["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return set()
    return {f.split("/")[0].rsplit(".", 1)[0] for f in out.split() if f.count(".") == 3}


SIM_NETWORK = ("sim0", "10.213.0.0/24", "fd00:c0e::/64")


def default_network(state_dir: Path, driver: str = "auto") -> tuple[str, str, str]:
    """(bridge, IPv4 pool, IPv6 pool) for this agent: its own bridge, and a /24 that no
    interface on the host uses yet (two installs on one host must never share a subnet:
    the host would route one's traffic to the other's bridge). Chosen once, then kept in
    the state dir, so an agent restart keeps its addresses. The sim driver creates no
    bridge and no interface, so it takes fixed pools (its addresses are only reported)
    without looking at the host."""
    import json

    if driver == "sim":
        return SIM_NETWORK
    saved = state_dir / "net" / "network.json"
    try:
        doc = json.loads(saved.read_text())
        return str(doc["bridge"]), str(doc["pool4"]), str(doc["pool6"])
    except (OSError, ValueError, KeyError):
        pass
    h = hashlib.sha256(str(state_dir.resolve()).encode()).digest()
    used = _ipv4_in_use()
    start = h[0] % 224
    third = next(
        (
            16 + (start + i) % 224
            for i in range(224)
            if f"10.213.{16 + (start + i) % 224}" not in used
        ),
        16 + start,
    )
    net = (f"cv{h[1:5].hex()}", f"10.213.{third}.0/24", f"fd00:c0e:{third:x}:{h[6]:x}::/64")
    save_network(state_dir, net)
    return net


def save_network(state_dir: Path, net: tuple[str, str, str]) -> None:
    import json

    saved = state_dir / "net" / "network.json"
    saved.parent.mkdir(parents=True, exist_ok=True)
    tmp = saved.with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(zip(("bridge", "pool4", "pool6"), net, strict=True))))
    os.replace(tmp, saved)


def node_address(server: str) -> str | None:
    """The address this host reaches the server from: the one other nodes (on the same
    link) reach it at. None over a unix socket or loopback: a one-host cluster."""
    import ipaddress
    from urllib.parse import urlsplit

    server = server.split(",")[0].strip()  # the first replica's URL
    host = urlsplit(server).hostname
    if server.startswith("unix:") or not host:
        return None
    try:
        infos = socket.getaddrinfo(host, 9, proto=socket.IPPROTO_UDP)
        family, _, _, _, sockaddr = infos[0]
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect(sockaddr)  # UDP: picks the route and source address, sends nothing
            ip = ipaddress.ip_address(s.getsockname()[0])
    except (OSError, IndexError, ValueError):
        return None
    if ip.is_loopback or ip.is_unspecified or ip.is_link_local:
        return None
    return str(ip)


def run_agent(
    server: str,
    join_token: str,
    *,
    name: str | None = None,
    region: str = "local",
    state_dir: Path,
    driver: str = "auto",
    network: tuple[str, str, str] | None = None,
    fixed_network: bool = False,
    address: str | None = None,
) -> None:
    bridge, pool4, pool6 = network or default_network(state_dir, driver)
    agent = Agent(
        server,
        join_token,
        name=name,
        region=region,
        state_dir=state_dir,
        driver=driver,
        bridge=bridge,
        pool4=pool4,
        pool6=pool6,
        fixed_network=fixed_network,
        address=address,
    )

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, agent.stopping.set)
        await agent.run()

    asyncio.run(main())
