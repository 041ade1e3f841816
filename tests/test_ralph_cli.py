"""``lifecycle-agent ralph`` and ``lifecycle-agent ralph status`` on the command line."""

from __future__ import annotations

import json

import pytest

from lifecycle_agent.cli import main
from test_ralph import AGENT, CHECK, PYTHON, SECRET, make_repo

SCRIPTED_AGENT_MODULE = '''\
import json, re
from lifecycle_agent import CONTEXT_BEGIN, CONTEXT_END
from lifecycle_agent.models.scripted import ScriptedModel, hints, section


def solve(messages):
    if sum(1 for m in messages if m["role"] == "assistant"):
        return '{"tool": "done"}'
    lesson = re.search(r"must return (\\d+)", hints(messages))
    code = f"def secret():\\n    return {lesson.group(1) if lesson else 1}\\n"
    return json.dumps({"tool": "write_file", "args": {"path": "calc.py", "content": code}})


def update(messages):
    seen = re.search(r"expected (\\d+)", section(messages[-1]["content"], "Result"))
    note = f"secret() must return {seen.group(1)}" if seen else "no lesson"
    return CONTEXT_BEGIN + "\\n" + note + "\\n" + CONTEXT_END


model = ScriptedModel(solve, update)
'''


def cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, " ".join(err.split())  # rich wraps long error lines


@pytest.fixture
def repo(tmp_path):
    return make_repo(tmp_path / "repo")


def test_ralph_with_an_agent_command_exits_0_when_the_check_passes(repo, capsys):
    code, out, _ = cli(capsys, "ralph", "--repo", str(repo), "--agent-cmd", AGENT, "--check", CHECK, "--max-iterations", "5")
    assert code == 0
    assert "stopped (check_passed)" in out and "iteration 2" in out
    assert f"secret() must return {SECRET}" in (repo / "NOTES.md").read_text()


def test_ralph_with_a_model_spec_runs_the_builtin_agent(repo, capsys, tmp_path, monkeypatch):
    (tmp_path / "ralph_cli_agent.py").write_text(SCRIPTED_AGENT_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    code, out, _ = cli(
        capsys, "ralph", "--repo", str(repo), "--model", "py:ralph_cli_agent:model", "--check", CHECK, "--json",
    )
    result = json.loads(out)
    assert code == 0 and result["stop_reason"] == "check_passed" and len(result["iterations"]) == 2


def test_ralph_exits_1_when_a_limit_stops_it(repo, capsys):
    code, out, _ = cli(capsys, "ralph", "--repo", str(repo), "--agent-cmd", "true", "--check", CHECK, "-n", "1", "--json")
    assert code == 1 and json.loads(out)["stop_reason"] == "max_iterations"


def test_ralph_status_json_shows_iterations_and_notes_history(repo, capsys):
    cli(capsys, "ralph", "--repo", str(repo), "--agent-cmd", AGENT, "--check", CHECK, "--json")
    code, out, _ = cli(capsys, "ralph", "status", "--repo", str(repo), "--json")
    status = json.loads(out)
    assert code == 0 and status["passed"] is True
    assert [i["check_passed"] for i in status["iterations"]] == [False, True]
    assert [v["source"] for v in status["notes_history"]] == ["init", "agent-notes"]
    assert status["runs"][0]["stop_reason"] == "check_passed"


def test_ralph_status_prints_tables(repo, capsys):
    cli(capsys, "ralph", "--repo", str(repo), "--agent-cmd", AGENT, "--check", CHECK, "--json")
    code, out, _ = cli(capsys, "ralph", "status", "--repo", str(repo))
    assert code == 0
    assert "2 iterations" in out and "notes history" in out and "agent-notes" in out and "check_passed" in out


def test_ralph_on_a_directory_that_is_not_a_repository_is_an_error(tmp_path, capsys):
    code, _, err = cli(capsys, "ralph", "--repo", str(tmp_path), "--agent-cmd", AGENT, "--check", CHECK)
    assert code == 2 and "is not a git repository" in err


def test_ralph_without_a_check_is_a_usage_error(repo, capsys):
    code, _, err = cli(capsys, "ralph", "--repo", str(repo), "--agent-cmd", AGENT)
    assert code == 2 and "--check" in err


def test_ralph_status_without_a_loop_is_an_error(repo, capsys):
    code, _, err = cli(capsys, "ralph", "status", "--repo", str(repo))
    assert code == 2 and "no Ralph loop has run" in err


def test_ralph_refuses_a_crashing_check_program_before_starting(repo, capsys):
    code, _, err = cli(capsys, "ralph", "--repo", str(repo), "--agent-cmd", AGENT, "--check", f"{PYTHON}-nope check.py")
    assert code == 2 and "was not found" in err
    assert not (repo / ".lifecycle-agent" / "ralph.db").exists()


def test_ralph_checks_the_repository_and_the_check_before_loading_the_model(repo, capsys, tmp_path, monkeypatch):
    loaded = tmp_path / "loaded.txt"
    (tmp_path / "ralph_loading_marker.py").write_text(
        f"import pathlib\npathlib.Path({str(loaded)!r}).write_text('loaded')\nmodel = lambda messages: 'done'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    code, _, err = cli(capsys, "ralph", "--repo", str(repo), "--model", "py:ralph_loading_marker:model",
                       "--check", "no-such-checker -q")
    assert code == 2 and "program 'no-such-checker' was not found" in err
    assert not loaded.exists()


def test_ralph_mode_contradicting_the_options_is_an_error_before_anything_runs(repo, capsys):
    code, _, err = cli(capsys, "ralph", "--repo", str(repo), "--mode", "external", "--check", CHECK)
    assert code == 2 and "mode 'external' runs an agent command each iteration: give agent_cmd (--agent-cmd)" in err
    code, _, err = cli(capsys, "ralph", "--repo", str(repo), "--mode", "builtin", "--agent-cmd", AGENT, "--check", CHECK)
    assert code == 2 and "mode 'builtin'" in err
    assert not (repo / ".lifecycle-agent").exists()


def test_ralph_flags_are_the_config_field_names_and_keep_their_old_spellings(repo, capsys):
    code, out, _ = cli(capsys, "ralph", "--repo", str(repo), "--mode", "external", "--agent-cmd", AGENT, "--check", CHECK,
                       "--agent-id", "coder", "--max-iterations", "1", "--json")
    assert code == 1 and json.loads(out)["agent_id"] == "coder"
    for flag in ("--agent", "--agent-id", "-a"):
        code, out, _ = cli(capsys, "ralph", "status", "--repo", str(repo), flag, "coder", "--json")
        assert code == 0 and len(json.loads(out)["iterations"]) == 1


def test_ralph_option_limits_come_from_the_config(repo, capsys):
    code, _, err = cli(capsys, "ralph", "--repo", str(repo), "--agent-cmd", AGENT, "--check", CHECK, "--max-minutes", "0")
    assert code == 2 and "max_minutes" in err and "greater than 0" in err
    code, _, err = cli(capsys, "ralph", "--repo", str(repo), "--agent-cmd", AGENT, "--check", CHECK, "--output-chars", "10")
    assert code == 2 and "--output-chars" in err


def test_every_config_field_is_a_flag_named_after_it_with_its_default():
    import typer

    from lifecycle_agent.cli import app
    from lifecycle_agent.ralph import RalphConfig

    group = typer.main.get_command(app).commands["ralph"]
    options = {opt: param for param in group.params for opt in getattr(param, "opts", [])}
    for name, field in RalphConfig.model_fields.items():
        param = options[f"--{name.replace('_', '-')}"]
        assert param.help == field.description
        if not field.is_required():
            assert param.default == field.default, name
