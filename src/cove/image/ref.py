"""Image references: parse, validate, and render them for skopeo.

Accepted forms (there is no default registry: cove never guesses Docker Hub)::

    host[:port]/repo[/more][:tag]             registry, tag (``latest`` when omitted)
    host[:port]/repo[:tag]@sha256:<64 hex>    registry, pinned by manifest digest
    oci:DIR[:tag]                             a local OCI image layout directory
    oci-archive:FILE[:tag]                    a tar of an OCI image layout
    docker-archive:FILE                       a ``docker save`` tar

A registry reference may carry a ``docker://`` prefix. Any form may end in
``@sha256:<64 hex>``: that is the pinned form a release stores (``ImageRef.pinned``). For
local references the digest is not something skopeo can address; the puller checks that
the image it copied has that digest instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Literal

from cove.errors import UserError

Transport = Literal["docker", "oci", "oci-archive", "docker-archive"]
LOCAL_TRANSPORTS: tuple[Transport, ...] = ("oci", "oci-archive", "docker-archive")

VALID_FORMS = (
    "valid forms: registry.example.com/team/app:1.4, "
    "registry.example.com:5000/app@sha256:<64 hex digits>, "
    "oci:/path/to/layout[:tag], oci-archive:/path/to/image.tar[:tag], "
    "docker-archive:/path/to/image.tar"
)

DIGEST_RE = re.compile(r"^sha256:[a-f0-9]{64}$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_COMPONENT_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_LABEL = r"(?:[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9])"
_HOST_RE = re.compile(
    rf"^(?:{_LABEL}(?:\.{_LABEL})*|\[[0-9A-Fa-f:.]+\])(?::(?P<port>[0-9]{{1,5}}))?$"
)
_MAX_NAME = 255


def _bad(text: str, why: str) -> UserError:
    return UserError(
        f"invalid image reference {text!r}: {why}",
        code="invalid_image_ref",
        hint=VALID_FORMS,
    )


def on_loopback(host: str | None) -> bool:
    """A registry on this machine's loopback: the only place plain HTTP is accepted."""
    if not host:
        return False
    name = host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]")[0] + "]"
    return name in ("127.0.0.1", "localhost", "[::1]")


def is_digest(value: str) -> bool:
    """True for ``sha256:`` followed by 64 lowercase hex digits."""
    return DIGEST_RE.match(value) is not None


@dataclass(frozen=True)
class ImageRef:
    """A parsed image reference. Build one with ``ImageRef.parse`` (or ``parse_ref``)."""

    transport: Transport
    registry: str | None = None  # host[:port], docker transport only
    repository: str | None = None  # path inside the registry, docker transport only
    path: str | None = None  # file or directory, local transports only
    tag: str | None = None
    digest: str | None = None  # "sha256:<hex>": the manifest digest when pinned

    @classmethod
    def parse(cls, text: str) -> ImageRef:
        return parse_ref(text)

    @property
    def is_local(self) -> bool:
        return self.transport != "docker"

    @property
    def is_pinned(self) -> bool:
        return self.digest is not None

    def pinned(self, digest: str) -> ImageRef:
        """The same reference pinned to a manifest digest (the form releases store)."""
        if not is_digest(digest):
            raise _bad(f"{self}@{digest}", "a digest is sha256: followed by 64 hex digits")
        return replace(self, digest=digest)

    def transport_ref(self) -> str:
        """The reference as skopeo's transport syntax (``docker://…``, ``oci:…``, …).

        A pinned registry reference fetches by digest (a tag could have moved); local
        references drop the digest, which skopeo cannot address there.
        """
        if self.transport == "docker":
            base = f"docker://{self.registry}/{self.repository}"
            if self.digest:
                return f"{base}@{self.digest}"
            return f"{base}:{self.tag or 'latest'}"
        out = f"{self.transport}:{self.path}"
        if self.tag:
            out += f":{self.tag}"
        return out

    def __str__(self) -> str:
        if self.transport == "docker":
            out = f"{self.registry}/{self.repository}"
        else:
            out = f"{self.transport}:{self.path}"
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


def parse_ref(text: str) -> ImageRef:
    """Parse *text* into an ``ImageRef``; raise ``UserError`` (code ``invalid_image_ref``)."""
    if not isinstance(text, str):
        raise _bad(repr(text), "an image reference is a string")
    raw = text
    text = text.strip()
    if not text:
        raise _bad(raw, "it is empty")
    if any(c.isspace() or ord(c) < 0x20 or c == "\x7f" for c in text):
        raise _bad(raw, "it contains whitespace or control characters")
    for transport in LOCAL_TRANSPORTS:
        if text.startswith(transport + ":"):
            return _parse_local(raw, transport, text[len(transport) + 1 :])
    if text.startswith("docker://"):
        return _parse_registry(raw, text[len("docker://") :])
    if "://" in text:
        scheme = text.split("://", 1)[0]
        raise _bad(raw, f"the {scheme}:// scheme is not an image transport")
    if text.startswith(("dir:", "containers-storage:", "docker-daemon:")):
        raise _bad(raw, "that transport is not supported by cove")
    return _parse_registry(raw, text)


def _split_digest(raw: str, text: str) -> tuple[str, str | None]:
    if "@" not in text:
        return text, None
    rest, digest = text.rsplit("@", 1)
    if not is_digest(digest):
        if digest.startswith("sha256:"):
            why = f"digest {digest!r} is not sha256: followed by 64 lowercase hex digits"
        else:
            why = f"digest {digest!r} is not supported (only sha256:<64 hex> digests)"
        raise _bad(raw, why)
    return rest, digest


def _parse_registry(raw: str, text: str) -> ImageRef:
    name, digest = _split_digest(raw, text)
    if "/" not in name:
        raise UserError(
            f"invalid image reference {raw!r}: no registry host. cove has no default "
            "registry (no Docker Hub): registries must be explicit",
            code="invalid_image_ref",
            hint=f"write the registry in front, e.g. registry.example.com/{name}; " + VALID_FORMS,
        )
    host, remainder = name.split("/", 1)
    if not ("." in host or ":" in host or host == "localhost" or host.startswith("[")):
        raise UserError(
            f"invalid image reference {raw!r}: {host!r} is not a registry host. cove has no "
            "default registry (no Docker Hub): registries must be explicit",
            code="invalid_image_ref",
            hint=f"write the registry in front, e.g. registry.example.com/{name}; " + VALID_FORMS,
        )
    m = _HOST_RE.match(host)
    if m is None:
        raise _bad(raw, f"registry host {host!r} is not a valid host[:port]")
    port = m.group("port")
    if port is not None and not 0 < int(port) < 65536:
        raise _bad(raw, f"registry port {port} is out of range")
    tag: str | None = None
    last = remainder.rsplit("/", 1)[-1]
    if ":" in last:
        remainder, tag = remainder.rsplit(":", 1)
        if not _TAG_RE.match(tag):
            raise _bad(raw, f"tag {tag!r} is invalid (letters, digits, '_', '.', '-'; at most 128)")
    if not remainder:
        raise _bad(raw, "the repository name is empty")
    for component in remainder.split("/"):
        if not component:
            raise _bad(raw, "the repository name has an empty path component")
        if not _COMPONENT_RE.match(component):
            why = f"repository component {component!r} is invalid"
            if component.lower() != component:
                why += " (repository names must be lowercase)"
            else:
                why += " (lowercase letters and digits, separated by '.', '_', '__' or '-')"
            raise _bad(raw, why)
    if len(host) + 1 + len(remainder) > _MAX_NAME:
        raise _bad(raw, f"the name is longer than {_MAX_NAME} characters")
    if tag is None and digest is None:
        tag = "latest"
    return ImageRef("docker", registry=host, repository=remainder, tag=tag, digest=digest)


def _parse_local(raw: str, transport: Transport, text: str) -> ImageRef:
    body, digest = _split_digest(raw, text)
    tag: str | None = None
    if ":" in body:
        if transport == "docker-archive":
            raise _bad(
                raw,
                "docker-archive takes only a file (docker-archive:FILE); its path may not "
                "contain ':'",
            )
        # skopeo splits at the first ':' — the path itself may not contain one
        body, tag = body.split(":", 1)
        if not _TAG_RE.match(tag):
            raise _bad(
                raw,
                f"tag {tag!r} is invalid (letters, digits, '_', '.', '-'; at most 128); "
                "note that the path itself may not contain ':'",
            )
    if not body:
        raise _bad(raw, f"{transport}: needs a path")
    if "\x00" in body:
        raise _bad(raw, "the path contains a NUL byte")
    return ImageRef(transport, path=body, tag=tag, digest=digest)
