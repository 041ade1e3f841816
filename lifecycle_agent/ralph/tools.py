"""Tools of the built-in coding agent, confined to one repository, and the text protocol that calls them.

Protocol: each model reply holds one JSON object ``{"tool": NAME, "args": {...}}``.
Parsing is lenient, so small models and models trained on other formats get through:
code fences and prose around the object are ignored, ``name``/``action``/``function``
may stand for ``tool``, ``arguments``/``parameters``/``input`` for ``args`` (also as a
JSON string), arguments may sit at the top level, and common aliases of tool and
argument names are accepted (``read`` → ``read_file``, ``file_path`` → ``path``).

Confinement: paths are relative to the repository root; absolute paths, ``..``
components, NUL characters, and paths that resolve outside the root (through a symlink)
are refused with a message saying so, as are ``.git/`` and the loop's own state directory.

Bad arguments never end the loop: a wrong type, a number that is not finite
(``NaN``, ``1e999``), or any other argument the tool cannot use comes back to the agent
as an ``error: ...`` observation it can correct.
``run_command`` runs in the repository with a timeout and trimmed output; it is a
convenience, not a sandbox: the command itself can reach whatever the user can.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from .config import STATE_DIR
from .shell import GroupRecord, run_shell, trim

#: Top-level names no tool may read or write.
PROTECTED = (".git", STATE_DIR)
#: Files larger than this are not searched, bytes.
MAX_SEARCH_FILE_BYTES = 1_000_000
MAX_LIST_ENTRIES = 300
MAX_SEARCH_MATCHES = 100
#: Longest a search may take, seconds (a regular expression that backtracks forever is stopped).
SEARCH_TIMEOUT_S = 5.0

DONE = "done"


class ToolError(Exception):
    """A tool call that cannot be carried out; its message is shown to the agent."""


@dataclass(frozen=True)
class Param:
    name: str
    kind: type
    required: bool
    description: str


@dataclass(frozen=True)
class ToolSpec:
    """A tool as the agent sees it: name, what it does, its arguments and an example call."""

    name: str
    description: str
    params: tuple[Param, ...]
    example: dict

    def line(self) -> str:
        return f"- {self.name} {json.dumps(self.example)}: {self.description}"


SPECS: dict[str, ToolSpec] = {
    spec.name: spec
    for spec in (
        ToolSpec(
            "list_files", "files under a directory (git-ignored files left out)",
            (Param("path", str, False, "directory, default the root"),), {"path": "."},
        ),
        ToolSpec(
            "read_file", "the text of a file; optional start/end line numbers (from 1)",
            (Param("path", str, True, "file"), Param("start", int, False, "first line"), Param("end", int, False, "last line")),
            {"path": "src/app.py"},
        ),
        ToolSpec(
            "search", "lines that contain the text (\"regex\": true for a regular expression)",
            (Param("pattern", str, True, "text to find"), Param("path", str, False, "directory or file"),
             Param("regex", bool, False, "pattern is a regular expression")),
            {"pattern": "def main"},
        ),
        ToolSpec(
            "write_file", "create or replace a file with the given content",
            (Param("path", str, True, "file"), Param("content", str, True, "the whole new text")),
            {"path": "src/app.py", "content": "..."},
        ),
        ToolSpec(
            "edit_file", "replace the one exact occurrence of old with new",
            (Param("path", str, True, "file"), Param("old", str, True, "exact text now in the file"),
             Param("new", str, True, "replacement")),
            {"path": "src/app.py", "old": "return 1", "new": "return 2"},
        ),
        ToolSpec(
            "run_command", "run a shell command in the repository and see its output",
            (Param("command", str, True, "shell command"), Param("timeout", float, False, "seconds")),
            {"command": "pytest -q"},
        ),
        ToolSpec(
            DONE, "end this iteration (the check runs next)",
            (Param("summary", str, False, "what you did"),), {"summary": "fixed the parser"},
        ),
    )
}

_TOOL_ALIASES = {
    "ls": "list_files", "list": "list_files", "list_dir": "list_files", "glob": "list_files",
    "read": "read_file", "cat": "read_file", "view": "read_file", "open": "read_file",
    "grep": "search", "find": "search", "search_files": "search",
    "write": "write_file", "create_file": "write_file", "create": "write_file",
    "edit": "edit_file", "str_replace": "edit_file", "replace": "edit_file",
    "run": "run_command", "bash": "run_command", "shell": "run_command", "exec": "run_command", "command": "run_command",
    "finish": DONE, "stop": DONE, "end": DONE, "complete": DONE,
}
_ARG_ALIASES = {
    "file": "path", "file_path": "path", "filename": "path", "filepath": "path", "dir": "path", "directory": "path",
    "text": "content", "contents": "content", "data": "content", "body": "content",
    "old_str": "old", "old_string": "old", "old_text": "old", "search": "old",
    "new_str": "new", "new_string": "new", "new_text": "new", "replacement": "new",
    "cmd": "command", "query": "pattern", "regexp": "pattern",
    "start_line": "start", "end_line": "end", "line_start": "start", "line_end": "end",
}
_KIND_WORDS = {str: "a string", int: "an integer", float: "a finite number", bool: "true or false"}
_NAME_KEYS = ("tool", "name", "action", "function", "tool_name")
_ARGS_KEYS = ("args", "arguments", "parameters", "params", "input")


@dataclass(frozen=True)
class ToolCall:
    name: str
    args: dict


def _canonical_tool(name: str) -> str:
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    return _TOOL_ALIASES.get(key, key)


def _as_call(obj: dict) -> Optional[ToolCall]:
    name = next((obj[k] for k in _NAME_KEYS if isinstance(obj.get(k), str)), None)
    if name is None:
        nested = obj.get("function") or obj.get("tool_call")
        return _as_call(nested) if isinstance(nested, dict) else None
    args: Any = next((obj[k] for k in _ARGS_KEYS if k in obj), None)
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if args is None:
        args = {k: v for k, v in obj.items() if k not in _NAME_KEYS}
    if not isinstance(args, dict):
        return None
    return ToolCall(_canonical_tool(name), {_ARG_ALIASES.get(k, k): v for k, v in args.items()})


def parse_tool_call(reply: str) -> Optional[ToolCall]:
    """The first tool call in a reply, or ``None`` when it holds none (see the module docstring)."""
    text = reply or ""
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            obj, _ = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            call = _as_call(obj)
            if call is not None:
                return call
    bare = re.sub(r"[^a-z_]", "", text.strip().lower())
    if bare and _canonical_tool(bare) in (DONE, "list_files") and len(text.strip()) <= 20:
        return ToolCall(_canonical_tool(bare), {})
    return None


def _number(value: Any, kind: type) -> int | float:
    """A finite int or float argument from a JSON number or a numeric string (ValueError/TypeError when not one)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError
    if kind is int and isinstance(value, int):
        return value
    number = float(value)  # OverflowError for an int too large for a float
    if not math.isfinite(number):
        raise ValueError
    if kind is int:
        if not number.is_integer():
            raise ValueError
        return int(number)
    return number


def _coerce(spec: ToolSpec, args: dict) -> dict:
    known = {p.name: p for p in spec.params}
    unknown = sorted(set(args) - set(known))
    if unknown:
        raise ToolError(f"{spec.name} takes no argument {', '.join(map(repr, unknown))}; its arguments: {', '.join(known)}")
    out: dict[str, Any] = {}
    for param in spec.params:
        if param.name not in args or args[param.name] is None:
            if param.required:
                raise ToolError(f"{spec.name} needs {param.name!r} ({param.description}); example: {json.dumps(spec.example)}")
            continue
        value = args[param.name]
        try:
            if param.kind is bool:
                value = value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes")
            elif param.kind is str:
                if not isinstance(value, str):
                    raise TypeError
            else:
                value = _number(value, param.kind)
        except (TypeError, ValueError, OverflowError):
            raise ToolError(f"{spec.name}: {param.name!r} must be {_KIND_WORDS[param.kind]}, got {value!r}") from None
        out[param.name] = value
    return out


class RepoTools:
    """The built-in agent's tools over one repository (see the module docstring).

    Args:
        root: the repository's top-level directory.
        command_timeout: longest ``run_command``, seconds.
        output_chars: longest tool result, characters.
        time_left: returns the seconds left before the loop's wall-time limit (caps ``run_command``).
        record: names the process group of a running ``run_command`` (see :class:`~lifecycle_agent.ralph.shell.GroupRecord`).

    Every result fits in ``output_chars`` characters.
    """

    def __init__(
        self,
        root: Path,
        *,
        command_timeout: float = 60.0,
        output_chars: int = 4000,
        time_left: Optional[Callable[[], float]] = None,
        record: Optional[GroupRecord] = None,
    ):
        self.root = Path(root).resolve()
        self.command_timeout = command_timeout
        self.output_chars = output_chars
        self.time_left = time_left or (lambda: float("inf"))
        self.record = record

    # ------------------------------------------------------------ confinement
    def resolve(self, path: Any) -> Path:
        """The real path of ``path`` inside the repository, or :class:`ToolError` saying why not."""
        if not isinstance(path, str) or not path.strip():
            raise ToolError("path must be a non-empty string, relative to the repository root")
        raw = path.strip()
        if "\0" in raw:
            raise ToolError(f"path {raw!r} refused: it holds a NUL character; give a plain relative path")
        if os.path.isabs(raw) or raw.startswith("~"):
            raise ToolError(f"path {raw!r} refused: absolute paths are not allowed; give a path relative to the repository root")
        parts = Path(raw).parts
        if ".." in parts:
            raise ToolError(f"path {raw!r} refused: '..' is not allowed; give a path inside the repository")
        try:
            real = (self.root / raw).resolve()
        except (RuntimeError, OSError) as exc:  # a symlink loop ("Symlink loop from ..."), an unreadable link
            raise ToolError(f"path {raw!r} cannot be followed: {exc}") from None
        if real != self.root and self.root not in real.parents:
            raise ToolError(f"path {raw!r} refused: it leads outside the repository (through a symlink)")
        relative = real.relative_to(self.root).parts
        for first in (relative[:1], tuple(p for p in parts if p != ".")[:1]):
            if first and first[0] in PROTECTED:
                raise ToolError(f"path {raw!r} refused: {first[0]}/ belongs to git and the loop, not to the agent")
        return real

    def _relative(self, real: Path) -> str:
        return real.relative_to(self.root).as_posix() or "."

    def _git_files(self, under: Path) -> list[str]:
        """Tracked and untracked, not ignored, files under a directory (relative to the root)."""
        from .gitrepo import GitRepo

        rel = self._relative(under)
        out = GitRepo(self.root).git("ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", rel)
        return sorted({f for f in out.split("\0") if f and f.split("/", 1)[0] not in PROTECTED})

    # ------------------------------------------------------------ dispatch
    def call(self, call: ToolCall) -> str:
        """Carry out one tool call; problems come back as ``error: ...`` text for the agent."""
        spec = SPECS.get(call.name)
        if spec is None or call.name == DONE:
            names = ", ".join(SPECS)
            return f"error: unknown tool {call.name!r}; the tools are: {names}"
        try:
            args = _coerce(spec, call.args)
            result = getattr(self, call.name)(**args)
        except ToolError as exc:
            return f"error: {exc}"
        except OSError as exc:
            return f"error: {call.name} failed: {exc.strerror or exc}"
        except (ValueError, OverflowError, TypeError) as exc:  # an argument the tool cannot use
            return f"error: {call.name} failed: {exc}; check its arguments, example: {json.dumps(spec.example)}"
        except RuntimeError as exc:  # e.g. a symlink loop met while walking the repository: never ends the loop
            return f"error: {call.name} failed: {exc}"
        return trim(result, self.output_chars)

    # ------------------------------------------------------------ the tools
    def list_files(self, path: str = ".") -> str:
        real = self.resolve(path)
        if not real.exists():
            raise ToolError(f"{path!r} does not exist")
        if real.is_file():
            return self._relative(real)
        files = self._git_files(real)
        if not files:
            return f"(no files under {self._relative(real)})"
        shown = files[:MAX_LIST_ENTRIES]
        more = f"\n... and {len(files) - len(shown)} more" if len(files) > len(shown) else ""
        return "\n".join(shown) + more

    def read_file(self, path: str, start: Optional[int] = None, end: Optional[int] = None) -> str:
        real = self.resolve(path)
        if not real.is_file():
            raise ToolError(f"{path!r} is not a file" if real.exists() else f"{path!r} does not exist")
        data = real.read_bytes()
        if b"\0" in data[:8192]:
            raise ToolError(f"{path!r} is a binary file ({len(data)} bytes)")
        lines = data.decode("utf-8", errors="replace").splitlines()
        first = max(1, start or 1)
        last = min(len(lines), end or len(lines))
        body = "\n".join(lines[first - 1 : last])
        header = f"{self._relative(real)} (lines {first}-{last} of {len(lines)})"
        room = self.output_chars - len(header) - 1
        if len(body) > room:
            marker = "\n[... cut: read on with start/end ...]"
            body = body[: max(room - len(marker), 0)] + marker
        return f"{header}\n{body}"

    def search(self, pattern: str, path: str = ".", regex: bool = False) -> str:
        real = self.resolve(path)
        if not real.exists():
            raise ToolError(f"{path!r} does not exist")
        deadline = time.monotonic() + SEARCH_TIMEOUT_S
        if regex:
            import regex as regex_engine  # the stdlib engine cannot be stopped; this one takes a timeout

            try:
                compiled = regex_engine.compile(pattern)
            except regex_engine.error as exc:
                raise ToolError(f"invalid regular expression {pattern!r}: {exc}") from None

            def matcher(line: str):
                try:
                    return compiled.search(line, timeout=max(deadline - time.monotonic(), 0.001))
                except TimeoutError:
                    raise ToolError(
                        f"the regular expression {pattern!r} took more than {SEARCH_TIMEOUT_S:g} s (catastrophic "
                        "backtracking?); simplify it or search for plain text"
                    ) from None
        else:
            matcher = lambda line: pattern in line  # noqa: E731
        files = [self._relative(real)] if real.is_file() else self._git_files(real)
        matches: list[str] = []
        for rel in files:
            try:
                target = self.resolve(rel)
            except ToolError:  # a symlink leading out: never read through it
                continue
            if not target.is_file() or target.stat().st_size > MAX_SEARCH_FILE_BYTES:
                continue
            data = target.read_bytes()
            if b"\0" in data[:8192]:
                continue
            for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1):
                if matcher(line):
                    matches.append(f"{rel}:{number}: {line.strip()[:200]}")
                    if len(matches) >= MAX_SEARCH_MATCHES:
                        return "\n".join(matches) + f"\n... (stopped at {MAX_SEARCH_MATCHES} matches)"
        return "\n".join(matches) if matches else f"no match for {pattern!r}"

    def write_file(self, path: str, content: str) -> str:
        real = self.resolve(path)
        if real.is_dir():
            raise ToolError(f"{path!r} is a directory")
        real.parent.mkdir(parents=True, exist_ok=True)
        real.write_text(content, encoding="utf-8")
        return f"wrote {self._relative(real)} ({len(content.splitlines())} lines, {len(content)} characters)"

    def edit_file(self, path: str, old: str, new: str) -> str:
        real = self.resolve(path)
        if not real.is_file():
            raise ToolError(f"{path!r} does not exist; create it with write_file")
        if not old:
            raise ToolError("'old' must not be empty; use write_file to replace a whole file")
        text = real.read_text(encoding="utf-8", errors="replace")
        count = text.count(old)
        if count == 0:
            raise ToolError(f"the old text was not found in {path!r}; read the file and copy the exact text")
        if count > 1:
            raise ToolError(f"the old text occurs {count} times in {path!r}; include more surrounding lines so it is unique")
        real.write_text(text.replace(old, new, 1), encoding="utf-8")
        return f"edited {self._relative(real)}"

    def run_command(self, command: str, timeout: Optional[float] = None) -> str:
        if not command.strip():
            raise ToolError("command must not be empty")
        if timeout is not None and timeout <= 0:
            raise ToolError(f"timeout must be a number of seconds > 0, got {timeout:g}")
        limit = min(timeout or self.command_timeout, self.command_timeout, self.time_left())
        if limit <= 0:
            raise ToolError("not run: the loop's wall-time limit is reached")
        started = time.monotonic()
        result = run_shell(command, self.root, timeout=limit, record=self.record)
        most = self.output_chars // 4  # a long command is shown cut, so that most of the room is left for the output
        shown = command if len(command) <= most else command[: most - 3] + "..."
        head = f"$ {shown}\n{result.verdict()} in {time.monotonic() - started:.1f} s"
        return f"{head}\n{trim(result.output, self.output_chars - len(head) - 1)}"


def tool_list() -> str:
    """The tool lines shown in the agent's instructions."""
    return "\n".join(spec.line() for spec in SPECS.values())
