"""`cove shell`'s parts without a terminal: splitting, completion from the click tree, help,
refusals, and commands run in-process through `cove.cli.main.run` (errors printed, the
shell goes on). The shell on a real terminal is tests/integration/test_console_pty.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer

from cove.cli import shell
from cove.cli.main import build, run

ROOT = typer.main.get_command(build())


@pytest.fixture(autouse=True)
def _no_cove_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in ("COVE_API_URL", "COVE_TOKEN", "COVE_ORG", "COVE_PROJECT", "COVE_CONSOLE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("COVE_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)  # no cove.toml from the checkout


# ----------------------------------------------------------------------------- splitting


@pytest.mark.parametrize(
    ("line", "argv"),
    [
        ("apps list", ["apps", "list"]),
        ("  apps   list  ", ["apps", "list"]),
        ("cove apps list", ["apps", "list"]),  # the habit of typing `cove` is forgiven
        ('secrets set "GREETING=hello world"', ["secrets", "set", "GREETING=hello world"]),
        ("secrets set 'A=it''s'", ["secrets", "set", "A=its"]),
        (r"exec -- sh -c echo\ a\ b", ["exec", "--", "sh", "-c", "echo a b"]),
        (
            "exec -- sh -c 'echo $HOME # not a comment'",
            ["exec", "--", "sh", "-c", "echo $HOME # not a comment"],
        ),
        ("", []),
    ],
)
def test_split_is_quote_aware(line: str, argv: list[str]) -> None:
    assert shell.split(line) == argv


@pytest.mark.parametrize("line", ['secrets set "A=b', "exec -- sh -c 'x", "apps list \\"])
def test_split_refuses_an_unfinished_line(line: str) -> None:
    with pytest.raises(shell.SplitError, match="can't parse the line"):
        shell.split(line)


@pytest.mark.parametrize(
    ("text", "words", "current"),
    [
        ("", [], ""),
        ("ap", [], "ap"),
        ("apps ", ["apps"], ""),
        ("apps li", ["apps"], "li"),
        ("cove apps li", ["apps"], "li"),
        ('deploy --image "oci:a b', ["deploy", "--image"], "oci:a b"),
        ("apps list -o ", ["apps", "list", "-o"], ""),
    ],
)
def test_partial_split_finds_the_word_being_typed(
    text: str, words: list[str], current: str
) -> None:
    assert shell._partial_split(text) == (words, current)


# ----------------------------------------------------------------------------- completion


def _texts(words: list[str], current: str) -> list[str]:
    return [c.text for c in shell.complete(ROOT, words, current)]


def test_top_level_completion_offers_commands_and_builtins() -> None:
    got = _texts([], "")
    assert {"apps", "deploy", "exec", "logs", "status", "rollback", "console"} <= set(got)
    assert {"help", "exit", "quit"} <= set(got)
    assert "shell" in got  # it is a command (refused inside the shell, see below)
    assert _texts([], "dep") == ["deploy"]
    assert _texts([], "ap") == ["apps"]


def test_hidden_aliases_are_not_offered() -> None:
    visible = set(_texts([], "env"))
    assert "environments" in visible
    hidden = {n for n, c in (ROOT.commands or {}).items() if getattr(c, "hidden", False)}
    assert hidden, "the CLI has hidden aliases (envs, ...)"
    assert not hidden & set(_texts([], ""))


def test_subcommand_and_option_completion() -> None:
    assert _texts(["apps"], "") == sorted(_texts(["apps"], ""))
    assert {"list", "describe", "create", "delete"} <= set(_texts(["apps"], ""))
    assert _texts(["apps"], "li") == ["list"]
    assert _texts(["orgs", "members"], "a") == ["add"]
    opts = _texts(["apps", "list"], "--")
    assert "--output" in opts and "--help" in opts
    assert _texts(["logs"], "--fo") == ["--follow"]
    assert _texts(["apps", "list"], "-o") == ["-o"]


def test_option_values_complete_from_choices() -> None:
    assert _texts(["apps", "list", "-o"], "") == ["table", "json", "yaml"]
    assert _texts(["apps", "list", "--output"], "j") == ["json"]


def test_nothing_is_offered_for_arguments() -> None:
    assert _texts(["apps", "describe", "web"], "") == []


def test_completion_meta_is_the_help_line() -> None:
    (apps,) = [c for c in shell.complete(ROOT, [], "apps")]
    assert apps.meta.startswith("Apps")


# ----------------------------------------------------------------------------- running lines


def test_run_returns_exit_codes_instead_of_exiting(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["--no-such-flag"]) == 2
    assert run(["apps", "list"]) == 1  # no API configured: an error, printed
    err = capsys.readouterr().err
    assert "no cove API to talk to" in err
    assert "Traceback" not in err
    assert run(["deferred", "-o", "json"]) == 0


def test_execute_runs_commands_in_process_and_goes_on(
    capsys: pytest.CaptureFixture[str],
) -> None:
    sh = shell.Shell()
    assert sh.execute("deferred -o json") == (False, 0)
    assert '"instead"' in capsys.readouterr().out
    done, code = sh.execute("apps list")
    assert (done, code) == (False, 1)
    assert "no cove API to talk to" in capsys.readouterr().err
    assert sh.execute("apps list --bogus") == (False, 2)
    assert sh.execute("secrets set 'A=b") == (False, 2)
    assert "can't parse the line" in capsys.readouterr().err
    assert sh.execute("   ", last=5) == (False, 5)  # an empty line changes nothing
    assert sh.execute("exit") == (True, 0)
    assert sh.execute("quit") == (True, 0)


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    sh = shell.Shell()
    assert sh.execute("help") == (False, 0)
    out = capsys.readouterr().out
    assert "apps" in out and "In the shell:" in out and "exit" in out
    assert sh.execute("help apps list") == (False, 0)
    assert "--output" in capsys.readouterr().out
    assert sh.execute("help exit") == (False, 0)
    assert sh.execute("help no-such-thing") == (False, 2)
    assert "no command `no-such-thing`" in capsys.readouterr().err


def test_refusals(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    sh = shell.Shell()
    assert sh.execute("shell") == (False, 2)
    assert "in the cove shell already" in capsys.readouterr().err
    assert sh.refusal("up") is None  # on a plain terminal, `up` is yours to run
    monkeypatch.setenv("COVE_CONSOLE", "1")
    for name in ("up", "down", "server", "agent"):
        assert sh.execute(f"{name} --help") == (False, 2)
        assert "the server's host" in capsys.readouterr().err
    assert sh.execute("apps list --api-url http://169.254.169.254") == (False, 2)
    assert sh.execute("apps list --api-url=http://10.0.0.1") == (False, 2)
    assert "talks to its own server" in capsys.readouterr().err
    assert sh.execute("deferred -o json") == (False, 0)


def test_the_console_shell_reads_no_cove_toml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cove.cli import config

    (tmp_path / "cove.toml").write_text('org = "planted"\n')
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    assert config.app_toml() == {"org": "planted"}  # a parent's, on a plain terminal
    monkeypatch.setenv("COVE_CONSOLE", "1")
    assert config.app_toml() == {}


def test_shell_needs_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["shell"]) == 2  # stdin is not a TTY under pytest
    assert "needs a terminal" in capsys.readouterr().err


def test_prompt_shows_the_context(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sh = shell.Shell()
    assert sh.prompt_text() == "cove> "  # no API known
    monkeypatch.setenv("COVE_API_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("COVE_ORG", "acme")
    monkeypatch.setenv("COVE_PROJECT", "shop")
    assert sh.prompt_text() == "cove acme/shop> "
    monkeypatch.setenv("COVE_APP", "web")
    monkeypatch.setenv("COVE_ENV", "prod")
    assert sh.prompt_text() == "cove acme/shop web/prod> "


def test_console_command_url(monkeypatch: pytest.MonkeyPatch) -> None:
    from cove.cli import console

    assert console.console_url("http://127.0.0.1:8470/") == "http://127.0.0.1:8470/console"
    with pytest.raises(Exception, match="needs the server on TCP"):
        console.console_url("unix:/run/cove/api.sock")
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.delenv("CI", raising=False)
    assert not console.has_desktop_browser()
    monkeypatch.setenv("DISPLAY", ":0")
    assert console.has_desktop_browser()
    monkeypatch.setenv("CI", "true")
    assert not console.has_desktop_browser()
