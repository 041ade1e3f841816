"""The Ralph loop: notes carry over, stops, limits, circuit breakers, crash resume and bad input.

The fixture repository has a check that fails until ``calc.secret()`` returns a number the
agent cannot guess; the check output tells it. The scripted agents fix the code only from
what their notes say, so a green loop proves the notes carried the lesson over.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lifecycle_agent import CONTEXT_BEGIN, CONTEXT_END
from lifecycle_agent.errors import ModelCallError
from lifecycle_agent.models.base import ChatModel, Generation
from lifecycle_agent.models.scripted import ScriptedModel, hints, section
from lifecycle_agent.ralph import RalphError, loop_status, run_loop
from lifecycle_agent.ralph.gitrepo import FALLBACK_EMAIL, GitRepo
from lifecycle_agent.store import Store

SECRET = 7919
PYTHON = shlex.quote(sys.executable)
CHECK = f"{PYTHON} -B check.py"
AGENT = f"{PYTHON} agent.py"
LESSON = re.compile(r"secret\(\) must return (\d+)")

CHECK_PY = f"""\
import sys
import calc
value = calc.secret()
if value != {SECRET}:
    print(f"FAILED: secret() returned {{value}}; expected {SECRET}")
    sys.exit(1)
print("ok")
"""

# An external agent in the classic loop: it fixes calc.py only from its notes file, and
# writes the lesson it reads in the latest check output (part of its prompt) to that file.
AGENT_PY = """\
import pathlib, re, sys
prompt = sys.stdin.read()
notes = pathlib.Path("NOTES.md")
known = notes.read_text() if notes.exists() else ""
lesson = re.search(r"secret\\(\\) must return (\\d+)", known)
pathlib.Path("calc.py").write_text(f"def secret():\\n    return {lesson.group(1) if lesson else 1}\\n")
seen = re.search(r"expected (\\d+)", prompt)
if seen and not lesson:
    notes.write_text(known + f"Lesson: secret() must return {seen.group(1)}.\\n")
print("edited calc.py")
"""


def git(repo: Path, *args: str) -> str:
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.invalid",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.invalid")
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True, env=env).stdout


def make_repo(root: Path, *, extra: dict[str, str] | None = None) -> Path:
    """A committed repository whose check fails until secret() returns SECRET."""
    root.mkdir(parents=True, exist_ok=True)
    files = {
        "calc.py": "def secret():\n    return 0\n",
        "check.py": CHECK_PY,
        "agent.py": AGENT_PY,
        "PROMPT.md": "Make `python check.py` pass: secret() in calc.py must return the right number.\n",
        ".gitignore": "__pycache__/\n",
        **(extra or {}),
    }
    for name, text in files.items():
        (root / name).write_text(text)
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "init")
    return root


@pytest.fixture
def repo(tmp_path) -> Path:
    return make_repo(tmp_path / "repo")


def write_calc(value) -> str:
    return json.dumps({"tool": "write_file", "args": {"path": "calc.py", "content": f"def secret():\n    return {value}\n"}})


def turn(messages) -> int:
    return sum(1 for m in messages if m["role"] == "assistant")


def fix_from_hints(messages) -> str:
    """Solve policy: write secret() from the lesson in the Hints (a wrong guess without one), then done."""
    if turn(messages) == 0:
        lesson = LESSON.search(hints(messages))
        return write_calc(lesson.group(1) if lesson else 1)
    return '{"tool": "done", "args": {"summary": "edited calc.py"}}'


def notes_reply(lines: list[str]) -> str:
    return "Updating the notes.\n" + CONTEXT_BEGIN + "\n" + "\n".join(lines) + "\n" + CONTEXT_END


def previous_notes(messages) -> list[str]:
    user = messages[-1]["content"]
    return [line for line in section(user, "Previous notes").splitlines() if line.strip() and not line.startswith("(")]


def learn_from_check(messages) -> str:
    """Update policy: keep the notes, add the lesson the check output gives."""
    lines = previous_notes(messages)
    seen = re.search(r"expected (\d+)", section(messages[-1]["content"], "Result"))
    if seen and not any(LESSON.search(line) for line in lines):
        lines.append(f"Lesson: secret() must return {seen.group(1)}.")
    return notes_reply(lines or ["Nothing learned yet."])


def learner() -> ScriptedModel:
    return ScriptedModel(fix_from_hints, learn_from_check)


def forgetful() -> ScriptedModel:
    return ScriptedModel(fix_from_hints, lambda messages: notes_reply(["Tried something; it failed."]))


def loop(repo: Path, model=None, **options):
    options.setdefault("max_iterations", 5)
    return run_loop(repo, check=CHECK, model=model, **options)


def commits(repo: Path) -> list[str]:
    return git(repo, "log", "--format=%s").splitlines()


# ---------------------------------------------------------------- notes carry the lesson over
def test_builtin_agent_passes_at_iteration_two_from_its_notes(repo):
    result = loop(repo, learner())
    assert (result.stop_reason, result.passed) == ("check_passed", True)
    assert [i.iteration for i in result.iterations] == [1, 2]
    assert [i.check_passed for i in result.iterations] == [False, True]
    assert f"secret() must return {SECRET}" in (repo / "NOTES.md").read_text()
    assert commits(repo)[:2] == ["ralph: iteration 2, check passed", "ralph: iteration 1, check failed"]


def test_scripted_agent_without_the_lesson_never_passes(repo):
    result = loop(repo, forgetful(), max_iterations=3, max_same_failure=10)
    assert (result.stop_reason, result.passed) == ("max_iterations", False)
    assert all(not i.check_passed for i in result.iterations)


def test_iteration_two_was_solved_with_the_notes_written_after_iteration_one(repo):
    result = loop(repo, learner())
    first, second = result.iterations
    assert second.context_version == first.notes_version
    with Store(result.db) as store:
        solve = store.episodes("ralph", kind="solve", task_id="iter-2")[0]
    assert f"Lesson: secret() must return {SECRET}" in solve.messages[0]["content"]


def test_every_iteration_is_committed_with_the_notes_file_and_without_the_database(repo):
    result = loop(repo, learner())
    assert [i.commit for i in result.iterations] == [
        git(repo, "rev-parse", "HEAD~1").strip(), git(repo, "rev-parse", "HEAD").strip()
    ]
    tracked = git(repo, "ls-files").split()
    assert "NOTES.md" in tracked and not any(p.startswith(".lifecycle-agent") for p in tracked)
    assert git(repo, "status", "--porcelain") == ""
    assert Path(result.db) == repo / ".lifecycle-agent" / "ralph.db"


def test_feedback_holds_the_check_output_and_the_changed_files(repo):
    result = loop(repo, learner())
    with Store(result.db) as store:
        solve = store.episodes("ralph", kind="solve", task_id="iter-1")[0]
    assert solve.reward == 0.0
    assert f"expected {SECRET}" in solve.feedback and "calc.py" in solve.feedback


def test_second_prompt_shows_the_previous_check_output(repo):
    result = loop(repo, learner())
    with Store(result.db) as store:
        solve = store.episodes("ralph", kind="solve", task_id="iter-2")[0]
    observation = solve.messages[1]["content"]
    assert "After iteration 1" in observation and "returned 1; expected" in observation


def test_a_check_that_passes_already_runs_no_iteration(repo):
    (repo / "calc.py").write_text(f"def secret():\n    return {SECRET}\n")
    git(repo, "commit", "-qam", "fixed by hand")
    result = loop(repo, learner())
    assert (result.stop_reason, result.passed, result.iterations) == ("check_passed", True, [])


def test_status_lists_iterations_check_results_and_notes_history(repo):
    loop(repo, learner())
    status = loop_status(repo)
    assert [(i.iteration, i.check_passed) for i in status.iterations] == [(1, False), (2, True)]
    assert status.passed and status.in_progress is None
    assert [v.source for v in status.notes_history] == ["init", "update", "update"]
    assert status.runs[-1].stop_reason == "check_passed"
    assert all(i.commit for i in status.iterations)


def test_status_of_a_repository_without_a_loop_is_an_error(repo):
    with pytest.raises(RalphError, match="no Ralph loop has run"):
        loop_status(repo)


# ---------------------------------------------------------------- external agent command
def test_agent_command_keeps_its_own_notes_as_context_versions(repo):
    result = run_loop(repo, check=CHECK, agent_cmd=AGENT, max_iterations=5)
    assert (result.stop_reason, result.passed) == ("check_passed", True)
    assert len(result.iterations) == 2
    assert f"secret() must return {SECRET}" in result.notes
    status = loop_status(repo)
    assert [v.source for v in status.notes_history] == ["init", "agent-notes"]
    assert status.iterations[0].notes_version == 1
    assert f"must return {SECRET}" in git(repo, "show", "HEAD~1:NOTES.md")


def test_agent_command_receives_notes_prompt_and_check_output_on_stdin(repo):
    (repo / "NOTES.md").write_text("Remember: be careful.\n")
    dump = f"{PYTHON} -c \"import sys, pathlib; pathlib.Path('seen.txt').write_text(sys.stdin.read())\""
    run_loop(repo, check=CHECK, agent_cmd=dump, max_iterations=1)
    seen = git(repo, "show", "HEAD:seen.txt")
    assert "Remember: be careful." in seen and "Make `python check.py` pass" in seen
    assert f"expected {SECRET}" in seen and "NOTES.md" in seen


def test_agent_command_with_a_model_gets_notes_from_update_episodes(repo):
    guess = f"{PYTHON} -c \"import pathlib; pathlib.Path('calc.py').write_text('def secret():\\n    return 5\\n')\""
    result = run_loop(repo, check=CHECK, agent_cmd=guess, model=learner(), max_iterations=1)
    assert result.iterations[0].update_status == "ok"
    assert f"secret() must return {SECRET}" in (repo / "NOTES.md").read_text()


def test_crashing_agent_command_is_a_recorded_failed_iteration(repo):
    crash = f"{PYTHON} -c \"import sys; print('boom', file=sys.stderr); sys.exit(3)\""
    result = run_loop(repo, check=CHECK, agent_cmd=crash, max_iterations=1)
    (info,) = result.iterations
    assert (info.agent_exit_code, info.check_passed, result.stop_reason) == (3, False, "max_iterations")
    with Store(result.db) as store:
        solve = store.episodes("ralph", kind="solve", task_id="iter-1")[0]
    assert "exited with code 3" in solve.feedback and "boom" in solve.messages[-1]["content"]


def test_agent_command_waiting_for_a_terminal_does_not_hang(repo):
    started = time.monotonic()
    result = run_loop(repo, check=CHECK, agent_cmd="read line; read again; sleep 0", max_iterations=1)
    assert result.iterations[0].agent_exit_code is not None
    assert time.monotonic() - started < 20


# ---------------------------------------------------------------- stops, limits and breakers
def test_max_iterations_stops_the_loop(repo):
    result = loop(repo, forgetful(), max_iterations=2, max_same_failure=10)
    assert (result.stop_reason, len(result.iterations)) == ("max_iterations", 2)


def test_max_iterations_counts_iterations_of_earlier_runs(repo):
    loop(repo, forgetful(), max_iterations=2, max_same_failure=10)
    again = loop(repo, forgetful(), max_iterations=2, max_same_failure=10)
    assert (again.stop_reason, again.iterations_run, len(again.iterations)) == ("max_iterations", 0, 2)


def test_wall_time_limit_cuts_a_running_agent_command(repo):
    started = time.monotonic()
    result = run_loop(repo, check=CHECK, agent_cmd="sleep 30", max_minutes=0.02, max_iterations=5)
    assert result.stop_reason == "max_minutes"
    assert result.iterations[0].agent_timed_out
    assert time.monotonic() - started < 15


def test_wall_time_limit_cuts_the_check_after_an_iteration(repo):
    slow_check = "test -f slow.txt && sleep 30; exit 1"  # fast before the iteration, slow after it

    def solve(messages):
        return json.dumps({"tool": "write_file", "args": {"path": "slow.txt", "content": "x"}}) if turn(messages) == 0 \
            else '{"tool": "done"}'

    started = time.monotonic()
    result = run_loop(repo, check=slow_check, model=ScriptedModel(solve, learn_from_check), max_minutes=0.05,
                      max_iterations=5)
    elapsed = time.monotonic() - started
    (info,) = result.iterations
    assert result.stop_reason == "max_minutes"
    assert info.check_timed_out and "stopped after" in info.note and "wall-time limit" in info.note
    assert elapsed < 3 + 2 + 6  # the limit, the check's grace, SIGTERM/SIGKILL waits at most


def test_a_tool_call_returned_after_the_wall_time_limit_is_not_carried_out(repo):
    def slow_fix(messages):
        time.sleep(1.5)  # past the 1.2 s limit
        return write_calc(SECRET)

    result = run_loop(repo, check=CHECK, model=ScriptedModel(slow_fix, learn_from_check), max_minutes=0.02)
    (info,) = result.iterations
    assert (result.stop_reason, info.check_passed, info.tool_calls) == ("max_minutes", False, 0)
    assert "wall-time limit" in info.note


def test_wall_time_limit_cuts_the_check_before_the_first_iteration(repo):
    started = time.monotonic()
    result = run_loop(repo, check="sleep 30; exit 1", model=learner(), max_minutes=0.02, max_iterations=5)
    assert (result.stop_reason, result.iterations) == ("max_minutes", [])
    assert time.monotonic() - started < 1.2 + 2 + 6


class Chatty(ChatModel):
    """Lists files forever; reports 1 token per 4 prompt characters and 10 per reply; ignores max_new_tokens."""

    model_id = "chatty"

    def __init__(self):
        self.calls: list[tuple[int, int | None]] = []  # (prompt tokens, max_new_tokens) of every call

    def generate(self, messages, *, temperature=None, max_new_tokens=None):
        prompt = sum(len(str(m["content"])) for m in messages) // 4
        self.calls.append((prompt, max_new_tokens))
        if CONTEXT_BEGIN in messages[0]["content"]:
            return Generation(notes_reply(["listing files"]), prompt_tokens=prompt, completion_tokens=10)
        return Generation('{"tool": "list_files", "args": {}}', prompt_tokens=prompt, completion_tokens=10)


def test_token_limit_is_never_passed(repo):
    model = Chatty()
    result = loop(repo, model, max_tokens=1600, max_turns=30)
    assert result.stop_reason == "max_tokens" and "the notes update was not run" in result.message
    (info,) = result.iterations
    assert result.tokens <= 1600
    assert info.turns == len(model.calls) == 3 and "token limit" in info.note  # no call that cannot fit
    assert info.update_status == "token_limit" and result.notes == ""  # the update did not fit: not run
    spent = 0
    for prompt, cap in model.calls:  # each call may generate only what its prompt leaves of the limit
        assert cap <= 1600 - spent - prompt
        spent += prompt + 10
    assert model.calls[-1][1] < 100


def test_token_limit_counts_tokens_of_earlier_runs(repo):
    loop(repo, Chatty(), max_tokens=1600)
    model = Chatty()
    again = loop(repo, model, max_tokens=1600)
    assert (again.stop_reason, again.iterations_run, model.calls) == ("max_tokens", 0, [])
    assert "cannot hold a model call" in again.message


def test_turn_limit_ends_an_iteration_and_runs_the_check(repo):
    result = loop(repo, Chatty(), max_turns=3, max_iterations=1)
    (info,) = result.iterations
    assert info.turns == 3 and info.check_passed is False
    assert "all 3 tool calls" in info.note


def test_completion_marker_in_output_longer_than_the_agent_is_shown_is_seen(repo):
    say = f"{PYTHON} -c \"print('x' * 3000); print('<promise>COMPLETE</promise>'); print('y' * 6000)\""
    result = run_loop(repo, check=CHECK, agent_cmd=say, max_iterations=3)
    assert result.stop_reason == "completion_marker" and len(result.iterations) == 1


def test_stop_messages_count_in_words(repo):
    assert loop(repo, forgetful(), max_iterations=1).message == "reached the limit of 1 iteration"


def test_completion_marker_stops_the_loop_without_passing(repo):
    model = ScriptedModel(lambda m: "All finished. <promise>COMPLETE</promise>", learn_from_check)
    result = loop(repo, model)
    assert (result.stop_reason, result.passed, len(result.iterations)) == ("completion_marker", False, 1)


def test_an_agent_command_echoing_its_prompt_does_not_claim_completion(repo):
    result = run_loop(repo, check=CHECK, agent_cmd="cat", max_iterations=1)
    assert result.stop_reason == "max_iterations" and not result.iterations[0].completion_marker


def test_no_progress_breaker_stops_after_k_idle_iterations(repo):
    idle = ScriptedModel(lambda m: '{"tool": "done", "args": {}}', learn_from_check)
    result = loop(repo, idle, max_iterations=10, max_no_progress=2, max_same_failure=10)
    assert (result.stop_reason, len(result.iterations)) == ("no_progress", 2)


def test_notes_changes_alone_are_not_progress(repo):
    idle = ScriptedModel(lambda m: '{"tool": "done", "args": {}}', lambda m: notes_reply([f"note {time.time_ns()}"]))
    result = loop(repo, idle, max_iterations=10, max_no_progress=2, max_same_failure=10)
    assert result.stop_reason == "no_progress"


def attempts(messages) -> str:
    """Changes a file every iteration but never fixes calc.py: same failing output, with progress."""
    if turn(messages) == 0:
        return json.dumps({"tool": "write_file", "args": {"path": "attempts.txt", "content": str(time.time_ns())}})
    return '{"tool": "done", "args": {}}'


def test_same_failure_breaker_stops_after_k_identical_failures(repo):
    result = loop(repo, ScriptedModel(attempts, learn_from_check), max_iterations=10, max_same_failure=3, max_no_progress=10)
    assert (result.stop_reason, len(result.iterations)) == ("same_failure", 3)


def test_same_failure_ignores_durations_in_the_check_output(repo):
    timed = f"{CHECK}; status=$?; echo \"ran in 0.$(date +%N)s\"; exit $status"
    result = run_loop(repo, check=timed, model=ScriptedModel(attempts, learn_from_check), max_iterations=10,
                      max_same_failure=2, max_no_progress=10)
    assert (result.stop_reason, len(result.iterations)) == ("same_failure", 2)


def test_changing_failures_do_not_trip_the_same_failure_breaker(repo):
    counter = iter(range(100, 200))
    model = ScriptedModel(lambda m: write_calc(next(counter)) if turn(m) == 0 else '{"tool": "done"}', learn_from_check)
    result = loop(repo, model, max_iterations=4, max_same_failure=2)
    assert result.stop_reason == "max_iterations"


# ---------------------------------------------------------------- notes edited by a person
def test_notes_edited_between_runs_are_taken_in_as_a_new_version(repo):
    loop(repo, forgetful(), max_iterations=1)
    (repo / "NOTES.md").write_text(f"A person says: secret() must return {SECRET}.\n")
    result = loop(repo, forgetful(), max_iterations=2)
    assert (result.stop_reason, len(result.iterations)) == ("check_passed", 2)
    edits = [v for v in loop_status(repo).notes_history if v.source == "edit"]
    assert len(edits) == 1 and "A person says" in edits[0].text
    assert result.iterations[1].context_version == edits[0].version


LINK_NOTES_OUT = "ln -sf {target} NOTES.md; echo linked"


@pytest.mark.parametrize("with_model", [False, True], ids=["agent-notes", "update-notes"])
def test_notes_file_turned_into_a_symlink_leading_out_is_neither_read_nor_written(repo, tmp_path, with_model):
    outside = tmp_path / "outside.txt"
    outside.write_text("private text\n")
    result = run_loop(repo, check=CHECK, agent_cmd=LINK_NOTES_OUT.format(target=shlex.quote(str(outside))),
                      model=learner() if with_model else None, max_iterations=3)
    assert result.stop_reason == "error" and "leads outside the repository through a symlink" in result.message
    assert outside.read_text() == "private text\n"
    assert "private text" not in result.notes
    with Store(result.db) as store:
        assert all("private text" not in v.text for v in store.history("ralph"))
        assert [r["status"] for r in store.runs("ralph")] == ["error"]


def test_loop_goes_on_once_the_symlinked_notes_file_is_removed(repo, tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("private text\n")
    link_once = f"{AGENT}; test -e linked.txt || {{ touch linked.txt; ln -sf {shlex.quote(str(outside))} NOTES.md; }}"
    assert run_loop(repo, check=CHECK, agent_cmd=link_once, max_iterations=5).stop_reason == "error"
    (repo / "NOTES.md").unlink()
    again = run_loop(repo, check=CHECK, agent_cmd=link_once, max_iterations=5)
    assert again.resumed == 1 and again.passed
    assert outside.read_text() == "private text\n"


def test_prompt_edited_while_the_loop_is_stopped_is_taken_in_and_committed(repo):
    loop(repo, forgetful(), max_iterations=1)
    (repo / "PROMPT.md").write_text("Task, second version: make the check pass.\n")
    seen = []

    def solve(messages):
        seen.append(messages[1]["content"])
        return '{"tool": "done"}'

    result = loop(repo, ScriptedModel(solve, learn_from_check), max_iterations=2)
    assert result.stop_reason == "max_iterations" and "second version" in seen[0]
    assert commits(repo)[1] == "ralph: commit changes made before the loop started"
    assert git(repo, "show", "--name-only", "--format=", "HEAD~1").split() == ["PROMPT.md"]


def test_prompt_edited_after_a_kill_is_not_stashed_with_the_partial_work(repo):
    with pytest.raises(KeyboardInterrupt):  # iteration 2 dies at its second turn, after writing calc.py
        loop(repo, Interrupting(lambda m: "Iteration 2 of" in m[1]["content"] and turn(m) == 1))
    (repo / "PROMPT.md").write_text("Task, second version: make the check pass.\n")
    seen = []

    def solve(messages):
        seen.append(messages[1]["content"])
        return fix_from_hints(messages)

    result = loop(repo, ScriptedModel(solve, learn_from_check))
    assert (result.stop_reason, result.resumed) == ("check_passed", 2)
    assert "second version" in seen[0]
    assert "PROMPT.md" not in git(repo, "stash", "show", "--include-untracked", "--name-only", "stash@{0}")


def test_notes_edited_while_an_iteration_runs_are_taken_in_after_the_update(repo):
    def solve(messages):
        if turn(messages) == 0:  # a person edits the notes file while the agent works
            (repo / "NOTES.md").write_text("A person says: read check.py first.\n")
            return write_calc(1)
        return '{"tool": "done"}'

    events = []
    result = loop(repo, ScriptedModel(solve, learn_from_check), max_iterations=1, on_event=events.append)
    history = loop_status(repo).notes_history
    assert [v.source for v in history] == ["init", "update", "edit"]
    assert f"must return {SECRET}" in history[1].text  # the update's notes are kept in the history
    assert "A person says" in history[2].text and "during iteration 1" in history[2].note
    assert "A person says" in result.notes and "A person says" in (repo / "NOTES.md").read_text()
    assert result.iterations[0].notes_version == 1
    assert any(e.kind == "notes_edit" and "while iteration 1 ran" in e.message for e in events)


LONG_NOTES_AGENT = f"""\
import pathlib, sys
sys.stdin.read()
notes = pathlib.Path("NOTES.md")
text = notes.read_text() if notes.exists() else ""
n = text.count("LESSON") + 1
notes.write_text(text + f"LESSON {{n}}: " + "word " * 300 + "\\n")
pathlib.Path("attempt.txt").write_text(str(n))
"""


def test_agent_notes_over_the_budget_are_cut_at_a_word_boundary_recorded_and_reported(tmp_path):
    repo = make_repo(tmp_path / "repo", extra={"long_notes.py": LONG_NOTES_AGENT})
    events = []
    result = run_loop(repo, check=CHECK, agent_cmd=f"{PYTHON} long_notes.py", max_iterations=3, max_same_failure=10,
                      on_event=events.append)
    status = loop_status(repo)
    assert [i.notes_version for i in status.iterations] == [1, 2, 3]
    third = status.notes_history[3]
    assert re.search(r"truncated: the notes file was 45\d\d characters, budget 4000", third.note)
    assert len(third.text) <= 4000 and third.text.endswith("word") and result.notes == third.text
    assert any(e.kind == "notes" and e.iteration == 3 and "over the notes budget of 4000" in e.message for e in events)
    with Store(result.db) as store:
        prompt = store.episodes("ralph", kind="solve", task_id="iter-1")[0].messages[0]["content"]
    assert "under 4000 characters" in prompt


def test_status_finds_agent_notes_that_earlier_releases_stored_without_an_episode(tmp_path):
    import sqlite3

    repo = make_repo(tmp_path / "repo", extra={"long_notes.py": LONG_NOTES_AGENT})
    run_loop(repo, check=CHECK, agent_cmd=f"{PYTHON} long_notes.py", max_iterations=2, max_same_failure=10)
    db = sqlite3.connect(repo / ".lifecycle-agent" / "ralph.db")
    db.execute("UPDATE contexts SET episode_id = NULL WHERE source = 'agent-notes'")  # as an earlier release wrote them
    db.commit()
    db.close()
    assert [i.notes_version for i in loop_status(repo).iterations] == [1, 2]


def test_notes_seeded_before_the_first_iteration_are_used(repo):
    (repo / "NOTES.md").write_text(f"secret() must return {SECRET}\n")
    git(repo, "add", "NOTES.md")
    git(repo, "commit", "-qm", "seed notes")
    result = loop(repo, forgetful())
    assert (result.stop_reason, len(result.iterations)) == ("check_passed", 1)


# ---------------------------------------------------------------- crash and resume
class Interrupting(ScriptedModel):
    """A learner that raises KeyboardInterrupt at one call (as Ctrl-C would), once."""

    def __init__(self, when):
        super().__init__(fix_from_hints, learn_from_check)
        self.when = when

    def generate(self, messages, *, temperature=None, max_new_tokens=None):
        if self.when(messages):
            self.when = lambda m: False
            raise KeyboardInterrupt
        return super().generate(messages, temperature=temperature, max_new_tokens=max_new_tokens)


def is_update_of(messages, n: int) -> bool:
    return CONTEXT_BEGIN in messages[0]["content"] and f"Iteration {n} of" in messages[-1]["content"]


def solve_episodes(db: str, task_id: str) -> int:
    with Store(db) as store:
        return len(store.episodes("ralph", kind="solve", task_id=task_id))


def test_interrupted_before_the_check_resumes_from_the_last_finished_iteration(repo):
    # iteration 2 writes calc.py, then dies at its second turn: the solve never got stored
    model = Interrupting(lambda m: "Iteration 2 of" in m[1]["content"] and turn(m) == 1)
    with pytest.raises(KeyboardInterrupt):
        loop(repo, model, max_iterations=5)
    assert json.loads((repo / ".lifecycle-agent" / "ralph-ralph.state.json").read_text())["iteration"] == 2
    notes_after_1 = loop_status(repo).notes
    result = loop(repo, learner())
    assert (result.stop_reason, result.resumed, result.iterations_run) == ("check_passed", 2, 1)
    assert solve_episodes(result.db, "iter-1") == 1
    assert result.iterations[1].context_version == result.iterations[0].notes_version
    assert notes_after_1 == loop_status(repo).notes_history[result.iterations[1].context_version].text
    assert "partial work of interrupted iteration 2" in git(repo, "stash", "list")


def test_interrupted_during_the_update_finishes_it_without_solving_again(repo):
    with pytest.raises(KeyboardInterrupt):
        loop(repo, Interrupting(lambda m: is_update_of(m, 1)))
    assert git(repo, "diff", "HEAD", "--name-only").split() == ["calc.py"]
    result = loop(repo, learner())
    assert (result.stop_reason, result.resumed) == ("check_passed", 1)
    assert solve_episodes(result.db, "iter-1") == 1
    assert commits(repo)[:2] == ["ralph: iteration 2, check passed", "ralph: iteration 1, check failed"]


def test_interrupted_before_the_commit_commits_the_finished_iteration(repo, monkeypatch):
    real_commit = GitRepo.commit

    def crash_once(self, message):
        monkeypatch.setattr(GitRepo, "commit", real_commit)
        raise KeyboardInterrupt

    monkeypatch.setattr(GitRepo, "commit", crash_once)
    with pytest.raises(KeyboardInterrupt):
        loop(repo, learner())
    result = loop(repo, learner())
    assert (result.stop_reason, result.resumed, len(result.iterations)) == ("check_passed", 1, 2)
    assert solve_episodes(result.db, "iter-1") == 1
    assert all(i.commit for i in result.iterations)


def test_model_error_stops_the_loop_and_a_rerun_redoes_the_iteration(repo):
    def broken(messages):
        raise ModelCallError("endpoint down")

    result = loop(repo, ScriptedModel(broken, learn_from_check))
    assert (result.stop_reason, result.passed) == ("error", False)
    assert "endpoint down" in result.message
    again = loop(repo, learner())
    assert (again.stop_reason, again.resumed, [i.iteration for i in again.iterations if i.finished]) == (
        "check_passed", 1, [1, 2]
    )


KILL_SCRIPT = """\
import json, pathlib, re, sys, time
sys.path.insert(0, {tests!r})
from lifecycle_agent.models.scripted import ScriptedModel
from lifecycle_agent.ralph import run_loop
import test_ralph as t

def solve(messages):
    if "Iteration 2 of" in messages[1]["content"] and t.turn(messages) == 1:
        pathlib.Path({ready!r}).write_text("x")
        time.sleep(60)
    return t.fix_from_hints(messages)

run_loop({repo!r}, check=t.CHECK, model=ScriptedModel(solve, t.learn_from_check), max_iterations=5)
"""


def test_killed_loop_resumes_with_the_same_notes(repo, tmp_path):
    ready = tmp_path / "ready"
    script = KILL_SCRIPT.format(tests=str(Path(__file__).parent), ready=str(ready), repo=str(repo))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "the loop never reached iteration 2"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert commits(repo)[0] == "ralph: iteration 1, check failed"
    assert f"must return {SECRET}" in git(repo, "show", "HEAD:NOTES.md")
    assert loop_status(repo).in_progress["running"] is False
    result = loop(repo, learner())
    assert (result.stop_reason, result.resumed, len(result.iterations)) == ("check_passed", 2, 2)
    assert solve_episodes(result.db, "iter-1") == 1
    assert result.iterations[1].context_version == result.iterations[0].notes_version


# An agent command that starts a helper in its process group (as a coding CLI runs its tools),
# says where it is, and works on; the helper writes late.txt into the repository later.
LINGERING_AGENT = """\
import os, pathlib, subprocess, sys, time
sys.stdin.read()
late = "import pathlib, time; time.sleep(float({late!r})); pathlib.Path('late.txt').write_text('late')"
subprocess.Popen([sys.executable, "-c", late])
pathlib.Path({ready!r}).write_text(f"{{os.getpid()}} {{os.getppid()}} {{os.getpgrp()}}")
time.sleep(60)
"""


def proc_stat(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return []


def running(pid: int) -> bool:
    stat = proc_stat(pid)
    return bool(stat) and stat[0] not in ("Z", "X")


def group_running(group: int) -> bool:
    return any(running(int(p)) and proc_stat(int(p))[2:3] == [str(group)] for p in os.listdir("/proc") if p.isdigit())


def stop_leftovers(group: int) -> None:
    """Kill what a failed test left running in process group ``group``."""
    if group_running(group):
        os.killpg(group, signal.SIGKILL)


def start_lingering_loop(repo: Path, tmp_path: Path, late: float) -> tuple[subprocess.Popen, list[int]]:
    """The loop (the CLI) in a process of its own, once its agent command and the helper run: (process, pids)."""
    ready = tmp_path / "ready"
    (tmp_path / "agent.py").write_text(LINGERING_AGENT.format(late=str(late), ready=str(ready)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "lifecycle_agent", "ralph", "--repo", str(repo), "--check", CHECK,
         "--agent-cmd", f"{PYTHON} {shlex.quote(str(tmp_path / 'agent.py'))}", "--max-iterations", "3"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while not ready.exists() or not ready.read_text():
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.monotonic() < deadline, "the agent command never started"
        time.sleep(0.05)
    return proc, [int(n) for n in ready.read_text().split()]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_or_sighup_stops_the_agent_command_with_its_process_group(repo, tmp_path, sig):
    proc, (agent, _, group) = start_lingering_loop(repo, tmp_path, late=1.5)
    try:
        proc.send_signal(sig)
        out = proc.communicate(timeout=30)[0].decode()
        assert proc.returncode == 128 + sig, out
        assert f"stopped by {signal.Signals(sig).name}" in out
        assert not running(agent)
        time.sleep(2.5)
        assert not (repo / "late.txt").exists()
    finally:
        stop_leftovers(group)
    assert loop_status(repo).runs[-1].stop_reason == "interrupted"
    assert not (repo / ".lifecycle-agent" / "ralph-ralph.groups.json").exists()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_a_loop_started_after_a_sigkill_stops_what_the_killed_loop_left_running(repo, tmp_path):
    proc, (agent, parent, group) = start_lingering_loop(repo, tmp_path, late=LATE_WRITE_S)
    try:
        killed_at = time.monotonic()
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        check_after_the_kill(repo, agent if parent == proc.pid else parent, group, killed_at)
    finally:
        stop_leftovers(group)


#: When the lingering helper writes late.txt: long enough that a loaded machine restarts the
#: loop before it (the test then proves the helper is gone, so it never writes at all).
LATE_WRITE_S = 20



def check_after_the_kill(repo: Path, child: int, group: int, killed_at: float) -> None:
    deadline = time.monotonic() + 5
    while running(child) and time.monotonic() < deadline:  # the loop's direct child dies with it (Linux)
        time.sleep(0.05)
    assert not running(child)
    status = loop_status(repo)
    assert (status.runs[-1].stop_reason, status.runs[-1].stale, status.in_progress["running"]) == (
        "interrupted", True, False
    )
    events = []
    result = run_loop(repo, check=CHECK, agent_cmd="true", max_iterations=1, on_event=events.append)
    assert time.monotonic() - killed_at < LATE_WRITE_S, "too slow to tell: the helper may have written late.txt already"
    assert result.resumed == 1
    assert any(e.kind == "setup" and f"stopped process group {group}" in e.message for e in events)
    assert not group_running(group)  # so nothing of it can write later
    assert not (repo / "late.txt").exists()
    assert "late.txt" not in git(repo, "log", "--all", "--name-only", "--format=")


# ---------------------------------------------------------------- safety and bad input
def test_not_a_git_repository_is_refused(tmp_path):
    (tmp_path / "PROMPT.md").write_text("task")
    with pytest.raises(RalphError, match="is not a git repository; run `git init`"):
        run_loop(tmp_path, check="true", model=learner())


def test_a_subdirectory_of_a_repository_is_refused(repo):
    (repo / "sub").mkdir()
    with pytest.raises(RalphError, match="is inside the git repository"):
        run_loop(repo / "sub", check="true", model=learner())


def test_missing_prompt_file_is_refused(repo):
    with pytest.raises(RalphError, match="prompt file TASK.md not found"):
        loop(repo, learner(), prompt="TASK.md")


def test_empty_prompt_file_is_refused(repo):
    (repo / "PROMPT.md").write_text("  \n")
    git(repo, "commit", "-qam", "empty prompt")
    with pytest.raises(RalphError, match="is empty"):
        loop(repo, learner())


def test_missing_check_program_is_refused(repo):
    with pytest.raises(RalphError, match="program 'no-such-checker' was not found"):
        run_loop(repo, check="no-such-checker --all", model=learner())


def test_check_the_shell_cannot_find_is_refused(repo):
    with pytest.raises(RalphError, match="the shell could not find the command"):
        run_loop(repo, check="cd . && no-such-checker", model=learner())


def test_missing_agent_program_is_refused(repo):
    with pytest.raises(RalphError, match="--agent-cmd 'no-such-agent -p': program 'no-such-agent'"):
        run_loop(repo, check=CHECK, agent_cmd="no-such-agent -p")


def test_uncommitted_changes_are_refused(repo):
    (repo / "calc.py").write_text("def secret():\n    return 3\n")
    with pytest.raises(RalphError, match=r"uncommitted changes \(calc.py\).*--allow-dirty"):
        loop(repo, learner())
    assert solve_episodes_if_any(repo) == 0


def solve_episodes_if_any(repo: Path) -> int:
    db = repo / ".lifecycle-agent" / "ralph.db"
    if not db.exists():
        return 0
    with Store(db) as store:
        return store.count_episodes("ralph", "solve") if store.has_agent("ralph") else 0


def test_allow_dirty_commits_the_changes_before_the_first_iteration(repo):
    (repo / "extra.txt").write_text("work in progress\n")
    result = loop(repo, learner(), allow_dirty=True)
    assert commits(repo)[2] == "ralph: commit changes made before the loop started"
    assert git(repo, "show", "--name-only", "--format=", "HEAD~2").split() == ["extra.txt"]
    assert "extra.txt" not in result.iterations[0].changed_files


def test_files_the_first_check_writes_are_not_committed_as_changes_made_before_the_loop(repo):
    (repo / "extra.txt").write_text("work in progress\n")
    result = run_loop(repo, check=f"echo ran > check.log && {CHECK}", model=learner(), allow_dirty=True, max_iterations=5)
    assert commits(repo)[2] == "ralph: commit changes made before the loop started"
    assert git(repo, "show", "--name-only", "--format=", "HEAD~2").split() == ["extra.txt"]
    assert result.stop_reason == "check_passed"


def test_a_killed_iteration_resumes_in_a_repository_that_had_no_commit(tmp_path):
    repo = tmp_path / "fresh"
    repo.mkdir()
    git(repo, "init", "-q")
    for name, text in {"calc.py": "def secret():\n    return 0\n", "check.py": CHECK_PY, ".gitignore": "__pycache__/\n",
                       "PROMPT.md": "Make `python check.py` pass.\n"}.items():
        (repo / name).write_text(text)
    with pytest.raises(KeyboardInterrupt):  # iteration 1 writes calc.py, then dies at its second turn
        loop(repo, Interrupting(lambda m: turn(m) == 1), allow_dirty=True)
    result = loop(repo, learner(), allow_dirty=True)
    assert (result.stop_reason, result.resumed) == ("check_passed", 1)
    assert commits(repo)[-1] == "ralph: commit changes made before the loop started"
    assert "PROMPT.md" in git(repo, "show", "--name-only", "--format=", commits_ids(repo)[-1])
    assert "partial work of interrupted iteration 1" in git(repo, "stash", "list")


def commits_ids(repo: Path) -> list[str]:
    return git(repo, "log", "--format=%H").split()


def test_bad_options_name_the_option(repo):
    with pytest.raises(RalphError, match="max_iterations"):
        loop(repo, learner(), max_iterations=0)
    with pytest.raises(RalphError, match="output_chars"):
        loop(repo, learner(), output_chars=10)


def test_notes_file_outside_the_repository_is_refused(repo):
    with pytest.raises(RalphError, match="notes_file"):
        loop(repo, learner(), notes_file="../NOTES.md")


def test_token_limit_without_a_model_is_refused(repo):
    with pytest.raises(RalphError, match="--max-tokens"):
        run_loop(repo, check=CHECK, agent_cmd=AGENT, max_tokens=1000)


def test_a_second_loop_on_the_same_repository_is_refused(repo):
    import fcntl

    (repo / ".lifecycle-agent").mkdir()
    with open(repo / ".lifecycle-agent" / "ralph-ralph.lock", "w") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        with pytest.raises(RalphError, match="another Ralph loop is running"):
            loop(repo, learner())


def test_commits_work_without_a_git_identity(repo, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", os.devnull)
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    for var in ("GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL", "EMAIL"):
        monkeypatch.delenv(var, raising=False)
    result = loop(repo, learner())
    assert result.passed
    assert git(repo, "log", "-1", "--format=%ae").strip() == FALLBACK_EMAIL


def test_check_timeout_is_a_failed_check(repo):
    result = run_loop(repo, check=f"{CHECK} && sleep 0 || sleep 30", model=learner(), check_timeout=0.5, max_iterations=1)
    (info,) = result.iterations
    assert info.check_timed_out and info.check_passed is False


def test_damaged_state_file_is_an_error_naming_it(repo):
    (repo / ".lifecycle-agent").mkdir()
    (repo / ".lifecycle-agent" / "ralph-ralph.state.json").write_text("{not json")
    with pytest.raises(RalphError, match="state file .* is damaged"):
        loop(repo, learner())


BAD_ARGUMENTS = [
    '{"tool": "read_file", "args": {"path": "calc.py", "start": 1e999}}',
    '{"tool": "read_file", "args": {"path": "calc\\u0000.py"}}',
    '{"tool": "run_command", "args": {"command": "echo hi", "timeout": NaN}}',
]


def test_bad_tool_arguments_come_back_to_the_agent_and_the_iteration_goes_on(repo):
    def solve(messages):
        n = turn(messages)
        if n < len(BAD_ARGUMENTS):
            return BAD_ARGUMENTS[n]
        return write_calc(1) if n == len(BAD_ARGUMENTS) else '{"tool": "done"}'

    result = loop(repo, ScriptedModel(solve, learn_from_check), max_iterations=1)
    (info,) = result.iterations
    assert result.stop_reason == "max_iterations" and info.status == "ok"
    assert info.turns == len(BAD_ARGUMENTS) + 2 and info.check_verdict == "failed (exit code 1)"
    with Store(result.db) as store:
        solve_episode = store.episodes("ralph", kind="solve")[0]
    errors = [m["content"] for m in solve_episode.messages if m["role"] == "user"][1:1 + len(BAD_ARGUMENTS)]
    assert ["'start' must be" in errors[0], "NUL character" in errors[1], "'timeout' must be" in errors[2]] == [True] * 3


def test_tool_agent_cannot_write_outside_the_repository(repo, tmp_path):
    outside = tmp_path / "outside.txt"
    escape = json.dumps({"tool": "write_file", "args": {"path": str(outside), "content": "x"}})
    model = ScriptedModel(lambda m: escape if turn(m) == 0 else '{"tool": "done"}', learn_from_check)
    loop(repo, model, max_iterations=1)
    assert not outside.exists()
    with Store(repo / ".lifecycle-agent" / "ralph.db") as store:
        solve = store.episodes("ralph", kind="solve")[0]
    assert "absolute paths are not allowed" in solve.messages[3]["content"]


def test_prompt_file_is_re_read_every_iteration(repo):
    seen = []

    def solve(messages):
        if turn(messages) == 0:
            seen.append(messages[1]["content"].split("### Iteration")[0])
            (repo / "PROMPT.md").write_text(f"Task version {len(seen) + 1}\n")
        return '{"tool": "done"}'

    loop(repo, ScriptedModel(solve, learn_from_check), max_iterations=2, allow_dirty=True)
    assert "Make `python check.py` pass" in seen[0] and "Task version 2" in seen[1]


def test_python_api_and_options_are_stored_with_the_run(repo):
    result = loop(repo, learner(), max_iterations=4)
    with Store(result.db) as store:
        run = [r for r in store.runs("ralph") if r["run_id"] == result.run_id][0]
    assert run["status"] == "check_passed" and json.loads(run["options"])["max_iterations"] == 4


MARKUP = "[/INST] [bold]"
MARKUP_AGENT = f"""\
import pathlib
pathlib.Path("NOTES.md").write_text("Lesson {MARKUP}\\n")
pathlib.Path("[red]made.txt").write_text("x")
print("{MARKUP}")
"""


@pytest.fixture
def wide_console(monkeypatch):
    from rich.console import Console

    import lifecycle_agent.cli.ralph as cli_ralph

    out = io.StringIO()
    monkeypatch.setattr(cli_ralph, "console", Console(file=out, width=400, color_system=None))
    return out


def run_cli(*args: str) -> int:
    from lifecycle_agent.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    return exit_info.value.code


def test_cli_prints_text_from_the_agent_and_the_check_as_it_is_not_as_markup(wide_console, tmp_path):
    repo = make_repo(tmp_path / "repo", extra={"markup_agent.py": MARKUP_AGENT})
    code = run_cli("ralph", "--repo", str(repo), "--agent-cmd", f"{PYTHON} markup_agent.py",
                   "--check", f"echo '{MARKUP} check'; exit 1", "--max-iterations", "1")
    out = wide_console.getvalue()
    assert code == 1
    assert f"{MARKUP} check" in out  # the last check line
    assert f"Lesson {MARKUP}" in out  # the notes
    assert "[red]made.txt" in out  # a file the agent created


def test_cli_status_prints_notes_and_check_output_as_they_are(wide_console, tmp_path):
    repo = make_repo(tmp_path / "repo", extra={"markup_agent.py": MARKUP_AGENT})
    run_cli("ralph", "--repo", str(repo), "--agent-cmd", f"{PYTHON} markup_agent.py",
            "--check", f"echo '{MARKUP} check'; exit 1", "--max-iterations", "1", "--json")
    wide_console.truncate(0)
    run_cli("ralph", "status", "--repo", str(repo))
    out = wide_console.getvalue()
    assert f"{MARKUP} check" in out and f"Lesson {MARKUP}" in out


def test_import_of_the_loop_stays_light():
    code = "import sys, lifecycle_agent.ralph; print(sorted(m for m in ('torch', 'transformers', 'agentscope') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"



# ---------------------------------------------------------------- the real SmolLM2 (slow)
@pytest.mark.slow
def test_builtin_agent_runs_an_iteration_with_the_real_smollm2(repo):
    result = loop(repo, "smollm2", max_iterations=1, max_turns=1, max_new_tokens=24, temperature=0.6)
    (info,) = result.iterations
    assert result.stop_reason in ("max_iterations", "completion_marker") and not result.passed
    assert info.finished and info.turns == 1 and info.commit == git(repo, "rev-parse", "HEAD").strip()
    assert info.update_status in ("ok", "format_miss", "failed") and result.tokens > 0
    with Store(result.db) as store:
        solve = store.episodes("ralph", kind="solve", task_id="iter-1")[0]
    assert solve.model_id == "smollm2" and solve.turns[0]["completion_ids"]


def test_an_agent_command_that_leaves_a_background_child_does_not_hold_the_iteration(repo):
    started = time.monotonic()
    result = run_loop(repo, check=CHECK, agent_cmd="(while true; do sleep 1; done) & echo started", max_iterations=1,
                      max_minutes=2)
    assert time.monotonic() - started < 30  # the iteration ended with the agent, not at --max-minutes
    assert result.stop_reason == "max_iterations" and len(result.iterations) == 1
