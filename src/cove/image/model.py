"""Values the image layer hands out: a resolved reference, an image config, a pulled image."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cove.image.ref import ImageRef

DEFAULT_PLATFORM = "linux/amd64"


@dataclass(frozen=True)
class Resolved:
    """A reference resolved to one manifest digest: what a release pins.

    ``digest`` is the digest of the image manifest (for a multi-platform index, of the
    manifest chosen for ``platform``; ``index_digest`` then names the index).
    """

    ref: ImageRef
    digest: str
    media_type: str
    platform: str = DEFAULT_PLATFORM
    index_digest: str | None = None

    @property
    def pinned(self) -> ImageRef:
        """The reference pinned to the manifest digest, e.g. ``host/app:1@sha256:…``."""
        return self.ref.pinned(self.digest)

    def source_ref(self) -> str:
        """The skopeo reference to copy from (by digest for registries)."""
        return self.pinned.transport_ref()


@dataclass(frozen=True)
class ImageConfig:
    """The runtime-relevant part of an OCI image config (``config`` in the config blob)."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = ()  # "KEY=value", in image order
    working_dir: str = ""
    user: str = ""
    exposed_ports: tuple[str, ...] = ()  # "8080/tcp"
    labels: Mapping[str, str] = field(default_factory=dict)
    stop_signal: str = ""

    @property
    def argv(self) -> tuple[str, ...]:
        """What the image runs by default: entrypoint followed by cmd."""
        return self.entrypoint + self.cmd

    @property
    def env_dict(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for item in self.env:
            key, _, value = item.partition("=")
            out[key] = value
        return out

    @classmethod
    def from_oci(cls, doc: Mapping[str, Any] | None) -> ImageConfig:
        """Build from the ``config`` object of an image config blob (absent fields empty)."""
        doc = doc or {}

        def strs(key: str) -> tuple[str, ...]:
            value = doc.get(key)
            if value is None:
                return ()
            if isinstance(value, str):  # Docker tolerates a shell string here
                return (value,)
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"config.{key} is not a list of strings")
            return tuple(value)

        ports = doc.get("ExposedPorts") or {}
        labels = doc.get("Labels") or {}
        if not isinstance(ports, dict) or not isinstance(labels, dict):
            raise ValueError("config.ExposedPorts and config.Labels must be objects")
        for key in ("WorkingDir", "User", "StopSignal"):
            if not isinstance(doc.get(key) or "", str):
                raise ValueError(f"config.{key} is not a string")
        return cls(
            entrypoint=strs("Entrypoint"),
            cmd=strs("Cmd"),
            env=strs("Env"),
            working_dir=str(doc.get("WorkingDir") or ""),
            user=str(doc.get("User") or ""),
            exposed_ports=tuple(sorted(str(p) for p in ports)),
            labels={str(k): str(v) for k, v in labels.items()},
            stop_signal=str(doc.get("StopSignal") or ""),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "entrypoint": list(self.entrypoint),
            "cmd": list(self.cmd),
            "env": list(self.env),
            "working_dir": self.working_dir,
            "user": self.user,
            "exposed_ports": list(self.exposed_ports),
            "labels": dict(self.labels),
            "stop_signal": self.stop_signal,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> ImageConfig:
        return cls(
            entrypoint=tuple(doc.get("entrypoint", ())),
            cmd=tuple(doc.get("cmd", ())),
            env=tuple(doc.get("env", ())),
            working_dir=str(doc.get("working_dir", "")),
            user=str(doc.get("user", "")),
            exposed_ports=tuple(doc.get("exposed_ports", ())),
            labels=dict(doc.get("labels", {})),
            stop_signal=str(doc.get("stop_signal", "")),
        )


@dataclass(frozen=True)
class Image:
    """A pulled image: its digest, its config, and its unpacked layers, lowest first.

    Each entry of ``layer_dirs`` is a directory usable as an overlayfs lowerdir as is
    (whiteouts are overlay whiteouts). Stack them with ``overlay_lowerdir``.
    """

    digest: str
    config: ImageConfig
    diff_ids: tuple[str, ...]
    layer_dirs: tuple[Path, ...]
    os: str = "linux"
    architecture: str = "amd64"
    source: str = ""  # the reference it was pulled from (informational)

    @property
    def digest_hex(self) -> str:
        return self.digest.split(":", 1)[1]


def layer_dirs_for(layers_root: Path, diff_ids: Sequence[str]) -> tuple[Path, ...]:
    return tuple(layers_root / d.split(":", 1)[1] for d in diff_ids)
