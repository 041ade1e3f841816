"""The built-in agent's tools: confinement to the repository, the tool-call protocol, command limits."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from lifecycle_agent.ralph import RepoTools, ToolCall, parse_tool_call
from lifecycle_agent.ralph.shell import CommandResult, fingerprint, missing_program, run_shell, trim


@pytest.fixture
def root(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    (repo / "src").mkdir()
    (repo / "src" / "app.py").write_text("def main():\n    return 1\n")
    (repo / "README.md").write_text("hello\nworld\n")
    (repo / ".gitignore").write_text("build/\n")
    (repo / "build").mkdir()
    (repo / "build" / "out.txt").write_text("generated main\n")
    (tmp_path / "secret.txt").write_text("password = hunter2\n")
    return repo


@pytest.fixture
def tools(root):
    return RepoTools(root, command_timeout=5, output_chars=400)


def call(tools: RepoTools, name: str, **args) -> str:
    return tools.call(ToolCall(name, args))


# ---------------------------------------------------------------- confinement
def test_absolute_path_is_refused(tools, root):
    assert "absolute paths are not allowed" in call(tools, "read_file", path=str(root / "README.md"))


def test_dot_dot_is_refused(tools):
    assert "'..' is not allowed" in call(tools, "read_file", path="../secret.txt")
    assert "'..' is not allowed" in call(tools, "write_file", path="src/../../x.txt", content="x")


def test_symlinked_file_leading_out_is_refused(tools, root):
    (root / "link.txt").symlink_to(root.parent / "secret.txt")
    message = call(tools, "read_file", path="link.txt")
    assert "leads outside the repository" in message and "hunter2" not in message


def test_write_through_a_symlinked_directory_leading_out_is_refused(tools, root):
    (root / "out").symlink_to(root.parent)
    assert "leads outside the repository" in call(tools, "write_file", path="out/evil.txt", content="x")
    assert not (root.parent / "evil.txt").exists()


def test_symlink_inside_the_repository_is_allowed(tools, root):
    (root / "alias.py").symlink_to(root / "src" / "app.py")
    assert "def main" in call(tools, "read_file", path="alias.py")


def test_git_directory_and_loop_state_are_refused(tools, root):
    (root / ".lifecycle-agent").mkdir()
    assert ".git/ belongs to git and the loop" in call(tools, "read_file", path=".git/config")
    assert ".lifecycle-agent/ belongs" in call(tools, "write_file", path=".lifecycle-agent/ralph.db", content="x")
    assert ".git/ belongs" in call(tools, "write_file", path="./.git/hooks/pre-commit", content="x")


def test_search_never_reads_through_a_symlink_leading_out(tools, root):
    (root / "link.txt").symlink_to(root.parent / "secret.txt")
    assert call(tools, "search", pattern="hunter2") == "no match for 'hunter2'"


# ---------------------------------------------------------------- the tools
def test_list_files_leaves_out_ignored_files_and_git(tools):
    listing = call(tools, "list_files").splitlines()
    assert listing == [".gitignore", "README.md", "src/app.py"]


def test_read_file_gives_a_line_range(tools):
    assert call(tools, "read_file", path="README.md", start=2, end=2) == "README.md (lines 2-2 of 2)\nworld"


def test_read_file_refuses_binary_files(tools, root):
    (root / "blob.bin").write_bytes(b"\0\1\2")
    assert "binary file" in call(tools, "read_file", path="blob.bin")


def test_search_finds_lines_with_file_and_line_number(tools):
    assert call(tools, "search", pattern="return") == "src/app.py:2: return 1"


def test_search_reports_a_bad_regular_expression(tools):
    assert "invalid regular expression" in call(tools, "search", pattern="(", regex=True)


def test_write_file_creates_directories(tools, root):
    assert call(tools, "write_file", path="pkg/new/mod.py", content="x = 1\n").startswith("wrote pkg/new/mod.py")
    assert (root / "pkg" / "new" / "mod.py").read_text() == "x = 1\n"


def test_edit_file_replaces_one_exact_occurrence(tools, root):
    assert call(tools, "edit_file", path="src/app.py", old="return 1", new="return 2") == "edited src/app.py"
    assert "return 2" in (root / "src" / "app.py").read_text()


def test_edit_file_refuses_missing_or_ambiguous_text(tools, root):
    assert "was not found" in call(tools, "edit_file", path="src/app.py", old="return 9", new="x")
    (root / "twice.txt").write_text("a a")
    assert "occurs 2 times" in call(tools, "edit_file", path="twice.txt", old="a", new="b")


def test_run_command_runs_in_the_repository(tools, root):
    out = call(tools, "run_command", command="pwd")
    assert out.splitlines()[1].startswith("passed (exit code 0)") and str(root) in out


def test_run_command_times_out(root):
    tools = RepoTools(root, command_timeout=0.3)
    started = time.monotonic()
    assert "timed out after 0.3 s" in call(tools, "run_command", command="sleep 20")
    assert time.monotonic() - started < 10


def test_run_command_is_not_run_after_the_wall_time_limit(root):
    tools = RepoTools(root, time_left=lambda: 0.0)
    assert "wall-time limit" in call(tools, "run_command", command="touch ran.txt")
    assert not (root / "ran.txt").exists()


def test_run_command_output_is_trimmed(tools):
    out = call(tools, "run_command", command=f"{sys.executable} -c \"print('x' * 5000 + 'END')\"")
    assert len(out) < 600 and out.rstrip().endswith("END") and "characters cut" in out


def test_unknown_tool_and_bad_arguments_are_explained(tools):
    assert "unknown tool 'delete_everything'" in call(tools, "delete_everything")
    assert "read_file needs 'path'" in call(tools, "read_file")
    assert "takes no argument 'mode'" in call(tools, "read_file", path="README.md", mode="rb")
    assert "'start' must be an integer" in call(tools, "read_file", path="README.md", start="first")


@pytest.mark.parametrize("reply, param", [
    ('{"tool": "read_file", "args": {"path": "README.md", "start": 1e999}}', "start"),
    ('{"tool": "read_file", "args": {"path": "README.md", "end": -Infinity}}', "end"),
    ('{"tool": "read_file", "args": {"path": "README.md", "start": NaN}}', "start"),
    ('{"tool": "read_file", "args": {"path": "README.md", "start": "inf"}}', "start"),
    ('{"tool": "run_command", "args": {"command": "echo hi", "timeout": NaN}}', "timeout"),
    ('{"tool": "run_command", "args": {"command": "echo hi", "timeout": 1e999}}', "timeout"),
    ('{"tool": "run_command", "args": {"command": "echo hi", "timeout": %d}}' % 10**400, "timeout"),
])
def test_a_number_that_is_not_finite_is_a_tool_error(tools, reply, param):
    message = tools.call(parse_tool_call(reply))
    assert message.startswith("error:") and f"{param!r} must be" in message


@pytest.mark.parametrize("name, args", [
    ("read_file", {"path": "README.md\0x"}),
    ("write_file", {"path": "new\0.txt", "content": "x"}),
    ("list_files", {"path": "src\0"}),
    ("search", {"pattern": "main", "path": "src\0"}),
])
def test_a_path_holding_a_nul_character_is_refused(tools, root, name, args):
    assert "NUL character" in call(tools, name, **args)
    assert not (root / "new").exists()


def test_a_run_command_timeout_of_zero_or_less_is_refused(tools):
    assert "timeout must be a number of seconds > 0" in call(tools, "run_command", command="echo hi", timeout=-1)


def test_an_argument_the_tool_cannot_use_comes_back_as_an_error(tools):
    message = call(tools, "run_command", command="echo a\0b")
    assert message.startswith("error: run_command failed:") and "null byte" in message


# ---------------------------------------------------------------- the protocol
def test_plain_json_tool_call_is_parsed():
    assert parse_tool_call('{"tool": "read_file", "args": {"path": "a.py"}}') == ToolCall("read_file", {"path": "a.py"})


def test_tool_call_in_prose_and_code_fences_is_parsed():
    reply = 'I will look.\n```json\n{"tool": "search", "args": {"pattern": "x"}}\n```\nThen fix it.'
    assert parse_tool_call(reply) == ToolCall("search", {"pattern": "x"})


def test_function_call_style_with_string_arguments_is_parsed():
    reply = '{"name": "bash", "arguments": "{\\"cmd\\": \\"ls\\"}"}'
    assert parse_tool_call(reply) == ToolCall("run_command", {"command": "ls"})


def test_top_level_arguments_and_aliases_are_parsed():
    assert parse_tool_call('{"action": "str_replace", "file_path": "a", "old_str": "x", "new_str": "y"}') == ToolCall(
        "edit_file", {"path": "a", "old": "x", "new": "y"}
    )


def test_a_bare_done_is_a_tool_call():
    assert parse_tool_call("DONE.") == ToolCall("done", {})


def test_a_reply_without_a_tool_call_gives_none():
    assert parse_tool_call("I think the bug is in {the parser}.") is None
    assert parse_tool_call('{"path": "a.py"}') is None


# ---------------------------------------------------------------- shell helpers
def test_trim_keeps_the_start_and_more_of_the_end_within_the_limit():
    text = "A" * 1000 + "Z" * 1000
    out = trim(text, 400)
    assert len(out) <= 400 and out.count("characters cut") == 1
    head, tail = len(out) - len(out.lstrip("A")), len(out) - len(out.rstrip("Z"))
    assert head >= 90 and tail >= 3 * head - 3 and f"{2000 - head - tail} characters cut" in out


def test_run_command_and_read_file_results_are_trimmed_once_within_the_limit(tools, root):
    long_command = f"{sys.executable} -c \"print('x' * 5000 + 'END')\"  # {'c' * 300}"
    out = call(tools, "run_command", command=long_command)
    assert len(out) <= 400 and out.count("characters cut") == 1 and out.rstrip().endswith("END")
    (root / "big.txt").write_text("line\n" * 2000)
    out = call(tools, "read_file", path="big.txt")
    assert len(out) <= 400 and out.count("cut") == 1 and "read on with start/end" in out


def test_fingerprint_ignores_durations_and_addresses():
    def result(output):
        return CommandResult("c", 1, output, "", False, 0.1, 10)

    assert fingerprint(result("1 failed in 0.31s at 0x7f3a2b1c9d")) == fingerprint(result("1 failed in 12.5s at 0x7f00aa00bb"))
    assert fingerprint(result("1 failed in 0.31s")) != fingerprint(result("2 failed in 0.31s"))


def test_fingerprint_ignores_temporary_directories():
    def result(output):
        return CommandResult("c", 1, output, "", False, 0.1, 10)

    one = "FAILED /tmp/pytest-of-ci/pytest-12/test_parse0/out.txt; see /tmp/tmpk3j_x9qa/log"
    two = "FAILED /tmp/pytest-of-ci/pytest-13/test_parse0/out.txt; see /tmp/tmp0a8zzq1b/log"
    assert fingerprint(result(one)) == fingerprint(result(two))
    assert fingerprint(result(one)) != fingerprint(result(one.replace("test_parse0", "test_other0")))


def test_run_shell_kills_the_whole_process_group_at_the_timeout(tmp_path):
    marker = tmp_path / "late.txt"
    result = run_shell(f"(sleep 1; touch {marker}) & sleep 20", tmp_path, timeout=0.3)
    assert result.timed_out and result.exit_code is None
    time.sleep(1.5)
    assert not marker.exists()


def test_run_shell_stops_background_processes_the_command_leaves(tmp_path):
    marker = tmp_path / "late.txt"
    result = run_shell(f"(sleep 1; touch {marker}) >/dev/null 2>&1 &", tmp_path, timeout=10)
    assert result.passed and result.duration_s < 5
    time.sleep(1.5)
    assert not marker.exists()


def test_run_shell_gives_a_command_reading_stdin_an_empty_input(tmp_path):
    result = run_shell("cat", tmp_path, timeout=10)
    assert result.passed and result.output == ""


def test_missing_program_knows_builtins_paths_and_assignments(tmp_path):
    assert missing_program("read x; echo", tmp_path) is None
    assert missing_program("FOO=1 git status", tmp_path) is None
    assert missing_program("./run-tests.sh", tmp_path) == "./run-tests.sh"
    script = tmp_path / "run-tests.sh"
    script.write_text("#!/bin/sh\n")
    os.chmod(script, 0o755)
    assert missing_program("./run-tests.sh -q", tmp_path) is None
    assert missing_program("no-such-tool --x", tmp_path) == "no-such-tool"


# ---------------------------------------------------------------- groups a killed loop left behind


def _recorded(tmp_path, proc, start):
    import json

    path = tmp_path / "groups.json"
    path.write_text(json.dumps({"pid": 999999, "groups": [{"pgid": proc.pid, "start": start, "command": "sleep 60"}]}))
    return path


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="start times come from /proc")
def test_a_recorded_group_whose_leader_is_the_same_process_is_stopped(tmp_path):
    from lifecycle_agent.ralph.shell import _proc_stat, stop_recorded_groups

    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        said = stop_recorded_groups(_recorded(tmp_path, proc, _proc_stat(proc.pid)[2]))
        assert proc.wait(10) is not None and said and said[0].startswith("stopped process group")
        assert not (tmp_path / "groups.json").exists()
    finally:
        proc.kill()


def test_a_recorded_group_of_unknown_identity_is_named_never_signalled(tmp_path):
    from lifecycle_agent.ralph.shell import stop_recorded_groups

    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        said = stop_recorded_groups(_recorded(tmp_path, proc, None))
        time.sleep(0.2)
        assert proc.poll() is None  # still running: the id might belong to someone else's job
        assert "may still run" in said[0] and f"kill -TERM -- -{proc.pid}" in said[0]
    finally:
        proc.kill()


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="start times come from /proc")
def test_a_recorded_group_id_now_used_by_a_newer_process_is_left_alone(tmp_path):
    from lifecycle_agent.ralph.shell import _proc_stat, stop_recorded_groups

    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        said = stop_recorded_groups(_recorded(tmp_path, proc, _proc_stat(proc.pid)[2] - 1))
        time.sleep(0.2)
        assert proc.poll() is None and said == []
    finally:
        proc.kill()


# ---------------------------------------------------------------- hostile repositories and patterns
def test_a_catastrophic_regex_is_stopped_within_the_search_time_limit(tools, root, monkeypatch):
    import time

    from lifecycle_agent.ralph import tools as tools_module

    monkeypatch.setattr(tools_module, "SEARCH_TIMEOUT_S", 0.5)
    (root / "evil.txt").write_text("a" * 40 + "b\n")
    assert call(tools, "search", pattern="(a+)+$", path="evil.txt", regex=True).startswith("no match")  # fast here
    started = time.monotonic()
    out = call(tools, "search", pattern="(a|aa)+$", path="evil.txt", regex=True)  # exponential backtracking
    assert time.monotonic() - started < 5
    assert out.startswith("error:") and "took more than 0.5 s" in out


def test_a_plain_regex_search_still_finds_lines(tools):
    assert "src/app.py:1: def main():" in call(tools, "search", pattern=r"def \w+\(", regex=True)


@pytest.mark.parametrize("tool,args", [
    ("read_file", {"path": "loop"}), ("list_files", {"path": "loop"}), ("search", {"pattern": "x", "path": "loop"}),
    ("write_file", {"path": "loop/x.txt", "content": "x"}), ("search", {"pattern": "hello"}),
])
def test_a_symlink_loop_is_an_error_the_agent_sees_not_the_end_of_the_loop(tools, root, tool, args):
    import os

    os.symlink("loop", root / "loop")
    subprocess.run(["git", "add", "loop"], cwd=root, check=True)
    out = call(tools, tool, **args)
    assert isinstance(out, str)
    if tool == "search" and args["pattern"] == "hello":
        assert "README.md:1: hello" in out  # the loop is skipped, the rest is searched
    else:
        assert out.startswith("error:") and "loop" in out


def test_a_command_that_leaves_a_background_child_ends_when_it_ends(tools, root):
    import time

    started = time.monotonic()
    out = call(tools, "run_command", command="(while true; do sleep 1; done) & echo started")
    assert time.monotonic() - started < 4  # not the 5 s tool limit
    assert "started" in out and "left background processes running; they were stopped" in out
    assert "timed out" not in out


def test_run_shell_stops_what_a_finished_command_left_in_its_group(tmp_path):
    import time

    from lifecycle_agent.ralph.shell import run_shell

    started = time.monotonic()
    result = run_shell("sleep 31.25 & echo done", tmp_path, timeout=20)
    assert time.monotonic() - started < 3 and result.passed and result.stopped_background
    assert "done" in result.output
    left = subprocess.run(["pgrep", "-f", "sleep 31.25"], capture_output=True, text=True).stdout.split()
    assert left == []  # the background sleep was stopped with its group


def test_run_shell_still_reads_every_line_of_a_chatty_command(tmp_path):
    from lifecycle_agent.ralph.shell import run_shell

    result = run_shell("for i in $(seq 1 20000); do echo line $i; done", tmp_path, timeout=30)
    assert result.passed and result.output.count("\n") >= 19_999 and "line 20000" in result.output
    assert not result.stopped_background
