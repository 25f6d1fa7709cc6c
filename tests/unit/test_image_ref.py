"""Image references: every accepted form, its skopeo form, and what bad input gets back."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cove.errors import UserError
from cove.image import VALID_FORMS, ImageRef, parse_ref

D = "sha256:" + "ab" * 32
D2 = "sha256:" + "01" * 32

VALID = [
    # text, (transport, registry, repository, path, tag, digest), skopeo form
    (
        "registry.example.com/team/app:1.4",
        ("docker", "registry.example.com", "team/app", None, "1.4", None),
        "docker://registry.example.com/team/app:1.4",
    ),
    (
        "registry.example.com/app",
        ("docker", "registry.example.com", "app", None, "latest", None),
        "docker://registry.example.com/app:latest",
    ),
    (
        "127.0.0.1:5000/app:v1",
        ("docker", "127.0.0.1:5000", "app", None, "v1", None),
        "docker://127.0.0.1:5000/app:v1",
    ),
    (
        "localhost:5000/a/b/c",
        ("docker", "localhost:5000", "a/b/c", None, "latest", None),
        "docker://localhost:5000/a/b/c:latest",
    ),
    (
        "localhost/app",
        ("docker", "localhost", "app", None, "latest", None),
        "docker://localhost/app:latest",
    ),
    (
        f"reg.io:443/app@{D}",
        ("docker", "reg.io:443", "app", None, None, D),
        f"docker://reg.io:443/app@{D}",
    ),
    (  # tag and digest: the digest is what is fetched
        f"reg.io/app:1.0@{D}",
        ("docker", "reg.io", "app", None, "1.0", D),
        f"docker://reg.io/app@{D}",
    ),
    (
        "docker://reg.io/my-app_x.y__z:v1.0-rc_1",
        ("docker", "reg.io", "my-app_x.y__z", None, "v1.0-rc_1", None),
        "docker://reg.io/my-app_x.y__z:v1.0-rc_1",
    ),
    (
        "[::1]:5000/app:v1",
        ("docker", "[::1]:5000", "app", None, "v1", None),
        "docker://[::1]:5000/app:v1",
    ),
    (
        "oci:/srv/images/web",
        ("oci", None, None, "/srv/images/web", None, None),
        "oci:/srv/images/web",
    ),
    (
        "oci:/srv/images/web:v2",
        ("oci", None, None, "/srv/images/web", "v2", None),
        "oci:/srv/images/web:v2",
    ),
    (
        f"oci:relative/dir:v2@{D}",
        ("oci", None, None, "relative/dir", "v2", D),
        "oci:relative/dir:v2",
    ),
    (
        "oci-archive:/tmp/web.tar",
        ("oci-archive", None, None, "/tmp/web.tar", None, None),
        "oci-archive:/tmp/web.tar",
    ),
    (
        "oci-archive:/tmp/web.tar:v1",
        ("oci-archive", None, None, "/tmp/web.tar", "v1", None),
        "oci-archive:/tmp/web.tar:v1",
    ),
    (
        "docker-archive:/tmp/saved.tar",
        ("docker-archive", None, None, "/tmp/saved.tar", None, None),
        "docker-archive:/tmp/saved.tar",
    ),
    (
        f"docker-archive:/tmp/saved.tar@{D}",
        ("docker-archive", None, None, "/tmp/saved.tar", None, D),
        "docker-archive:/tmp/saved.tar",
    ),
    (
        "  reg.io/app:v1\n",  # surrounding whitespace is trimmed
        ("docker", "reg.io", "app", None, "v1", None),
        "docker://reg.io/app:v1",
    ),
]


@pytest.mark.parametrize(("text", "fields", "skopeo"), VALID, ids=[v[0].strip() for v in VALID])
def test_valid_references(text: str, fields: tuple[object, ...], skopeo: str) -> None:
    ref = parse_ref(text)
    assert (ref.transport, ref.registry, ref.repository, ref.path, ref.tag, ref.digest) == fields
    assert ref.transport_ref() == skopeo
    assert ref.is_local == (ref.transport != "docker")
    # the canonical string form parses back to the same reference
    assert parse_ref(str(ref)) == ref
    assert ImageRef.parse(text) == ref


def test_pinned_form_fetches_by_digest_and_keeps_the_tag_for_people() -> None:
    ref = parse_ref("reg.io:5000/team/app:v3")
    pinned = ref.pinned(D)
    assert pinned.is_pinned and not ref.is_pinned
    assert str(pinned) == f"reg.io:5000/team/app:v3@{D}"
    assert pinned.transport_ref() == f"docker://reg.io:5000/team/app@{D}"
    assert parse_ref(str(pinned)) == pinned
    assert pinned.pinned(D2).digest == D2  # re-pinning replaces the digest
    local = parse_ref("oci:/x:v1").pinned(D)
    assert str(local) == f"oci:/x:v1@{D}"
    assert local.transport_ref() == "oci:/x:v1"  # skopeo cannot address it; pull checks it


def test_references_are_frozen_and_hashable() -> None:
    ref = parse_ref("reg.io/app:v1")
    with pytest.raises(AttributeError):
        ref.tag = "v2"  # type: ignore[misc]
    assert len({ref, parse_ref("reg.io/app:v1")}) == 1


def test_pinning_with_a_bad_digest_is_a_user_error() -> None:
    with pytest.raises(UserError) as exc:
        parse_ref("reg.io/app").pinned("sha256:abc")
    assert exc.value.code == "invalid_image_ref"


NO_REGISTRY = ["nginx", "nginx:1.25", "busybox:latest", "library/nginx:1", "team/app", f"app@{D}"]


@pytest.mark.parametrize("text", NO_REGISTRY)
def test_a_reference_without_a_registry_host_says_registries_must_be_explicit(text: str) -> None:
    with pytest.raises(UserError) as exc:
        parse_ref(text)
    err = exc.value
    assert err.code == "invalid_image_ref"
    assert "registries must be explicit" in err.detail
    assert "Docker Hub" in err.detail
    assert err.hint is not None and "registry.example.com/" in err.hint
    assert VALID_FORMS in err.hint


BAD = [
    ("", "empty"),
    ("   ", "empty"),
    ("reg.io/App:v1", "lowercase"),
    ("reg.io/app:", "tag"),
    ("reg.io/app:-v1", "tag"),
    ("reg.io/app:" + "v" * 129, "tag"),
    ("reg.io/app@sha256:abc", "64 lowercase hex"),
    ("reg.io/app@sha256:" + "AB" * 32, "64 lowercase hex"),
    ("reg.io/app@sha512:" + "ab" * 64, "only sha256"),
    ("reg.io/app@latest", "only sha256"),
    ("reg.io//app", "empty path component"),
    ("reg.io/app/", "empty path component"),
    ("reg.io/", "empty"),
    ("reg.io/a..b", "invalid"),
    ("reg.io/-app", "invalid"),
    ("reg.io/app name", "whitespace"),
    ("reg.io/app\x00", "control"),
    ("reg_io.x/app", "not a valid host"),
    ("reg.io:99999/app", "out of range"),
    ("reg.io:0/app", "out of range"),
    ("-reg.io/app", "not a valid host"),
    ("https://reg.io/app", "scheme"),
    ("http://reg.io/app:v1", "scheme"),
    ("dir:/tmp/x", "not supported"),
    ("containers-storage:app", "not supported"),
    ("oci:", "needs a path"),
    ("oci::tag", "needs a path"),
    ("oci:/x:bad tag", "whitespace"),
    ("oci:/x:a:b", "tag"),
    ("oci-archive:/x.tar:-v", "tag"),
    ("docker-archive:/x.tar:app:v1", "docker-archive takes only a file"),
    ("docker-archive:", "needs a path"),
    ("reg.io/" + "a" * 300, "longer than"),
]


@pytest.mark.parametrize(("text", "why"), BAD, ids=[repr(b[0])[:40] for b in BAD])
def test_bad_references_are_user_errors_with_the_valid_forms(text: str, why: str) -> None:
    with pytest.raises(UserError) as exc:
        parse_ref(text)
    err = exc.value
    assert err.code == "invalid_image_ref"
    assert err.status == 422
    assert why in err.detail
    assert err.hint is not None and "oci:/path/to/layout" in err.hint
    problem = err.problem()
    assert problem["code"] == "invalid_image_ref" and problem["hint"] == err.hint


def test_a_non_string_is_a_user_error() -> None:
    with pytest.raises(UserError):
        parse_ref(None)  # type: ignore[arg-type]


@given(st.text(max_size=80))
def test_arbitrary_text_parses_or_is_a_user_error(text: str) -> None:
    try:
        ref = parse_ref(text)
    except UserError as exc:
        assert exc.code == "invalid_image_ref"
        return
    assert parse_ref(str(ref)) == ref
    assert ref.transport_ref()
