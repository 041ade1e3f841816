"""Shell commands of the loop: the check, an external agent command and the built-in ``run_command`` tool.

Every command runs in its own process group with a timeout; on timeout (or when the
loop itself is interrupted) the whole group is killed, so nothing outlives the loop.
Output is captured, decoded leniently and trimmed before a model sees it.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

#: Seconds a timed-out process group gets between SIGTERM and SIGKILL.
KILL_GRACE_S = 2.0

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_DURATION = re.compile(r"\b\d+(?:\.\d+)?\s*(?:s|ms|sec|secs|seconds)\b")
_ADDRESS = re.compile(r"\b0x[0-9a-fA-F]{6,}\b")


@dataclass(frozen=True)
class CommandResult:
    """The outcome of one shell command."""

    command: str
    exit_code: Optional[int]
    """The exit status; ``None`` when the command was killed at its timeout."""
    output: str
    """stdout (with stderr interleaved unless captured apart), ANSI colours removed."""
    stderr: str
    """stderr when captured apart, else ''."""
    timed_out: bool
    duration_s: float
    timeout_s: float

    @property
    def passed(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    def verdict(self) -> str:
        """'passed (exit code 0)', 'failed (exit code 1)' or 'timed out after 600 s'."""
        if self.timed_out:
            return f"timed out after {self.timeout_s:g} s"
        return f"{'passed' if self.passed else 'failed'} (exit code {self.exit_code})"


def clean(data: bytes) -> str:
    """Bytes from a process as text: invalid UTF-8 replaced, ANSI escapes and carriage returns removed."""
    text = data.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n")
    return _ANSI.sub("", text)


def trim(text: str, limit: int) -> str:
    """``text`` cut to about ``limit`` characters, keeping its start (1/4) and its end (3/4).

    The end of a test run (the failures and the summary) matters most, so it keeps more.
    """
    if len(text) <= limit:
        return text
    head = limit // 4
    tail = limit - head
    cut = len(text) - head - tail
    return f"{text[:head]}\n[... {cut} characters cut ...]\n{text[-tail:]}"


def fingerprint(result: CommandResult) -> str:
    """A short hash of a command's outcome that ignores durations and memory addresses."""
    text = _ADDRESS.sub("0x?", _DURATION.sub("?s", result.output + "\n" + result.stderr))
    status = "timeout" if result.timed_out else str(result.exit_code)
    return hashlib.sha1(f"{status}\n{text.strip()}".encode("utf-8")).hexdigest()[:16]


def missing_program(command: str, cwd: Path) -> Optional[str]:
    """The program a command starts, when the shell cannot find it; ``None`` when found or not knowable.

    Only a plain first word is checked (after ``VAR=value`` assignments), with the shell's
    own ``command -v``, so builtins, functions and PATH lookups count as found.
    """
    try:
        words = shlex.split(command)
    except ValueError:
        return None
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
        words = words[1:]
    if not words or any(c in words[0] for c in "$`(){};|&<>*?!"):
        return None
    probe = subprocess.run(
        ["/bin/sh", "-c", 'command -v -- "$1"', "sh", words[0]],
        cwd=str(cwd), stdin=subprocess.DEVNULL, capture_output=True, timeout=30,
    )
    return None if probe.returncode == 0 else words[0]


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, KILL_GRACE_S)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_shell(
    command: str,
    cwd: Path,
    *,
    timeout: float,
    stdin_text: Optional[str] = None,
    separate_stderr: bool = False,
) -> CommandResult:
    """Run ``command`` with ``/bin/sh`` in ``cwd``, at most ``timeout`` seconds.

    stdin is ``stdin_text`` (or empty, so a command waiting for input never hangs the loop).
    """
    timeout = max(float(timeout), 0.01)
    started = time.monotonic()
    proc = subprocess.Popen(
        command,
        shell=True,
        cwd=str(cwd),
        stdin=subprocess.PIPE if stdin_text is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE if separate_stderr else subprocess.STDOUT,
        start_new_session=True,
    )
    data = stdin_text.encode("utf-8") if stdin_text is not None else None
    timed_out = False
    try:
        out, err = proc.communicate(input=data, timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(proc)
        try:
            out, err = proc.communicate(timeout=KILL_GRACE_S)
        except subprocess.TimeoutExpired:  # a grandchild left its own group and holds the pipe
            out, err = b"", b""
    except BaseException:
        _kill_group(proc)
        raise
    return CommandResult(
        command=command,
        exit_code=None if timed_out else proc.returncode,
        output=clean(out or b""),
        stderr=clean(err or b"") if separate_stderr else "",
        timed_out=timed_out,
        duration_s=time.monotonic() - started,
        timeout_s=timeout,
    )
