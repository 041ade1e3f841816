"""The command line: run, context and agents commands, JSON output, and clear errors."""

import json
import os
from pathlib import Path

import pytest

from lifecycle_agent.cli import main
from lifecycle_agent.store import Store


@pytest.fixture
def cli(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")

    def invoke(*args):
        with pytest.raises(SystemExit) as exc:
            main([str(a) for a in args])
        out, err = capsys.readouterr()
        return exc.value.code, out, err

    return invoke


@pytest.fixture
def tasks_file(tmp_path):
    path = tmp_path / "tasks.jsonl"
    lines = [
        {"prompt": "What is the secret code of the apple?", "answer": "417", "id": "a1"},
        {"prompt": "What is the secret code of the apple?", "answer": "417", "id": "a2"},
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


def test_run_over_task_file_prints_table_and_context(cli, tasks_file, db_path):
    code, out, _ = cli("run", "--tasks", tasks_file, "--model", "scripted", "--db", db_path, "--agent", "bot")
    assert code == 0
    assert "run " in out and "mean reward 0.500" in out and "secret code" in out


def test_run_json_output_is_machine_readable(cli, tasks_file, db_path):
    code, out, _ = cli("run", "--tasks", tasks_file, "--model", "scripted", "--db", db_path, "--json")
    data = json.loads(out)
    assert code == 0 and [r["reward"] for r in data["records"]] == [0.0, 1.0]
    assert data["context_version"] == 2 and "417" in data["context"]


def test_run_again_resumes_and_skips_completed_tasks(cli, tasks_file, db_path):
    cli("run", "--tasks", tasks_file, "--model", "scripted", "--db", db_path, "--json")
    _, out, _ = cli("run", "--tasks", tasks_file, "--model", "scripted", "--db", db_path, "--json")
    assert json.loads(out)["skipped"] == ["a1", "a2"]


def test_run_over_builtin_environment(cli, db_path):
    code, out, _ = cli("run", "--env", "fact-recall", "--model", "scripted", "--db", db_path, "-n", "4", "--json")
    assert code == 0 and len(json.loads(out)["records"]) == 4


def test_malformed_jsonl_names_line_and_writes_nothing(cli, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": oops}\n')
    db = tmp_path / "never.db"
    code, _, err = cli("run", "--tasks", bad, "--model", "scripted", "--db", db)
    assert code == 2 and "bad.jsonl:2: invalid JSON" in err
    assert not db.exists()


def test_tasks_and_env_together_is_a_usage_error(cli, tasks_file, db_path):
    code, _, err = cli("run", "--tasks", tasks_file, "--env", "fact-recall", "--db", db_path)
    assert code == 2 and "exactly one of --tasks" in err


def test_unknown_model_spec_lists_valid_forms(cli, tasks_file, db_path):
    code, _, err = cli("run", "--tasks", tasks_file, "--model", "gpt9", "--db", db_path)
    assert code == 2 and "hf:PATH[@ADAPTER_DIR]" in err and "openai:MODEL" in err


def test_unknown_environment_lists_names(cli, db_path):
    code, _, err = cli("run", "--env", "nope", "--model", "scripted", "--db", db_path)
    assert code == 2 and "unknown environment 'nope'" in err and "fact-recall" in err


def test_missing_db_directory_is_a_clear_error(cli, tasks_file, tmp_path):
    code, _, err = cli("run", "--tasks", tasks_file, "--model", "scripted", "--db", tmp_path / "no" / "x.db")
    assert code == 2 and "does not exist" in err


def test_failed_tasks_give_exit_code_one(cli, tasks_file, db_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent / "helpers"))
    code, out, _ = cli("run", "--tasks", tasks_file, "--model", "py:broken_model:broken", "--db", db_path, "--json")
    assert code == 1 and all(r["status"] == "failed" for r in json.loads(out)["records"])


@pytest.fixture
def populated(cli, tasks_file, db_path):
    cli("run", "--tasks", tasks_file, "--model", "scripted", "--db", db_path, "--agent", "bot", "--json")
    return db_path


def test_context_show_and_history(cli, populated):
    code, out, _ = cli("context", "show", "--db", populated, "--agent", "bot", "--json")
    assert code == 0 and json.loads(out)["version"] == 2
    code, out, _ = cli("context", "history", "--db", populated, "--agent", "bot", "--json")
    assert [v["version"] for v in json.loads(out)] == [0, 1, 2]
    code, out, _ = cli("context", "show", "--db", populated, "--agent", "bot", "--version", "0")
    assert code == 0 and "(empty)" in out


def test_context_diff_rollback_fork(cli, populated):
    code, out, _ = cli("context", "diff", "0", "1", "--db", populated, "--agent", "bot")
    assert code == 0 and "+What is the secret code" in out
    code, out, _ = cli("context", "rollback", "1", "--db", populated, "--agent", "bot", "--json")
    assert json.loads(out)["version"] == 3
    code, out, _ = cli("context", "fork", "--to", "bot2", "--version", "1", "--db", populated, "--agent", "bot", "--json")
    assert json.loads(out)["forked_at_version"] == 1
    assert Store(populated).head("bot2").text == Store(populated).get_version("bot", 1).text


def test_context_export_import_round_trip(cli, populated, tmp_path):
    out_file = tmp_path / "bot.json"
    assert cli("context", "export", "--db", populated, "--agent", "bot", "--out", out_file)[0] == 0
    other = tmp_path / "other.db"
    code, out, _ = cli("context", "import", out_file, "--db", other, "--agent", "copy", "--json")
    assert code == 0 and json.loads(out)["head_version"] == 2


def test_context_import_bad_file_is_clear(cli, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    code, _, err = cli("context", "import", bad, "--db", tmp_path / "x.db")
    assert code == 2 and "bad.json:1: invalid JSON" in err


def test_context_set_respects_budget(cli, populated, tmp_path):
    note = tmp_path / "note.txt"
    note.write_text("hand written note")
    code, out, _ = cli("context", "set", "--file", note, "--db", populated, "--agent", "bot", "--json")
    assert code == 0 and json.loads(out)["source"] == "edit"
    note.write_text("x " * 5000)
    code, _, err = cli("context", "set", "--file", note, "--db", populated, "--agent", "bot")
    assert code == 2 and "over the context budget" in err


def test_context_commands_on_missing_db_never_create_it(cli, tmp_path):
    db = tmp_path / "typo.db"
    code, _, err = cli("context", "show", "--db", db, "--agent", "bot")
    assert code == 2 and "does not exist" in err and not db.exists()


def test_context_show_unknown_agent(cli, populated):
    code, _, err = cli("context", "show", "--db", populated, "--agent", "ghost")
    assert code == 2 and "no agent 'ghost'" in err


def test_agents_list_and_delete(cli, populated):
    code, out, _ = cli("agents", "list", "--db", populated, "--json")
    assert [a["agent_id"] for a in json.loads(out)] == ["bot"]
    assert cli("agents", "delete", "--db", populated, "--agent", "bot", "--yes")[0] == 0
    assert json.loads(cli("agents", "list", "--db", populated, "--json")[1]) == []


def test_help_lists_commands(cli):
    code, out, _ = cli("--help")
    assert code == 0 and "run" in out and "context" in out


def test_model_text_that_looks_like_markup_is_printed_verbatim(cli, db_path, tmp_path, monkeypatch):
    helper = tmp_path / "markup_model.py"
    helper.write_text(
        "from lifecycle_agent import CONTEXT_BEGIN, CONTEXT_END\n"
        "from lifecycle_agent.models.scripted import is_update\n"
        "def fn(messages):\n"
        "    if is_update(messages):\n"
        "        return CONTEXT_BEGIN + '\\n[/INST] [bold]note[/bold]\\n' + CONTEXT_END\n"
        "    return 'Answer: [/INST]'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    code, out, _ = cli("run", "--tasks", _one_task(tmp_path), "--model", "py:markup_model:fn", "--db", db_path)
    assert code == 0 and "[/INST] [bold]note[/bold]" in out
    code, out, _ = cli("context", "history", "--db", db_path)
    assert code == 0 and "[/INST]" in out


def _one_task(tmp_path):
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"prompt": "q", "answer": "1", "id": "only"}) + "\n")
    return path
