"""End-to-end fixtures: one ``cove up`` per session (stopped with ``cove down`` whatever
happens), alice (the first account, so the cluster operator) and further users, each with a
COVE_HOME of their own. Helpers live in helpers.py."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from .helpers import (
    Api,
    Server,
    User,
    quick_user,
    run_cove,
    server_log,
    signup,
    stop,
    uniq,
    with_project,
)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test on a deploy ``cluster`` (or ``edge_cluster``) runs on the sandbox driver;
    those marked ``both_drivers`` on the microvm driver too."""
    both = metafunc.definition.get_closest_marker("both_drivers") is not None
    drivers = ["sandbox", "microvm"] if both else ["sandbox"]
    for fixture in ("cluster", "edge_cluster"):
        if fixture in metafunc.fixturenames:
            metafunc.parametrize(fixture, drivers, indirect=True, scope="module")


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("cove-home")
    try:
        r = run_cove(["up", "--detach", "--port", "0"], home=home, timeout=90)
        assert r.code == 0, f"cove up failed\n{r}\n--- log ---\n{server_log(home)}"
        url = r.out.strip()
        assert url.startswith("http://"), str(r)
        yield Server(url=url, home=home)
    finally:
        stop(home)


@pytest.fixture(scope="session")
def alice(server: Server) -> User:
    """The first account on the cluster (hence its operator), with a current project."""
    return with_project(signup(server, server.home, "alice", own_home=True))


@pytest.fixture(scope="session")
def make_user(
    server: Server, alice: User, tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., User]:
    """Sign up another user in a COVE_HOME of their own (alice always comes first);
    ``cli=True`` goes through `cove auth signup` and `cove use`."""

    def make(tag: str = "user", *, project: bool = True, cli: bool = False) -> User:
        home = tmp_path_factory.mktemp(f"home-{tag}")
        if not cli:
            return quick_user(server, home, tag, project=project)
        u = signup(server, home, tag, own_home=False)
        return with_project(u) if project else u

    return make


@pytest.fixture
def alice_api(alice: User) -> Iterator[Api]:
    api = alice.api()
    yield api
    api.close()


@pytest.fixture
def app_name(alice: User, alice_api: Api) -> str:
    """A fresh app in alice's current project, its environments in place."""
    name = uniq("app")
    alice_api.create("apps", name, org=alice.org, project=alice.project)
    return name
