"""``terminal``: small file chores in a simulated shell whose quirks only the pack knows.

Each pack hides where the app keeps its config, log and lock files, and which commands
misbehave on this machine (``cat`` is not permitted, ``find`` or ``grep`` is missing,
``rm`` refuses write-protected files without ``-f``). Every task is a new chore: read a
setting, count errors in the log, remove a stale lock, back up the config. An agent that
notes the layout and the quirks does later chores in one or two commands.

The shell is a simulation over an in-memory file tree: a command line is split with
:mod:`shlex` and each command is a Python function. Nothing a model writes is run by a
real shell. Reward ``1 - 0.1 * commands / max_turns`` when the chore is done (or the
answer is right); 0 for a wrong answer or when the commands run out.

Nothing states where the app's files are, what they hold or how the machine misbehaves
unless the agent's own commands showed it: the final feedback gives the outcome only.
The ``easy`` preset (``hints``) adds, as a curriculum, the file the chore was about, the
value asked for and a note on every quirk the agent ran into.
"""

from __future__ import annotations

import fnmatch
import posixpath
import random
import re
import shlex
from typing import Any, Callable, Optional

from ..tasks import StepResult
from .base import Environment, EnvTask, Pack
from .parsing import code_blocks, inline_code, labelled, nonempty_lines, shorten, strip_markup

HOME = "/home/deploy"
ROOTS = ("/srv/app", "/opt/service", "/home/deploy/app", "/var/lib/webapp")
CONFIG_PLACES = ("conf/app.ini", "etc/settings.conf", "config/service.cfg", "settings/main.ini")
LOG_PLACES = ("/var/log/app/app.log", "{root}/logs/current.log", "/tmp/app-logs/app.log", "{root}/var/log/events.log")
LOCK_PLACES = ("/var/run/app/app.lock", "{root}/run/app.lock", "/tmp/app.lock", "{root}/tmp/app.lock")
QUIRKS = ("cat_denied", "find_missing", "grep_missing", "rm_needs_force")
QUIRK_NOTES = {
    "cat_denied": "On this machine `cat` is not permitted; `head -n 50 FILE` or `less FILE` read files.",
    "find_missing": "This machine has no `find`; use `ls -R DIR` to look through a tree.",
    "grep_missing": "This machine has no `grep`; read the file with `head -n 50 FILE` and count by eye.",
    "rm_needs_force": "Here `rm` refuses write-protected files unless you pass `-f`.",
}
CHORES = ("port", "errors", "lock", "user", "backup")
USERS = ("svc-app", "deploy", "www", "appuser", "runner", "daemon2")
COMMANDS = (
    "ls", "cd", "pwd", "cat", "less", "more", "head", "tail", "grep", "find", "wc", "rm", "cp", "mv", "touch",
    "mkdir", "echo", "help", "sudo", "answer",
)
MAX_OUTPUT_LINES = 20
_PROMPT_LINE = re.compile(r"^\s*(?:\$|#|>|bash\$|deploy@\S*\$)\s+(.+)$")
_EMBEDDED = re.compile(r"\b(" + "|".join(c for c in COMMANDS if c not in ("answer", "help", "more", "less", "sudo")) + r")\s+([-/~.].*)$")
_ANSWER = re.compile(r"^[\s>*#_`-]*(?:final\s+)?answer\s*[*_`]*\s*[:=]?\s*(.+?)\s*$", re.IGNORECASE | re.MULTILINE)


def parse_command(reply: str) -> tuple[Optional[str], Optional[str]]:
    """``("answer", value)``, ``("command", line)`` or ``(None, None)``.

    Preference: the first line of a code block, a ``$ cmd`` line, a ``Command:``/``Action:``
    line, an ``answer ...``/``Answer: ...`` line, the first line starting with a known
    command name, inline code starting with one, and last a known command followed by a
    path or flag inside a sentence ("I'll run grep -c ERROR /var/log/x.log").
    """
    candidates: list[str] = []
    blocks = code_blocks(reply)
    if blocks:
        candidates.append(nonempty_lines(blocks[0])[0])
    lines = nonempty_lines(reply)
    candidates += [m.group(1) for m in (_PROMPT_LINE.match(line) for line in lines) if m]
    label = labelled(reply)
    if label and not re.match(r"^[\s>*#_`-]*(?:final\s+)?answer", _last_label_line(reply), re.IGNORECASE):
        candidates.append(label)
    for text in candidates:
        text = _PROMPT_LINE.sub(r"\1", _clean(text)).strip()
        if text:
            return _classify(text)
    answer = _ANSWER.findall(reply or "")
    if answer:
        return "answer", strip_markup(answer[-1])
    for text in [_clean(line) for line in lines] + inline_code(reply):
        if text.split(" ", 1)[0] in COMMANDS:
            return _classify(text)
    for line in lines:
        found = _EMBEDDED.search(line)
        if found:
            return "command", _clean(found.group(0)).rstrip(".")
    return None, None


def _clean(text: str) -> str:
    """A command line without surrounding markdown (quotes are kept: they belong to the command).

    A ``*`` is stripped from the end only in a pair with one at the start (``**ls /srv**``): a
    command may end in a glob (``ls /srv/*``).
    """
    text = text.strip().strip("`").strip()
    while len(text) >= 2 and text[0] == "*" and text[-1] == "*":
        text = text[1:-1].strip()
    return text.lstrip("*").strip()  # a list bullet; no command starts with *


def _last_label_line(reply: str) -> str:
    for line in reversed(nonempty_lines(reply)):
        if labelled(line) is not None:
            return line
    return ""


def _classify(text: str) -> tuple[str, str]:
    head, _, rest = text.partition(" ")
    if head.lower() in ("answer", "answer:"):
        return "answer", strip_markup(rest)
    return "command", text


def _glob_match(path: str, pattern: str) -> bool:
    """Shell globbing: ``*``, ``?`` and ``[...]`` match within one path segment, never across ``/``."""
    parts, wanted = path.split("/"), pattern.split("/")
    return len(parts) == len(wanted) and all(fnmatch.fnmatchcase(p, w) for p, w in zip(parts, wanted))


#: Largest file the simulated disk holds, and the whole tree (characters): beyond, "No space left on device".
MAX_FILE_CHARS = 64_000
MAX_TREE_CHARS = 1_000_000
#: Most commands one reply may chain (``;``, ``&&``, ``||``, ``|``).
MAX_COMMANDS_PER_LINE = 8


class Shell:
    """A tiny simulated shell over an in-memory file tree (see the module docstring)."""

    def __init__(self, files: dict[str, str], protected: set[str], quirks: tuple[str, ...], cwd: str = HOME):
        self.files = dict(files)
        self.dirs = {"/", "/tmp", "/var/run", "/usr/bin", HOME}
        for path in list(files) + list(self.dirs):
            self._add_parents(path)
        self.protected = set(protected)
        self.quirks = set(quirks)
        self.cwd = cwd
        self.hit: set[str] = set()
        self._commands: dict[str, Callable] = {
            "ls": self._ls, "cd": self._cd, "pwd": self._pwd, "cat": self._cat, "less": self._less, "more": self._less,
            "head": self._head, "tail": self._tail, "grep": self._grep, "find": self._find, "wc": self._wc,
            "rm": self._rm, "cp": self._cp, "mv": self._mv, "touch": self._touch, "mkdir": self._mkdir,
            "echo": self._echo, "help": self._help,
        }

    # ---------------------------------------------------------------- plumbing
    def _add_parents(self, path: str) -> None:
        parent = posixpath.dirname(path)
        while parent not in self.dirs:
            self.dirs.add(parent)
            parent = posixpath.dirname(parent)

    def resolve(self, path: str) -> str:
        if path == "~" or path.startswith("~/"):
            path = HOME + path[1:]
        return posixpath.normpath(posixpath.join(self.cwd, path)).replace("//", "/")

    def _glob(self, args: list[str]) -> list[str]:
        out = []
        for arg in args:
            if any(ch in arg for ch in "*?[") and not arg.startswith("-"):
                pattern = self.resolve(arg)
                matches = sorted(p for p in list(self.files) + list(self.dirs) if _glob_match(p, pattern))
                out += matches or [arg]
            else:
                out.append(arg)
        return out

    def run(self, line: str) -> str:
        """Run one command line (pipes ``|``, ``;``, ``&&``, ``>``/``>>`` understood) and return its output."""
        try:
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            tokens = list(lexer)
        except ValueError as exc:
            return f"bash: syntax error: {exc}"
        output: list[str] = []
        status = 0
        sequence: list[list[str]] = [[]]
        joiners: list[str] = []
        for token in tokens:
            if token in (";", "&&", "||"):
                joiners.append(token)
                sequence.append([])
            else:
                sequence[-1].append(token)
        if len(sequence) + tokens.count("|") > MAX_COMMANDS_PER_LINE:
            return f"bash: at most {MAX_COMMANDS_PER_LINE} commands per line, please"
        for index, part in enumerate(sequence):
            if index and ((joiners[index - 1] == "&&" and status) or (joiners[index - 1] == "||" and not status)):
                continue
            if not part:
                continue
            text, status = self._pipeline(part)
            if text:
                output.append(text)
        return _truncate("\n".join(output))

    def _pipeline(self, tokens: list[str]) -> tuple[str, int]:
        stages: list[list[str]] = [[]]
        for token in tokens:
            if token == "|":
                stages.append([])
            else:
                stages[-1].append(token)
        stdin: Optional[str] = None
        errors: list[str] = []
        status = 0
        for stage in stages:
            if not stage:
                return "bash: syntax error near unexpected token `|'", 2
            redirect, mode = None, None
            if len(stage) >= 2 and stage[-2] in (">", ">>"):
                redirect, mode, stage = stage[-1], stage[-2], stage[:-2]
            if stage and stage[0] == "sudo":
                stage = stage[1:]
            if not stage:
                return "bash: syntax error: missing command", 2
            name, args = stage[0], self._glob(stage[1:])
            if name in ("find", "grep") and f"{name}_missing" in self.quirks:
                self.hit.add(f"{name}_missing")
                out, err, status = "", f"bash: {name}: command not found", 127
            elif name not in self._commands:
                out, err, status = "", f"bash: {name}: command not found", 127
            else:
                out, err, status = self._commands[name](args, stdin)
            if err:
                errors.append(err)
            if redirect is not None:
                path = self.resolve(redirect)
                if posixpath.dirname(path) not in self.dirs:
                    errors.append(f"bash: {redirect}: No such file or directory")
                    status = 1
                else:
                    content = (self.files.get(path, "") if mode == ">>" else "") + out
                    tree = sum(len(text) for p, text in self.files.items() if p != path) + len(content)
                    if len(content) > MAX_FILE_CHARS or tree > MAX_TREE_CHARS:
                        errors.append(f"bash: {redirect}: No space left on device")
                        status = 1
                    else:
                        self.files[path] = content
                out = ""
            stdin = out
        text = "\n".join(part for part in ([stdin.rstrip("\n")] if stdin else []) + errors if part)
        return text, status

    def _read(self, name: str, path_arg: str) -> tuple[Optional[str], str]:
        path = self.resolve(path_arg)
        if path in self.dirs:
            return None, f"{name}: {path_arg}: Is a directory"
        if path not in self.files:
            return None, f"{name}: {path_arg}: No such file or directory"
        return self.files[path], ""

    def _inputs(self, name: str, paths: list[str], stdin: Optional[str]) -> tuple[list[str], list[str]]:
        if not paths:
            return [stdin or ""], []
        texts, errors = [], []
        for arg in paths:
            text, err = self._read(name, arg)
            if err:
                errors.append(err)
            else:
                texts.append(text)
        return texts, errors

    # ---------------------------------------------------------------- commands: (args, stdin) -> (out, err, status)
    def _help(self, args, stdin):
        return "commands: " + " ".join(sorted(self._commands)) + "; pipes | and redirection > work", "", 0

    def _pwd(self, args, stdin):
        return self.cwd + "\n", "", 0

    def _cd(self, args, stdin):
        target = self.resolve(args[0]) if args else HOME
        if target not in self.dirs:
            kind = "Not a directory" if target in self.files else "No such file or directory"
            return "", f"bash: cd: {args[0]}: {kind}", 1
        self.cwd = target
        return "", "", 0

    def _ls(self, args, stdin):
        flags = "".join(a[1:] for a in args if a.startswith("-"))
        paths = [a for a in args if not a.startswith("-")] or ["."]
        show_all, recursive, long = "a" in flags, "R" in flags, "l" in flags
        out, errors = [], []
        for arg in paths:
            path = self.resolve(arg)
            if path in self.files:
                out.append(arg)
                continue
            if path not in self.dirs:
                errors.append(f"ls: cannot access '{arg}': No such file or directory")
                continue
            # (``/`` starts with ``/`` + ``/`` stripped: leave the directory itself out of its own subtree)
            below = sorted(d for d in self.dirs if d != path and d.startswith(path.rstrip("/") + "/"))
            for directory in ([path] + below) if recursive else [path]:
                if recursive or len(paths) > 1:
                    out.append(f"{directory}:")
                out.append(self._listing(directory, show_all, long))
        return "\n".join(line for line in out if line) + "\n", "\n".join(errors), 1 if errors else 0

    def _listing(self, directory: str, show_all: bool, long: bool) -> str:
        prefix = directory.rstrip("/") + "/"
        children = sorted(
            {p[len(prefix):].split("/", 1)[0] for p in list(self.files) + list(self.dirs) if p.startswith(prefix) and p != directory}
        )
        if not show_all:
            children = [c for c in children if not c.startswith(".")]
        shown = []
        for child in children:
            full = prefix + child
            if long:
                size = len(self.files[full]) if full in self.files else 4096
                mode = "d" if full in self.dirs else "-"
                shown.append(f"{mode}rw-r--r-- {size:>6} {child}")
            else:
                shown.append(child + ("/" if full in self.dirs else ""))
        return ("\n" if long else "  ").join(shown)

    def _cat(self, args, stdin):
        paths = [a for a in args if not a.startswith("-")]
        if "cat_denied" in self.quirks:
            self.hit.add("cat_denied")
            return "", "\n".join(f"cat: {p}: Permission denied" for p in paths) or "cat: Permission denied", 1
        texts, errors = self._inputs("cat", paths, stdin)
        return "".join(texts), "\n".join(errors), 1 if errors else 0

    def _less(self, args, stdin):
        texts, errors = self._inputs("less", [a for a in args if not a.startswith("-")], stdin)
        return "".join(texts), "\n".join(errors), 1 if errors else 0

    def _count_and_paths(self, args) -> tuple[int, list[str]]:
        count, paths, i = 10, [], 0
        while i < len(args):
            arg = args[i]
            if arg == "-n" and i + 1 < len(args) and args[i + 1].lstrip("-").isdigit():
                count, i = abs(int(args[i + 1])), i + 2
                continue
            if re.fullmatch(r"-n?\d+", arg):
                count = int(arg.lstrip("-n"))
            elif not arg.startswith("-"):
                paths.append(arg)
            i += 1
        return count, paths

    def _head(self, args, stdin):
        count, paths = self._count_and_paths(args)
        texts, errors = self._inputs("head", paths, stdin)
        out = "".join("".join(t.splitlines(keepends=True)[:count]) for t in texts)
        return out, "\n".join(errors), 1 if errors else 0

    def _tail(self, args, stdin):
        count, paths = self._count_and_paths(args)
        texts, errors = self._inputs("tail", paths, stdin)
        out = "".join("".join(t.splitlines(keepends=True)[-count:]) for t in texts)
        return out, "\n".join(errors), 1 if errors else 0

    def _grep(self, args, stdin):
        flags = "".join(a[1:] for a in args if a.startswith("-") and len(a) > 1)
        rest = [a for a in args if not (a.startswith("-") and len(a) > 1)]
        if not rest:
            return "", "usage: grep [-icnrvl] PATTERN [FILE...]", 2
        pattern, paths = rest[0], rest[1:]
        # Fixed-string matching (like grep -F): a model's pattern is never compiled as a regex,
        # so no reply can trigger catastrophic backtracking.
        regex = re.compile(re.escape(pattern[:200]), re.IGNORECASE if "i" in flags else 0)
        sources: list[tuple[str, str]] = []
        errors = []
        if not paths:
            sources.append(("", stdin or ""))
        for arg in paths:
            path = self.resolve(arg)
            if path in self.dirs:
                if "r" not in flags and "R" not in flags:
                    errors.append(f"grep: {arg}: Is a directory")
                    continue
                sources += [(p, self.files[p]) for p in sorted(self.files) if p.startswith(path.rstrip("/") + "/")]
            elif path in self.files:
                sources.append((arg, self.files[path]))
            else:
                errors.append(f"grep: {arg}: No such file or directory")
        many = len(sources) > 1
        out, found = [], False
        for name, text in sources:
            lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if bool(regex.search(line)) != ("v" in flags)]
            found = found or bool(lines)
            label = f"{name}:" if many and name else ""
            if "l" in flags:
                if lines:
                    out.append(name)
            elif "c" in flags:
                out.append(f"{label}{len(lines)}")
            else:
                out += [f"{label}{f'{n}:' if 'n' in flags else ''}{line}" for n, line in lines]
        text = "\n".join(out) + ("\n" if out else "")
        return text, "\n".join(errors), 0 if found else 1

    def _find(self, args, stdin):
        root = args[0] if args and not args[0].startswith("-") else "."
        options = args[1:] if args and not args[0].startswith("-") else args
        name, kind = None, None
        for i, arg in enumerate(options[:-1]):
            if arg in ("-name", "-iname"):
                name = (options[i + 1], arg == "-iname")
            if arg == "-type":
                kind = options[i + 1]
        base = self.resolve(root)
        if base not in self.dirs:
            return "", f"find: '{root}': No such file or directory", 1
        prefix = base.rstrip("/") + "/"
        paths = sorted(p for p in list(self.files) + list(self.dirs) if p == base or p.startswith(prefix))
        out = []
        for path in paths:
            if kind == "f" and path not in self.files or kind == "d" and path not in self.dirs:
                continue
            leaf = posixpath.basename(path) or "/"
            if name is not None:
                pattern, fold = name
                if not (fnmatch.fnmatch(leaf.lower(), pattern.lower()) if fold else fnmatch.fnmatchcase(leaf, pattern)):
                    continue
            out.append(path)
        return "\n".join(out) + ("\n" if out else ""), "", 0

    def _wc(self, args, stdin):
        flags = "".join(a[1:] for a in args if a.startswith("-"))
        paths = [a for a in args if not a.startswith("-")]
        counted: list[tuple[str, str]] = []  # (label, text) of every input that could be read
        errors = []
        for label in paths or [""]:
            texts, failed = self._inputs("wc", [label] if label else [], stdin)
            errors += failed
            counted += [(label, text) for text in texts]
        if len(counted) > 1:
            counted.append(("total", "".join(text for _, text in counted)))
        out = []
        for label, text in counted:
            counts = {"l": text.count("\n"), "w": len(text.split()), "c": len(text)}
            shown = [str(counts[f]) for f in "lwc" if f in flags] or [str(counts[f]) for f in "lwc"]
            out.append(" ".join(shown + ([label] if label else [])))
        return "\n".join(out) + ("\n" if out else ""), "\n".join(errors), 1 if errors else 0

    def _rm(self, args, stdin):
        flags = "".join(a[1:] for a in args if a.startswith("-"))
        errors = []
        for arg in [a for a in args if not a.startswith("-")]:
            path = self.resolve(arg)
            if path in self.dirs:
                if "r" not in flags and "R" not in flags:
                    errors.append(f"rm: cannot remove '{arg}': Is a directory")
                    continue
                inside = [p for p in self.files if p.startswith(path.rstrip("/") + "/")]
                guarded = [p for p in inside if p in self.protected and "rm_needs_force" in self.quirks and "f" not in flags]
                if guarded:
                    self.hit.add("rm_needs_force")
                    errors += [f"rm: cannot remove '{p}': write-protected regular file (use -f to force)" for p in guarded]
                    continue
                for p in inside:
                    del self.files[p]
                self.dirs = {d for d in self.dirs if not (d == path or d.startswith(path.rstrip("/") + "/"))}
            elif path in self.files:
                if path in self.protected and "rm_needs_force" in self.quirks and "f" not in flags:
                    self.hit.add("rm_needs_force")
                    errors.append(f"rm: cannot remove '{arg}': write-protected regular file (use -f to force)")
                    continue
                del self.files[path]
            elif "f" not in flags:
                errors.append(f"rm: cannot remove '{arg}': No such file or directory")
        return "", "\n".join(errors), 1 if errors else 0

    def _target(self, source: str, dest_arg: str) -> str:
        dest = self.resolve(dest_arg)
        return posixpath.join(dest, posixpath.basename(source)) if dest in self.dirs else dest

    def _cp(self, args, stdin, move: bool = False):
        name = "mv" if move else "cp"
        paths = [a for a in args if not a.startswith("-")]
        if len(paths) != 2:
            return "", f"{name}: expected a source and a destination", 1
        text, err = self._read(name, paths[0])
        if err:
            return "", err, 1
        dest = self._target(self.resolve(paths[0]), paths[1])
        if posixpath.dirname(dest) not in self.dirs:
            return "", f"{name}: cannot create '{paths[1]}': No such file or directory", 1
        self.files[dest] = text
        if move and dest != self.resolve(paths[0]):
            del self.files[self.resolve(paths[0])]
        return "", "", 0

    def _mv(self, args, stdin):
        return self._cp(args, stdin, move=True)

    def _touch(self, args, stdin):
        for arg in [a for a in args if not a.startswith("-")]:
            path = self.resolve(arg)
            if posixpath.dirname(path) not in self.dirs:
                return "", f"touch: cannot touch '{arg}': No such file or directory", 1
            self.files.setdefault(path, "")
        return "", "", 0

    def _mkdir(self, args, stdin):
        parents = any(a.startswith("-") and "p" in a for a in args)
        for arg in [a for a in args if not a.startswith("-")]:
            path = self.resolve(arg)
            if posixpath.dirname(path) not in self.dirs and not parents:
                return "", f"mkdir: cannot create directory '{arg}': No such file or directory", 1
            self.dirs.add(path)
            self._add_parents(path + "/x")
        return "", "", 0

    def _echo(self, args, stdin):
        return " ".join(args) + "\n", "", 0


def _truncate(text: str) -> str:
    lines = text.splitlines()
    if len(lines) <= MAX_OUTPUT_LINES:
        return text
    return "\n".join(lines[:MAX_OUTPUT_LINES] + [f"... ({len(lines) - MAX_OUTPUT_LINES} more lines)"])


class TerminalTask(EnvTask):
    def __init__(self, pack: Pack, index: int, task_id: str):
        super().__init__(pack, index, task_id)
        self.max_turns = pack.env.options["max_turns"]
        self.hints = pack.env.options["hints"]
        hidden = pack.hidden
        self.config, self.log, self.lock = hidden["config"], hidden["log"], hidden["lock"]
        self.quirks: tuple[str, ...] = tuple(hidden["quirks"])
        rng = pack.instance_rng(index)
        self.chore = CHORES[(index + hidden["chore_offset"]) % len(CHORES)]
        self.port = str(rng.randint(1025, 9999))
        self.user = rng.choice(USERS)
        self.log_text, self.error_count = _make_log(rng)
        self.files = _make_files(hidden, self.port, self.user, self.log_text, rng)
        self._reset()

    def _reset(self) -> None:
        files = dict(self.files)
        protected: set[str] = set()
        if self.chore == "lock":
            files[self.lock] = "pid 4242\n"
            protected.add(self.lock)
        self.shell = Shell(files, protected, self.quirks)
        self.original_files = frozenset(files)
        self.turns = 0

    @property
    def answer(self) -> Optional[str]:
        return {"port": self.port, "user": self.user, "errors": str(self.error_count)}.get(self.chore)

    def describe_chore(self) -> str:
        return {
            "port": "Which port does the app listen on? Its config file says. Reply `answer <port>`.",
            "user": "Which user does the app run as (the `user` setting in its config file)? Reply `answer <user>`.",
            "errors": "How many lines of the app's log file contain ERROR? Reply `answer <count>`.",
            "lock": "The app will not start because of a stale lock file, app.lock. Remove it.",
            "backup": "Back up the app's config file: copy it into the same directory under the same name plus `.bak`.",
        }[self.chore]

    def start(self) -> str:
        self._reset()
        return (
            f"You are logged in as deploy in {HOME}. Chore: {self.describe_chore()}\n"
            f"Reply with one shell command per turn. {self.max_turns} commands left."
        )

    def _collateral_damage(self) -> list[str]:
        """Files of the original machine that are gone, other than the one the chore removes."""
        allowed = {self.lock} if self.chore == "lock" else set()
        return sorted(p for p in self.original_files if p not in self.shell.files and p not in allowed)

    def _done(self) -> bool:
        files = self.shell.files
        if self.chore == "lock":
            return self.lock not in files
        if self.chore == "backup":
            return files.get(self.config + ".bak") == files.get(self.config) and self.config in files
        return False

    def _facts(self) -> str:
        """The curriculum hint of the ``easy`` preset (layout, value, quirks met); '' without ``hints``."""
        if not self.hints:
            return ""
        facts = {
            "port": f"The app's config file is {self.config}; it sets port = {self.port}.",
            "user": f"The app's config file is {self.config}; it sets user = {self.user}.",
            "errors": f"The app's log file is {self.log}; it has {self.error_count} ERROR lines.",
            "lock": f"The app's lock file is {self.lock}.",
            "backup": f"The app's config file is {self.config}; the backup goes to {self.config}.bak.",
        }[self.chore]
        notes = [QUIRK_NOTES[q] for q in QUIRKS if q in self.shell.hit]
        return " " + " ".join([facts] + notes)

    def _success(self) -> StepResult:
        reward = 1.0 - 0.1 * self.turns / self.max_turns
        return StepResult(
            "", reward, True,
            f"Chore done with {self.turns} command{'s' if self.turns != 1 else ''}; reward {reward:.3f}.{self._facts()}",
        )

    def step(self, action: str) -> StepResult:
        self.turns += 1
        kind, text = parse_command(action)
        if kind == "answer":
            if self.answer is None:
                note = "This chore needs no answer; it is checked on the machine itself."
            elif text.strip().strip(".").lower() == self.answer.lower():
                return self._success()
            else:
                return StepResult("", 0.0, True, f"Wrong answer {shorten(text, 40)!r}; reward 0.{self._facts()}")
            output = note
        elif kind == "command":
            output = self.shell.run(text)
            lost = self._collateral_damage()
            if lost:
                # a glob may have removed files the agent never saw: name them only as the easy preset's hint
                shown = ", ".join(lost[:3]) + (f" and {len(lost) - 3} more" if len(lost) > 3 else "")
                what = f" ({shown})" if self.hints else f" ({len(lost)} file{'s' if len(lost) != 1 else ''})"
                return StepResult(
                    "", 0.0, True,
                    f"That command removed files the chore did not ask to touch{what}; the chore failed, reward 0.{self._facts()}",
                )
            if self._done():
                return self._success()
            output = f"$ {text}\n{output}" if output else f"$ {text}\n(no output)"
        else:
            output = f"I could not find a shell command in {shorten(action, 60)!r}. Reply with one command, e.g. `ls /`."
        if self.turns >= self.max_turns:
            return self.timeout_result()
        left = self.max_turns - self.turns
        return StepResult(f"{output}\n[{left} command{'s' if left != 1 else ''} left]", None, False, None)

    def timeout_result(self) -> StepResult:
        return StepResult("", 0.0, True, f"The {self.max_turns} commands ran out before the chore was done; reward 0.{self._facts()}")

    def oracle_plan(self) -> list[str]:
        """The shortest command sequence for someone who knows the pack's layout and quirks."""
        reader = "head -n 50" if "cat_denied" in self.quirks else "cat"
        if self.chore in ("port", "user"):
            return [f"{reader} {self.config}", f"answer {self.answer}"]
        if self.chore == "errors":
            look = f"{reader} {self.log}" if "grep_missing" in self.quirks else f"grep -c ERROR {self.log}"
            return [look, f"answer {self.answer}"]
        if self.chore == "lock":
            return [f"rm -f {self.lock}"]
        return [f"cp {self.config} {self.config}.bak"]

    def oracle_action(self) -> str:
        plan = self.oracle_plan()
        return f"```bash\n{plan[min(self.turns, len(plan) - 1)]}\n```"

    def optimum(self) -> float:
        return 1.0 - 0.1 * len(self.oracle_plan()) / self.max_turns


def _make_log(rng: random.Random) -> tuple[str, int]:
    events = [
        ("INFO", "worker started"), ("INFO", "request served in 12 ms"), ("WARN", "slow request: 950 ms"),
        ("ERROR", "database timeout"), ("ERROR", "upstream returned 502"), ("INFO", "cache refreshed"),
        ("ERROR", "disk quota exceeded"), ("INFO", "health check ok"), ("WARN", "retrying connection"),
    ]
    lines, errors = [], 0
    for i in range(rng.randint(6, 12)):
        level, text = rng.choice(events)
        errors += level == "ERROR"
        lines.append(f"2024-05-0{1 + i % 9} 12:{i:02d}:{rng.randint(0, 59):02d} {level} {text}")
    return "\n".join(lines) + "\n", errors


def _make_files(hidden: dict[str, Any], port: str, user: str, log_text: str, rng: random.Random) -> dict[str, str]:
    config = f"# app settings\n[server]\nhost = 0.0.0.0\nport = {port}\nuser = {user}\nworkers = {rng.randint(2, 8)}\n"
    files = {
        "/etc/hostname": "web-01\n",
        "/etc/hosts": "127.0.0.1 localhost\n",
        f"{HOME}/notes.txt": "todo: rotate logs, check backups\n",
        "/var/log/syslog": "May  1 12:00:00 web-01 systemd[1]: Started session.\n",
        hidden["config"]: config,
        hidden["log"]: log_text,
        f"{hidden['root']}/README": "The app. See its config directory for settings.\n",
        f"{hidden['root']}/bin/app": "#!/bin/sh\n",
    }
    for decoy in hidden["decoys"]:
        files[decoy] = f"# old settings, no longer used\nport = {rng.randint(1025, 9999)}\nuser = {rng.choice(USERS)}\n"
    return files


class Terminal(Environment):
    name = "terminal"
    description = "File chores in a simulated shell with per-pack hidden layout and misbehaving commands."
    defaults: dict[str, Any] = {"quirks": 1, "decoys": 1, "max_turns": 8, "hints": False}
    presets = {
        "train": {},
        "easy": {"quirks": 0, "decoys": 0, "max_turns": 10, "hints": True},
        "hard": {"quirks": 2, "decoys": 2, "max_turns": 7},
    }
    easy_hints = "the feedback names the chore's file, the value asked for and every quirk the commands ran into"

    def __init__(self, preset: str = "train", **options: Any):
        super().__init__(preset, **options)
        self._int_option("quirks", 0, len(QUIRKS))
        self._int_option("decoys", 0, len(CONFIG_PLACES) - 1)
        self._int_option("max_turns", 2, 30)
        self._bool_option("hints")

    def instructions(self) -> str:
        return (
            "You work in a Linux shell on a server (a simulation). Reply with exactly one shell command per turn, for "
            "example `ls /srv`; common commands work (ls, cd, cat, head, tail, grep, find, wc, rm, cp, mv, touch, "
            "mkdir, echo; pipes and >). When a chore asks a question, reply `answer <value>`. Where the app keeps its "
            "files and which commands misbehave on this machine stay the same for the whole series of tasks."
        )

    def hidden_facts(self, rng: random.Random) -> dict[str, Any]:
        root = rng.choice(ROOTS)
        places = list(CONFIG_PLACES)
        rng.shuffle(places)
        config = f"{root}/{places[0]}"
        decoys = [f"{root}/{place}.old" for place in places[1 : 1 + self.options["decoys"]]]
        return {
            "root": root,
            "config": config,
            "decoys": decoys,
            "log": rng.choice(LOG_PLACES).format(root=root),
            "lock": rng.choice(LOCK_PLACES).format(root=root),
            "quirks": sorted(rng.sample(QUIRKS, self.options["quirks"])),
            "chore_offset": rng.randrange(len(CHORES)),
        }

    def make_task(self, pack: Pack, index: int, task_id: str) -> TerminalTask:
        return TerminalTask(pack, index, task_id)

    has_reference_policy = True

    def reference_notes(self, notes: str, transcript: str, reward: Optional[float], feedback: Optional[str]) -> str:
        """Where the app's files are and which commands misbehave, as the agent's commands showed them."""
        return _Knowledge.read(notes + "\n" + transcript + "\n" + (feedback or "")).notes()

    def reference_reply(self, notes: str, messages: list[dict]) -> str:
        """The next command of a careful admin: look for the files it does not know, then do the chore."""
        return _reference_command(notes, messages)


# ---------------------------------------------------------------- the reference policy (observation only)
_PATH_LINE = re.compile(r"^(/[\w./-]+)$", re.MULTILINE)
#: A note line, and the easy preset's hint, name a file the same way: "The app's config file is PATH."
_FILE_NOTE = re.compile(r"The app's (config|log|lock) file is (/[\w./-]+?)[.;]?(?=\s|$)")
#: Quirk -> (what a command's output shows when it bites, the note that keeps it).
_QUIRK_SIGNS = {
    "cat_denied": (re.compile(r"^cat: .*Permission denied$", re.MULTILINE),
                   "- `cat` is not permitted here: read files with `head -n 50 FILE`."),
    "find_missing": (re.compile(r"bash: find: command not found"), "- There is no `find` here: list files with `ls` and globs."),
    "grep_missing": (re.compile(r"bash: grep: command not found"), "- There is no `grep` here: read the log with `head -n 50 FILE`."),
    "rm_needs_force": (re.compile(r"write-protected regular file"), "- `rm` needs `-f` for write-protected files here."),
}
#: Every file with a dot in its name, two to six levels deep (works without ``find``).
_GLOB_LISTING = "ls " + " ".join("/" + "/".join(["*"] * depth) + ".*" for depth in range(1, 6))
_CHORE_WORDS = (("port", "port does the app listen"), ("user", "user does the app run as"), ("errors", "contain ERROR"),
                ("lock", "stale lock file"), ("backup", "Back up the app's config"))


class _Knowledge:
    """What a text (notes, outputs, feedback) says about the machine: the app's files and the quirks met."""

    def __init__(self, files: dict[str, str], quirks: set[str]):
        self.files, self.quirks = files, quirks

    @classmethod
    def read(cls, text: str) -> "_Knowledge":
        files: dict[str, str] = {}
        for path in _PATH_LINE.findall(text):  # a listing: one path per line
            kind = _file_kind(path)
            if kind:
                files[kind] = path
        files.update({kind: path for kind, path in _FILE_NOTE.findall(text)})
        quirks = {q for q, (sign, note) in _QUIRK_SIGNS.items() if sign.search(text) or note in text}
        return cls(files, quirks)

    def notes(self) -> str:
        lines = [f"- The app's {kind} file is {self.files[kind]}." for kind in ("config", "log", "lock") if kind in self.files]
        return "\n".join(lines + [_QUIRK_SIGNS[q][1] for q in QUIRKS if q in self.quirks])

    def reader(self) -> str:
        return "head -n 50" if "cat_denied" in self.quirks else "cat"


def _file_kind(path: str) -> Optional[str]:
    """``config``, ``log`` or ``lock`` for a path that looks like the app's file of that kind (old copies are not)."""
    if path.endswith((".ini", ".conf", ".cfg")) and not path.startswith("/etc/"):
        return "config"
    return {".log": "log", ".lock": "lock"}.get(posixpath.splitext(path)[1])


def _reference_command(notes: str, messages: list[dict]) -> str:
    """The reference solver's next command (see :meth:`Terminal.reference_reply`)."""
    outputs = [str(m.get("content", "")) for m in messages if m.get("role") == "user"]
    if not outputs:
        return "```bash\nhelp\n```"
    know = _Knowledge.read(notes + "\n" + "\n".join(outputs))
    chore = next((name for name, words in _CHORE_WORDS if words in outputs[0]), None)
    last = outputs[-1] if len(outputs) > 1 else ""
    needs = {"port": "config", "user": "config", "backup": "config", "errors": "log", "lock": "lock"}.get(chore or "")
    command = _chore_step(chore, know, last) if needs in know.files else None
    if command is None:
        command = _GLOB_LISTING if "find_missing" in know.quirks else "find / -type f"
    return f"```bash\n{command}\n```"


def _chore_step(chore: str, know: _Knowledge, last: str) -> str:
    """The chore's next command once its file is known; ``last`` is the latest command's output."""
    if chore in ("port", "user"):
        value = re.search(rf"^{chore} = (\S+)$", last, re.MULTILINE)
        return f"answer {value.group(1)}" if value else f"{know.reader()} {know.files['config']}"
    if chore == "errors":
        count = re.fullmatch(r"\$ grep -c ERROR \S+\n(\d+)\n\[.*\]", last.strip())
        if count:
            return f"answer {count.group(1)}"
        lines = re.findall(r"^\d{4}-\d\d-\d\d \S+ (\w+) ", last, re.MULTILINE)
        if lines:
            return f"answer {lines.count('ERROR')}"
        if "grep_missing" in know.quirks:
            return f"{know.reader()} {know.files['log']}"
        return f"grep -c ERROR {know.files['log']}"
    if chore == "lock":
        return f"rm {'-f ' if 'rm_needs_force' in know.quirks else ''}{know.files['lock']}"
    return f"cp {know.files['config']} {know.files['config']}.bak"
