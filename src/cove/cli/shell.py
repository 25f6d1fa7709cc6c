"""``cove shell``: an interactive shell of cove commands (the CLI without the ``cove``
prefix), on a plain terminal or in the web console (where the server runs it in a PTY).

- commands run in this process, through the same Typer app as ``cove`` itself
  (``cove.cli.main.run``): an error is printed and the prompt comes back;
- the line is split like a POSIX shell does (``shlex``: quotes, backslashes);
- Tab completes command and subcommand names, options and option choices, from the click
  command tree; history lives in ``COVE_HOME/shell_history``;
- ``help``, ``help CMD...``, ``exit``/``quit``/Ctrl-D; Ctrl-C at the prompt clears the line,
  Ctrl-C during a command (``logs -f``, ``events -f``) interrupts it.

In the web console (``COVE_CONSOLE=1``, set by the server) the commands that act on the
machine the shell runs on (``up``, ``down``, ``server``, ``agent``) are refused: that
machine is the server's host, not the user's.
"""

from __future__ import annotations

import enum
import os
import shlex
import sys
import typing
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import typer

from cove import errors
from cove.cli import config, output

BUILTINS = {
    "help": "help, or help CMD...: what a command does and takes",
    "exit": "leave the shell (also quit, Ctrl-D)",
    "quit": "leave the shell",
}
# commands that act on the machine the shell runs on: not from the web console
LOCAL_ONLY = ("up", "down", "server", "agent")
HISTORY_FILE = "shell_history"


def in_console() -> bool:
    return os.environ.get("COVE_CONSOLE") == "1"


def register(app: typer.Typer) -> None:
    @app.command(
        "shell",
        help="An interactive shell of cove commands (without the `cove` prefix): "
        "history, Tab completion, help, exit.",
    )
    def shell_cmd() -> None:
        if not sys.stdin.isatty():
            raise errors.UserError(
                "cove shell needs a terminal on stdin",
                hint="run single commands as `cove CMD ...` in scripts",
                code="usage",
            )
        raise typer.Exit(Shell().loop())


# ----------------------------------------------------------------------------- splitting


class SplitError(ValueError):
    pass


def split(line: str) -> list[str]:
    """A command line as argv, quote-aware; a leading ``cove`` is dropped (people type it
    out of habit)."""
    try:
        argv = shlex.split(line, comments=False, posix=True)
    except ValueError as exc:  # "No closing quotation", "No escaped character"
        raise SplitError(f"can't parse the line: {str(exc).lower()}") from exc
    if argv and argv[0] == "cove":
        argv = argv[1:]
    return argv


def _partial_split(text: str) -> tuple[list[str], str]:
    """(complete words, the word being typed) of the text before the cursor; an unclosed
    quote belongs to the word being typed."""
    for closing in ("", '"', "'"):
        try:
            words = shlex.split(text + closing, comments=False, posix=True)
        except ValueError:
            continue
        typing = bool(closing) or (bool(text) and not text[-1].isspace())
        current = words.pop() if typing and words else ""
        return _drop_cove(words), current
    return [], ""


def _drop_cove(words: list[str]) -> list[str]:
    return words[1:] if words and words[0] == "cove" else words


# ----------------------------------------------------------------------------- the command tree


@dataclass(frozen=True)
class Candidate:
    text: str
    meta: str


def _visible(cmd: Any) -> dict[str, Any]:
    subs = getattr(cmd, "commands", None) or {}
    return {n: c for n, c in subs.items() if not getattr(c, "hidden", False)}


def _resolve(root: Any, words: list[str]) -> tuple[Any, list[str]]:
    """The deepest command the words name, and the words after it."""
    cmd = root
    rest = list(words)
    while rest:
        subs = getattr(cmd, "commands", None) or {}
        if rest[0] not in subs:
            break
        cmd = subs[rest.pop(0)]
    return cmd, rest


def _short(text: str | None) -> str:
    first = (text or "").strip().split("\n", 1)[0]
    return first if len(first) <= 60 else first[:57] + "..."


def _choices(param: Any) -> list[str]:
    """The values an option accepts, when they are a fixed set (click's Choice, or an enum
    or Literal annotation in Typer's own parameter model)."""
    choices = getattr(getattr(param, "type", None), "choices", None)
    if choices:
        return [str(c.value if isinstance(c, enum.Enum) else c) for c in choices]
    ann = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    if isinstance(ann, type) and issubclass(ann, enum.Enum):
        return [str(m.value) for m in ann]
    if typing.get_origin(ann) is typing.Literal:
        return [str(a) for a in typing.get_args(ann)]
    return []


def complete(root: Any, words: list[str], current: str) -> list[Candidate]:
    """What may come next after *words*, starting with *current*."""
    cmd, rest = _resolve(root, words)
    # the value of an option that takes one: its choices, if it has any
    if rest and rest[-1].startswith("-"):
        for p in getattr(cmd, "params", []):
            if rest[-1] in (*p.opts, *p.secondary_opts) and not getattr(p, "is_flag", False):
                return [Candidate(c, "") for c in _choices(p) if c.startswith(current)]
    out: list[Candidate] = []
    if current.startswith("-"):
        for p in getattr(cmd, "params", []):
            for opt in (*p.opts, *p.secondary_opts):
                if opt.startswith("-") and opt.startswith(current):
                    out.append(Candidate(opt, _short(getattr(p, "help", ""))))
        for opt in ("--help",):
            if opt.startswith(current) and all(c.text != opt for c in out):
                out.append(Candidate(opt, "what this command takes"))
        return out
    if rest:  # past the command's name: arguments, nothing to offer
        return []
    for name, sub in sorted(_visible(cmd).items()):
        if name.startswith(current):
            out.append(Candidate(name, _short(sub.help or sub.short_help)))
    if cmd is root:
        for name, meta in BUILTINS.items():
            if name.startswith(current):
                out.append(Candidate(name, meta))
    return out


def make_completer(root: Any) -> Any:
    """A prompt_toolkit completer over the click tree (prompt_toolkit is imported only
    when the shell starts, not by every `cove` command)."""
    from prompt_toolkit.completion import CompleteEvent, Completer, Completion
    from prompt_toolkit.document import Document

    class TreeCompleter(Completer):
        def get_completions(
            self, document: Document, complete_event: CompleteEvent
        ) -> Iterator[Completion]:
            words, current = _partial_split(document.text_before_cursor)
            for c in complete(root, words, current):
                yield Completion(c.text, start_position=-len(current), display_meta=c.meta)

    return TreeCompleter()


# ----------------------------------------------------------------------------- the shell


class Shell:
    def __init__(self) -> None:
        from cove.cli.main import build

        self.app = build()
        self.root = typer.main.get_command(self.app)

    def banner(self) -> str:
        where = " (web console)" if in_console() else ""
        return (
            f"cove shell{where}: cove commands without the `cove` prefix\n"
            "(apps list, status, logs -f, exec -it -- sh). Tab completes; help, help CMD;\n"
            "exit or Ctrl-D leaves."
        )

    def prompt_text(self) -> str:
        try:
            ctx = config.resolve()
        except errors.CoveError:
            return "cove> "
        where = "/".join(x for x in (ctx.org, ctx.project) if x)
        if ctx.app:
            where += f" {ctx.app}" + (f"/{ctx.env}" if ctx.env else "")
        return f"cove {where}> " if where else "cove> "

    def loop(self) -> int:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory, InMemoryHistory

        history: Any
        try:
            path = config.home() / HISTORY_FILE
            path.parent.mkdir(parents=True, exist_ok=True)
            # commands may carry secrets (`secrets set KEY=...`): the file is the user's only
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
            history = FileHistory(str(path))
        except OSError:
            history = InMemoryHistory()
        session: PromptSession[str] = PromptSession(
            history=history,
            completer=make_completer(self.root),
            complete_while_typing=False,
            enable_history_search=False,
        )
        output.err.print(self.banner(), markup=False, highlight=False)
        last = 0
        while True:
            try:
                line = session.prompt(self.prompt_text())
            except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh line
                continue
            except EOFError:  # Ctrl-D
                return 0
            try:
                done, last = self.execute(line, last)
            except KeyboardInterrupt:
                output.err.print("", markup=False)  # the terminal echoed ^C: end its line
                last = 130
                continue
            if done:
                return last

    def execute(self, line: str, last: int = 0) -> tuple[bool, int]:
        """Run one line; (leave the shell?, its exit code)."""
        from cove.cli.main import run

        try:
            argv = split(line)
        except SplitError as exc:
            output.err.print(f"error: {exc}", markup=False, highlight=False)
            return False, errors.EXIT_USAGE
        if not argv:
            return False, last
        name = argv[0]
        if name in ("exit", "quit"):
            return True, 0
        if name == "help":
            return False, self.help(argv[1:])
        refused = self.refusal(name, argv[1:])
        if refused:
            output.err.print(f"error: {refused}", markup=False, highlight=False)
            return False, errors.EXIT_USAGE
        code = run(argv, self.app)
        _reset_terminal()
        if code == 130:  # interrupted: the terminal echoed ^C, the prompt goes below it
            output.err.print("", markup=False)
        return False, code

    def refusal(self, name: str, args: list[str] | None = None) -> str | None:
        if name == "shell":
            return "you are in the cove shell already"
        if not in_console():
            return None
        if name in LOCAL_ONLY:
            return (
                f"`{name}` acts on the machine the shell runs on; in the web console that is "
                "the server's host, so it is not available here (run it in a local terminal)"
            )
        if any(a == "--api-url" or a.startswith("--api-url=") for a in args or []):
            # the shell runs on the server's host: it talks to this server only
            return "the web console talks to its own server: --api-url is not available here"
        return None

    def help(self, words: list[str]) -> int:
        from cove.cli.main import run

        if not words:
            code = run(["--help"], self.app)
            lines = ["", "In the shell:"]
            lines += [f"  {name:<6} {meta}" for name, meta in BUILTINS.items()]
            lines.append("  Tab completes commands and options; Ctrl-C interrupts a command.")
            if in_console():
                lines.append(f"  Not in the web console: {', '.join(LOCAL_ONLY)}.")
            output.out.print("\n".join(lines), markup=False, highlight=False)
            return code
        if words[0] in BUILTINS:
            output.out.print(f"{words[0]}: {BUILTINS[words[0]]}", markup=False, highlight=False)
            return 0
        cmd, rest = _resolve(self.root, words)
        if rest:
            output.err.print(
                f"error: no command `{' '.join(words)}`; `help` lists them",
                markup=False,
                highlight=False,
            )
            return errors.EXIT_USAGE
        _ = cmd
        return run([*words, "--help"], self.app)


def _reset_terminal() -> None:
    """Leave the terminal usable after a command that may have changed it (``exec -t``
    restores its mode itself; this is for a command killed half way)."""
    if not sys.stdout.isatty():
        return
    try:
        import termios

        attrs = termios.tcgetattr(sys.stdin.fileno())
        if not attrs[3] & termios.ICANON:
            attrs[3] |= termios.ICANON | termios.ECHO | termios.ISIG
            termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, attrs)
    except (OSError, termios.error):
        pass


def names(root: Any) -> Iterable[str]:
    """Every visible top-level command name (for tests and help)."""
    return sorted(_visible(root))
