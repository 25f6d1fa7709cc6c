"""Runtime drivers: run an instance from unpacked image layers, on this node.

The public surface is the driver interface (``Driver`` and its data types) and the ``sandbox``
driver (bubblewrap). ``python -m cove.runtime.supervisor`` and ``python -m cove.runtime.nsexec``
are the per-instance supervisor and the exec helper it uses; they are not APIs.
"""

from cove.runtime.base import (
    Driver,
    ExecProcess,
    InstanceSpec,
    InstanceStatus,
    LogLine,
    NetConfig,
    VolumeMount,
)
from cove.runtime.sandbox import SandboxDriver, SandboxExecProcess

__all__ = [
    "Driver",
    "ExecProcess",
    "InstanceSpec",
    "InstanceStatus",
    "LogLine",
    "NetConfig",
    "SandboxDriver",
    "SandboxExecProcess",
    "VolumeMount",
]
