"""The git side of a Ralph loop, through the ``git`` command: status, changes, commits, stash.

Commits work on machines without a git identity (CI): when ``user.name`` or
``user.email`` is not configured, a fixed loop identity is used for that commit.
Every call runs with stdin closed and terminal prompts off, so git never waits for a person,
and SIGTERM or SIGHUP stops the loop only after it (:func:`~lifecycle_agent.ralph.signals.deferred`).
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .config import RalphError
from .signals import deferred

#: The id of git's empty tree: the "before" of a repository without commits.
EMPTY_TREE = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"
FALLBACK_NAME = "lifecycle-agent ralph"
FALLBACK_EMAIL = "ralph@lifecycle-agent.invalid"
AGENT_TRAILER = "Ralph-Agent"
ITERATION_TRAILER = "Ralph-Iteration"
GIT_TIMEOUT_S = 120.0


@dataclass
class Changes:
    """Files changed since a commit (working tree and untracked files included)."""

    files: list[str] = field(default_factory=list)
    stat: str = ""


class GitRepo:
    """A git work tree, addressed by its top-level directory."""

    def __init__(self, root: Path):
        self.root = root

    @classmethod
    def open(cls, path: Path | str) -> "GitRepo":
        """The repository whose top level is ``path``; a clear error when it is not one."""
        path = Path(path).expanduser()
        if not path.exists():
            raise RalphError(f"repository directory {path} does not exist")
        if not path.is_dir():
            raise RalphError(f"--repo {path} is a file, not a directory")
        root = path.resolve()
        probe = cls(root)
        try:
            top = probe.git("rev-parse", "--show-toplevel").strip()
        except RalphError:
            raise RalphError(f"{root} is not a git repository; run `git init` there (and commit) first") from None
        if Path(top).resolve() != root:
            raise RalphError(f"{root} is inside the git repository {top}; pass --repo {top} (the loop commits the whole work tree)")
        return probe

    def _env(self) -> dict[str, str]:
        return dict(os.environ, GIT_TERMINAL_PROMPT="0", GIT_EDITOR="true")

    def git(self, *args: str, input: Optional[str] = None, env: Optional[dict] = None) -> str:
        """Run ``git args`` in the repository and return stdout; :class:`RalphError` with git's message on failure."""
        try:
            with deferred():
                proc = subprocess.run(
                    ["git", *args],
                    cwd=self.root,
                    input=input,
                    stdin=None if input is not None else subprocess.DEVNULL,
                    capture_output=True,
                    text=True,
                    errors="replace",
                    env=env or self._env(),
                    timeout=GIT_TIMEOUT_S,
                )
        except FileNotFoundError:
            raise RalphError("git is not installed (or not on PATH); the Ralph loop needs it") from None
        except subprocess.TimeoutExpired:
            raise RalphError(f"`git {' '.join(args)}` took more than {GIT_TIMEOUT_S:g} s in {self.root}") from None
        if proc.returncode != 0:
            message = (proc.stderr or proc.stdout).strip().splitlines()
            raise RalphError(f"`git {' '.join(args)}` failed in {self.root}: {' '.join(message[-3:]) or 'no message'}")
        return proc.stdout

    def head(self) -> Optional[str]:
        """The commit id of HEAD, or ``None`` in a repository without commits."""
        try:
            return self.git("rev-parse", "--verify", "-q", "HEAD").strip() or None
        except RalphError:
            return None

    def exclude(self, pattern: str) -> None:
        """Add ``pattern`` to ``.git/info/exclude`` (once), so the loop's own files are never committed."""
        path = Path(self.git("rev-parse", "--git-path", "info/exclude").strip())
        path = path if path.is_absolute() else self.root / path
        existing = path.read_text(encoding="utf-8", errors="replace").splitlines() if path.exists() else []
        if pattern in existing:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as fh:
            if existing and existing[-1] != "":
                fh.write("\n")
            fh.write(f"# lifecycle-agent ralph loop state\n{pattern}\n")

    def dirty_paths(self) -> list[str]:
        """Paths with uncommitted changes (untracked files included, ignored files not)."""
        out = self.git("status", "--porcelain=v1", "-z", "--untracked-files=all")
        tokens = out.split("\0")
        paths, i = [], 0
        while i < len(tokens):
            entry = tokens[i]
            i += 1
            if len(entry) < 4:
                continue
            paths.append(entry[3:])
            if entry[0] in "RC":  # renames and copies carry the old path as the next token
                i += 1
        return paths

    def changes(self, base: Optional[str]) -> Changes:
        """What changed since ``base`` (``None``: since the empty tree). Stages every change."""
        self.git("add", "-A")
        against = base or EMPTY_TREE
        files = [f for f in self.git("diff", "--cached", "--name-only", "-z", against).split("\0") if f]
        stat = self.git("diff", "--cached", "--stat=100", against).rstrip()
        return Changes(files=files, stat=stat)

    def _identity_env(self) -> dict[str, str]:
        env = self._env()
        for key, var, fallback in (("user.name", "NAME", FALLBACK_NAME), ("user.email", "EMAIL", FALLBACK_EMAIL)):
            try:
                configured = self.git("config", key).strip()
            except RalphError:
                configured = ""
            if not configured and not os.environ.get(f"GIT_AUTHOR_{var}"):
                env[f"GIT_AUTHOR_{var}"] = fallback
                env[f"GIT_COMMITTER_{var}"] = fallback
        return env

    def commit(self, message: str, paths: Optional[list[str]] = None) -> str:
        """Commit every change, or only those of ``paths``, and return the new commit id (an
        empty commit when nothing changed).

        Hooks and signing are skipped: the check is the loop's gate, and a signing prompt
        would stop an unattended loop.
        """
        if paths is None:
            self.git("add", "-A")
        elif paths:
            self.git("add", "-A", "--", *paths)
        self.git(
            "-c", "commit.gpgsign=false", "commit", "--allow-empty", "--no-verify", "-q", "-F", "-",
            input=message, env=self._identity_env(),
        )
        return self.head() or ""

    def stash(self, message: str, keep: tuple[str, ...] = ()) -> bool:
        """Stash uncommitted changes (untracked files included) but those of the paths in ``keep``.

        Returns ``False`` when there was nothing to stash.
        """
        dirty = [p for p in self.dirty_paths() if p not in keep]
        if not dirty:
            return False
        if self.head() is None:
            shown = ", ".join(dirty[:8]) + (f" and {len(dirty) - 8} more" if len(dirty) > 8 else "")
            raise RalphError(
                f"{self.root} has no commit yet, so git cannot stash the files an interrupted iteration may have "
                f"written ({shown}), and the loop cannot tell them from yours. Commit what you want to keep "
                "(`git add -A && git commit`) or delete it, then rerun"
            )
        excluded = [f":(exclude,literal){p}" for p in keep]
        self.git(
            "stash", "push", "--include-untracked", "-m", message, "--", ":/", *excluded, env=self._identity_env()
        )
        return True

    def iteration_commits(self, agent_id: str, limit: int = 5000) -> dict[int, str]:
        """``{iteration: commit id}`` of the loop's commits for ``agent_id`` reachable from HEAD."""
        if self.head() is None:
            return {}
        out = self.git("log", f"-n{limit}", "--format=%H%x1f%B%x1e")
        commits: dict[int, str] = {}
        for chunk in out.split("\x1e"):
            if "\x1f" not in chunk:
                continue
            sha, body = chunk.strip().split("\x1f", 1)
            agent = re.search(rf"^{AGENT_TRAILER}: (.+)$", body, re.MULTILINE)
            iteration = re.search(rf"^{ITERATION_TRAILER}: (\d+)$", body, re.MULTILINE)
            if agent and iteration and agent.group(1).strip() == agent_id:
                commits.setdefault(int(iteration.group(1)), sha)
        return commits


def commit_message(agent_id: str, iteration: int, summary: str, body: str = "") -> str:
    """A loop commit message: a subject naming the iteration, a body, and trailers the loop reads back."""
    parts = [f"ralph: iteration {iteration}, {summary}"]
    if body.strip():
        parts.append(body.strip())
    parts.append(f"{AGENT_TRAILER}: {agent_id}\n{ITERATION_TRAILER}: {iteration}")
    return "\n\n".join(parts) + "\n"
