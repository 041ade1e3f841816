"""Shell commands of the loop: the check, an external agent command and the built-in ``run_command`` tool.

Every command runs with ``/bin/sh`` in a process group of its own, with a timeout. The
whole group is stopped (SIGTERM, then SIGKILL) when the command ends, so background
processes it started end with it; at its timeout; and when the loop is interrupted
(Ctrl-C, SIGTERM, SIGHUP: see :mod:`lifecycle_agent.ralph.signals`). While a command
runs, its group is recorded in a file (:class:`GroupRecord`). When the loop itself is
killed with SIGKILL, the command's first process dies with it (on Linux, through
``PR_SET_PDEATHSIG``), and the next loop started on the repository stops whatever is
left of the group before it does anything else (:func:`stop_recorded_groups`). A
process that leaves the group (``setsid``, a daemon) is out of the loop's reach.

Output is captured, decoded leniently and trimmed before a model sees it.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

#: Seconds a process group gets between SIGTERM and SIGKILL (and after SIGKILL to be gone).
KILL_GRACE_S = 2.0
#: How long output is still read after a command ended (its last writes), seconds.
OUTPUT_GRACE_S = 0.5

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_DURATION = re.compile(r"\b\d+(?:\.\d+)?\s*(?:s|ms|sec|secs|seconds)\b")
_ADDRESS = re.compile(r"\b0x[0-9a-fA-F]{6,}\b")
#: Temporary directories that change from run to run: pytest's basetemp (``/tmp/pytest-of-USER/pytest-12``)
#: and :mod:`tempfile`'s random names (``/tmp/tmpk3j_x9qa``).
_TEMP_PATH = re.compile(r"(/pytest-of-[^/\s]+/pytest-)\d+|\btmp[a-z0-9_]{8}\b")
_PROC = Path("/proc")
_HAS_PROC = (_PROC / "self" / "stat").exists()


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
    stopped_background: bool = False
    """The command ended but left processes of its group running (``cmd &``); they were stopped."""

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
    """``text`` in at most ``limit`` characters, the cut marker included: its start (1/4) and its end (3/4).

    The end of a test run (the failures and the summary) matters most, so it keeps more.
    """
    if len(text) <= limit:
        return text
    marker = "\n[... {} characters cut ...]\n"
    room = max(limit - len(marker.format(len(text))), 0)
    head = room // 4
    tail = room - head
    return text[:head] + marker.format(len(text) - head - tail) + (text[-tail:] if tail else "")


def fingerprint(result: CommandResult) -> str:
    """A short hash of a command's outcome that ignores durations, memory addresses and temporary paths."""
    text = _DURATION.sub("?s", result.output + "\n" + result.stderr)
    text = _TEMP_PATH.sub(lambda m: (m.group(1) or "tmp") + "?", _ADDRESS.sub("0x?", text))
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


# ---------------------------------------------------------------- process groups
def _proc_stat(pid: int) -> Optional[tuple[str, int, int]]:
    """``(state, process group, start time in clock ticks)`` of a process, from /proc; ``None`` when it is gone."""
    try:
        data = (_PROC / str(pid) / "stat").read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return None
    fields = data.rsplit(")", 1)[-1].split()  # the command name, in parentheses, may hold spaces
    return fields[0], int(fields[2]), int(fields[19])


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` is still running (zombies do not count where /proc tells them apart)."""
    if _HAS_PROC:
        for entry in os.scandir(_PROC):
            if entry.name.isdigit():
                stat = _proc_stat(int(entry.name))
                if stat is not None and stat[1] == pgid and stat[0] not in ("Z", "X"):
                    return True
        return False
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_group(pgid: int, proc: Optional[subprocess.Popen] = None) -> bool:
    """SIGTERM to process group ``pgid``, SIGKILL :data:`KILL_GRACE_S` later if any of it still runs.

    ``proc`` (the group's first process, a child of this one) is reaped as it ends. Returns
    whether the group is gone.
    """
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        end = time.monotonic() + KILL_GRACE_S
        while True:
            if proc is not None:
                proc.poll()
            if not _group_alive(pgid):
                return True
            if time.monotonic() >= end:
                break
            time.sleep(0.02)
    return False


class GroupRecord:
    """A file naming the process groups of the commands a loop is running, for a later loop to stop.

    Each entry holds the group id, its first process's start time (on Linux, so a later
    group that reuses the id is never mistaken for it) and the command.
    """

    def __init__(self, path: Path):
        self.path = path
        self.groups: dict[int, dict] = {}

    def add(self, pgid: int, command: str) -> None:
        stat = _proc_stat(pgid) if _HAS_PROC else None
        self.groups[pgid] = {"pgid": pgid, "start": stat[2] if stat else None, "command": command[:200]}
        self._write()

    def remove(self, pgid: int) -> None:
        if self.groups.pop(pgid, None) is not None:
            self._write()

    def _write(self) -> None:
        if not self.groups:
            self.path.unlink(missing_ok=True)
            return
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "groups": list(self.groups.values())}), encoding="utf-8")
        os.replace(tmp, self.path)


def _recorded_group_running(pgid: int, start: Optional[int]) -> bool:
    if _HAS_PROC and start is not None:
        leader = _proc_stat(pgid)
        if leader is not None and leader[2] != start:
            return False  # the id belongs to a newer process: the recorded group is gone
    return _group_alive(pgid)


def stop_recorded_groups(path: Path) -> list[str]:
    """Stop the process groups recorded in ``path`` that still run; what was done, in words (one line each).

    Call it only while holding the loop's lock: the loop that wrote the file is then dead.
    The file is removed.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, ValueError):
        data = {}
    groups = data.get("groups") if isinstance(data, dict) else None
    done = []
    for group in groups if isinstance(groups, list) else []:
        pgid = group.get("pgid") if isinstance(group, dict) else None
        if not isinstance(pgid, int) or pgid <= 1 or pgid == os.getpgrp():
            continue
        if not _recorded_group_running(pgid, group.get("start")):
            continue
        what = f"process group {pgid} (`{group.get('command')}`), left running by a killed loop (pid {data.get('pid')})"
        if group.get("start") is None:
            # its first process's start time was not known (no /proc): the id may belong to an
            # unrelated job by now, so it is named, never signalled
            done.append(f"{what} may still run; if it is yours, stop it with `kill -TERM -- -{pgid}`")
            continue
        if stop_group(pgid):
            done.append(f"stopped {what}")
        else:
            done.append(f"could not stop {what}: stop it yourself with `kill -KILL -- -{pgid}`")
    path.unlink(missing_ok=True)
    return done


def _linux_prctl() -> Optional[Callable[..., int]]:
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


_PRCTL = _linux_prctl()
_PR_SET_PDEATHSIG = 1


def _die_with(parent: int) -> Optional[Callable[[], None]]:
    """A ``preexec_fn`` that makes the command's first process get SIGKILL when the loop dies (Linux)."""
    if _PRCTL is None:
        return None

    def setup() -> None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the loop died before the line above took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return setup


def run_shell(
    command: str,
    cwd: Path,
    *,
    timeout: float,
    stdin_text: Optional[str] = None,
    separate_stderr: bool = False,
    record: Optional[GroupRecord] = None,
) -> CommandResult:
    """Run ``command`` with ``/bin/sh`` in ``cwd``, at most ``timeout`` seconds, in a process group of its own.

    stdin is ``stdin_text`` (or empty, so a command waiting for input never hangs the loop).
    The group is stopped when the command ends, at the timeout and on any exception
    (Ctrl-C, SIGTERM); ``record`` names it while it may run.
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
        preexec_fn=_die_with(os.getpid()),
    )
    if record is not None:
        record.add(proc.pid, command)
    data = stdin_text.encode("utf-8") if stdin_text is not None else None
    timed_out = background = False
    try:
        out, err, timed_out = _collect(proc, data, started + timeout, separate_stderr)
        background = _group_alive(proc.pid)
        gone = not background or stop_group(proc.pid, proc)  # background processes it left (`cmd &`)
    except BaseException:
        gone = stop_group(proc.pid, proc)
        if gone and record is not None:
            record.remove(proc.pid)
        raise
    finally:
        for stream in (proc.stdout, proc.stderr, proc.stdin):
            if stream is not None:
                stream.close()
    if gone and record is not None:
        record.remove(proc.pid)
    output = clean(out)
    if background and not timed_out:
        output += "\n[the command left background processes running; they were stopped]"
    return CommandResult(
        command=command,
        exit_code=None if timed_out else proc.returncode,
        output=output,
        stderr=clean(err) if separate_stderr else "",
        timed_out=timed_out,
        duration_s=time.monotonic() - started,
        timeout_s=timeout,
        stopped_background=background and not timed_out,
    )


def _collect(proc: subprocess.Popen, data: Optional[bytes], deadline: float, separate_stderr: bool):
    """Read the command's output until it ends, then ``OUTPUT_GRACE_S`` more; stop its group at ``deadline``.

    Unlike ``communicate()`` this does not wait for the end of the pipes: a background process the
    command started (``cmd &``) holds them open for as long as it runs. Returns ``(out, err, timed_out)``.
    """
    import selectors
    import threading

    if data is not None and proc.stdin is not None:
        def feed() -> None:
            try:
                proc.stdin.write(data)
                proc.stdin.close()
            except (BrokenPipeError, OSError, ValueError):
                pass  # the command ended without reading its input: nothing more to give it

        threading.Thread(target=feed, daemon=True).start()
    sinks = {proc.stdout: bytearray()}
    if separate_stderr:
        sinks[proc.stderr] = bytearray()
    selector = selectors.DefaultSelector()
    for stream in sinks:
        selector.register(stream, selectors.EVENT_READ)
    timed_out, ended_at, stop_at = False, None, deadline
    try:
        while selector.get_map():
            now = time.monotonic()
            if ended_at is None and proc.poll() is not None:
                ended_at, stop_at = now, min(stop_at, now + OUTPUT_GRACE_S)
            if now >= stop_at:
                if ended_at is not None or timed_out:
                    break  # ended (what is still open belongs to processes it left), or stopped and given its grace
                timed_out = True
                stop_group(proc.pid, proc)
                stop_at = now + KILL_GRACE_S
                continue
            for key, _ in selector.select(timeout=min(0.05, max(stop_at - now, 0.001))):
                chunk = os.read(key.fd, 65536)
                if chunk:
                    sinks[key.fileobj] += chunk
                else:
                    selector.unregister(key.fileobj)
    finally:
        selector.close()
    if proc.poll() is None:
        try:
            proc.wait(timeout=KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
    return bytes(sinks[proc.stdout]), bytes(sinks.get(proc.stderr, b"")), timed_out
