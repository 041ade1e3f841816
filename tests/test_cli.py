"""The command line: run, context and agents commands, JSON output, and clear errors."""

import json
import os
import sqlite3
import sys
import time
from pathlib import Path

import pytest

from lifecycle_agent.cli import main
from lifecycle_agent.store import Store


def _invoker(capsys, monkeypatch, columns: int):
    """``invoke(*args) -> (exit code, stdout, stderr)`` of the CLI on a terminal ``columns`` wide."""
    monkeypatch.setenv("COLUMNS", str(columns))

    def invoke(*args):
        with pytest.raises(SystemExit) as exc:
            main([str(a) for a in args])
        out, err = capsys.readouterr()
        return exc.value.code, out, err

    return invoke


@pytest.fixture
def cli(capsys, monkeypatch):
    return _invoker(capsys, monkeypatch, 200)


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
    assert "run " in out and "mean reward 0.500" in _flat(out) and "secret code" in out


def test_run_prints_each_tasks_prompt_answer_reward_feedback_and_context_version(cli, tasks_file, db_path):
    code, out, _ = cli("run", "--tasks", tasks_file, "--model", "scripted", "--db", db_path)
    assert code == 0
    assert out.count("prompt:   What is the secret code of the apple?") == 2
    assert "feedback: Correct" in out and "answer:   417" in out and "reward:   1.00" in out
    assert "v1 written" in out and "v2 written" in out and "(solved with context v1)" in out
    assert "1 with reward > 0" in out and "writing context" in out
    assert out.count("final context") == 1 and "context v1\n" not in out  # whole context only at the end


def test_run_show_context_prints_the_whole_context_after_every_task(cli, tasks_file, db_path):
    code, out, _ = cli("run", "--tasks", tasks_file, "--model", "scripted", "--db", db_path, "--show-context")
    assert code == 0 and "context v1" in out and "context v2" in out


def test_run_quiet_prints_only_the_table_and_final_context(cli, tasks_file, db_path):
    code, out, _ = cli("run", "--tasks", tasks_file, "--model", "scripted", "--db", db_path, "--quiet")
    assert code == 0 and "prompt:" not in out and "final context" in out


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


def _flat(text):
    return " ".join(text.split())


def test_run_checks_the_database_before_loading_the_model(cli, tasks_file, tmp_path, monkeypatch):
    (tmp_path / "recorded_model.py").write_text(
        "CALLS = []\n"
        "def fn(messages):\n"
        "    CALLS.append(messages)\n"
        "    return 'Answer: 417'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "recorded_model", raising=False)
    code, _, err = cli("run", "--tasks", tasks_file, "--model", "py:recorded_model:fn", "--db", tmp_path / "no" / "x.db")
    assert code == 2 and "directory" in err and "does not exist" in err
    assert "recorded_model" not in sys.modules and "loading model" not in err
    code, _, _ = cli("run", "--tasks", tasks_file, "--model", "py:recorded_model:fn", "--db", tmp_path / "x.db", "--json")
    assert code == 0 and sys.modules["recorded_model"].CALLS
    monkeypatch.delitem(sys.modules, "recorded_model")


def test_py_model_spec_with_missing_module_hints_at_the_import_path(cli, tasks_file, db_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if os.path.abspath(p or ".") != str(tmp_path)])
    code, _, err = cli("run", "--tasks", tasks_file, "--model", "py:no_such_module_xyz:fn", "--db", db_path)
    assert code == 2 and "No module named 'no_such_module_xyz'" in err
    assert "current directory is not on the import path" in _flat(err) and "PYTHONPATH=." in err
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "needs_missing_dep.py").write_text("import not_installed_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(lib))
    code, _, err = cli("run", "--tasks", tasks_file, "--model", "py:needs_missing_dep:fn", "--db", db_path)
    assert code == 2 and "not_installed_dependency_xyz" in err and "PYTHONPATH" not in err


def test_run_table_does_not_count_failed_tasks_as_solved(cli, tasks_file, db_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent / "helpers"))
    code, out, _ = cli("run", "--tasks", tasks_file, "--model", "py:broken_model:broken", "--db", db_path, "--quiet")
    assert code == 1 and "0 completed (0 with reward > 0), 0 already done, 2 failed" in _flat(out)


def test_run_accepts_numeric_answers_in_the_task_file(cli, db_path, tmp_path):
    path = tmp_path / "num.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "What is 2+2?", "answer": 4, "id": 1}\n')
    code, out, _ = cli("run", "--tasks", path, "--model", "scripted", "--db", db_path, "--json")
    assert code == 0 and json.loads(out)["records"][0]["task_id"] == "1"


def _lower_budget_after_long_version(db):
    """Version 3 of 'bot' is 160 characters; the agent's budget is then 50."""
    with Store(db) as store:
        settings = store.get_agent("bot").settings
        store.update_settings("bot", {**settings, "context_budget": 1000})
        store.write_context("bot", "word " * 32, source="edit")
        store.update_settings("bot", {**settings, "context_budget": 50})


def test_context_rollback_and_fork_respect_the_budget(cli, populated):
    _lower_budget_after_long_version(populated)
    code, out, _ = cli("context", "rollback", "3", "--db", populated, "--agent", "bot", "--json")
    data = json.loads(out)
    assert code == 0 and len(data["text"]) <= 50 and "truncated: was 160 characters, budget 50" in data["note"]
    code, out, _ = cli("context", "fork", "--to", "bot2", "--version", "3", "--db", populated, "--agent", "bot")
    assert code == 0 and "over the context budget" in out
    assert len(Store(populated).head("bot2").text) <= 50


def test_every_context_and_agents_command_takes_json_and_busy_timeout():
    import typer

    from lifecycle_agent.cli import app

    group = typer.main.get_command(app)
    for name in ("context", "agents"):
        for command_name, command in group.commands[name].commands.items():
            options = {opt for param in command.params for opt in param.opts}
            assert {"--json", "--busy-timeout"} <= options, f"{name} {command_name}"
    assert "--busy-timeout" in {opt for param in group.commands["run"].params for opt in param.opts}


def test_context_export_takes_json(cli, populated, tmp_path):
    code, out, _ = cli("context", "export", "--db", populated, "--agent", "bot", "--json")
    assert code == 0 and json.loads(out)["format"] == "lifecycle-agent/agent-export"
    out_file = tmp_path / "bot.json"
    code, out, _ = cli("context", "export", "--db", populated, "--agent", "bot", "--out", out_file, "--json")
    assert code == 0 and json.loads(out) == {"agent_id": "bot", "out": str(out_file), "versions": 3}


def test_agents_delete_takes_json(cli, populated):
    code, out, _ = cli("agents", "delete", "--db", populated, "--agent", "bot", "--yes", "--json")
    assert code == 0 and json.loads(out) == {"agent_id": "bot", "deleted": True}


def test_context_import_accepts_a_byte_order_mark(cli, populated, tmp_path):
    out_file = tmp_path / "bot.json"
    cli("context", "export", "--db", populated, "--agent", "bot", "--out", out_file)
    out_file.write_bytes(b"\xef\xbb\xbf" + out_file.read_bytes())
    code, out, _ = cli("context", "import", out_file, "--db", tmp_path / "other.db", "--json")
    assert code == 0 and json.loads(out)["agent_id"] == "bot"


def test_context_import_of_a_non_utf8_file_names_it(cli, tmp_path):
    bad = tmp_path / "latin1.json"
    bad.write_bytes(b"\xff\xfe garbage")
    code, _, err = cli("context", "import", bad, "--db", tmp_path / "x.db")
    assert code == 2 and "latin1.json is not UTF-8 text" in err


@pytest.mark.parametrize(
    "command",
    [
        ["context", "rollback", "1", "--agent", "bot"],
        ["agents", "delete", "--agent", "bot", "--yes"],
        ["run", "--tasks", "TASKS", "--model", "scripted", "--agent", "newcomer"],
    ],
    ids=["context", "agents", "run"],
)
def test_short_busy_timeout_fails_fast_on_a_locked_database(cli, populated, tasks_file, command):
    blocker = sqlite3.connect(populated, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        args = [tasks_file if a == "TASKS" else a for a in command]
        code, _, err = cli(*args, "--db", populated, "--busy-timeout", "0.1")
        elapsed = time.monotonic() - started
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert code == 2 and "stayed locked by another writer" in _flat(err) and "--busy-timeout" in err
    assert elapsed < 5


def test_a_missing_extra_is_a_clear_error_naming_the_install_command(cli, db_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_fastapi(name, *args, **kwargs):
        if name.split(".")[0] in ("fastapi", "uvicorn"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_fastapi)
    for module in [m for m in list(sys.modules) if m.startswith("lifecycle_agent.server")]:
        monkeypatch.delitem(sys.modules, module)
    code, _, err = cli("serve", "--db", db_path, "--model", "scripted")
    assert code == 2
    assert "needs fastapi" in err and "pip install 'lifecycle-agent[serve]'" in err and "Traceback" not in err


def test_missing_extra_message_maps_modules_to_extras():
    from lifecycle_agent.cli import missing_extra_message

    def message(module, argv):
        return missing_extra_message(ModuleNotFoundError(f"No module named {module!r}", name=module), argv)

    assert "[train]" in message("trl", ["train", "--sft"])
    assert "[train]" in message("torch", ["train", "--lora"])  # torch for training comes with [train]
    assert "[local]" in message("torch", ["run", "--env", "fact-recall"])
    assert message("no_such_thing", ["run"]) is None  # an unknown module is a real bug: its traceback stays


def test_a_finished_run_resumed_does_not_load_the_model(cli, tasks_file, db_path, monkeypatch):
    cli("run", "--tasks", tasks_file, "--model", "scripted", "--db", db_path, "--quiet")
    from lifecycle_agent.cli import common

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(common, "load_model", refuse)
    monkeypatch.setattr("lifecycle_agent.cli.run.load_model", refuse)
    code, out, _ = cli("run", "--tasks", tasks_file, "--model", "scripted", "--db", db_path)
    assert code == 0 and "all 2 task(s) already completed" in _flat(out) and "417" in out


def test_a_mistyped_model_spec_leaves_no_database_behind(cli, tasks_file, tmp_path):
    db = tmp_path / "new.db"
    code, _, err = cli("run", "--tasks", tasks_file, "--model", "scriptd", "--db", db)
    assert code == 2 and "model spec 'scriptd'" in err and not db.exists()


def test_an_eval_settings_mismatch_is_reported_before_the_model_loads(cli, tmp_path, monkeypatch):
    out = tmp_path / "ev"
    cli("eval", "--env", "fact-recall", "--model", "scripted", "--packs", "1", "--pack-size", "2", "--out", out,
        "--no-plot", "--modes", "none")
    monkeypatch.setattr("lifecycle_agent.cli.eval.load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    code, _, err = cli("eval", "--env", "fact-recall", "--model", "scripted", "--packs", "2", "--pack-size", "2",
                       "--out", out, "--no-plot", "--modes", "none")
    assert code == 2 and "other settings" in err and "packs: 1 -> 2" in err


# ---------------------------------------------------------------- narrow terminals and pipes (80 columns)
@pytest.fixture
def cli80(capsys, monkeypatch):
    return _invoker(capsys, monkeypatch, 80)


def test_envs_list_at_80_columns_keeps_every_name_whole(cli80):
    from lifecycle_agent import envs

    code, out, _ = cli80("envs", "list")
    assert code == 0 and max(map(len, out.splitlines())) <= 80
    for name in envs.names():
        assert name in out
    assert "envs show NAME" in out


@pytest.mark.parametrize("command", [["run"], ["eval"], ["train"], ["serve"], ["context", "rollback"]])
def test_help_at_80_columns_never_cuts_an_option_name(cli80, command):
    code, out, _ = cli80(*command, "--help")
    assert code == 0 and "…" not in out
    assert max(map(len, out.splitlines())) <= 80


def test_run_table_at_80_columns_keeps_one_line_per_task(cli80, db_path):
    code, out, _ = cli80("run", "--env", "fact-recall", "-n", "3", "--seed", "7", "--model", "scripted", "--db", db_path,
                         "--quiet")
    rows = [line for line in out.splitlines() if line.startswith("│ ") and "fact-recall" in line]
    table = out.split("final context")[0]
    assert code == 0 and len(rows) == 3 and len([line for line in table.splitlines() if line.startswith("│")]) == 3
    assert max(map(len, out.splitlines())) <= 80


def test_eval_at_80_columns_prints_means_and_a_piped_eval_prints_progress_lines(cli80, tmp_path):
    code, out, err = cli80("eval", "--env", "fact-recall", "--model", "scripted", "--packs", "2", "--pack-size", "3",
                           "--out", tmp_path / "ev", "--no-plot", "--modes", "live,none")
    assert code == 0 and max(map(len, out.splitlines())) <= 80 and "pos 2" in out
    assert "eval: 12/12 tasks" in err  # captured output is not a terminal: progress comes as lines


def test_context_import_of_deeply_nested_json_is_a_clear_error(cli, tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    db = tmp_path / "d.db"
    code, _, err = cli("context", "import", path, "--db", db)
    assert code == 2 and "nested too deeply" in err and "Traceback" not in err and not db.exists()


@pytest.mark.parametrize("how", ["flag", "env"])
def test_threads_reach_torch_before_the_model_loads(cli, tasks_file, db_path, monkeypatch, how):
    torch = pytest.importorskip("torch")
    seen = []
    monkeypatch.setattr(torch, "set_num_threads", seen.append)
    args = ["run", "--tasks", tasks_file, "--model", "scripted", "--db", db_path, "--quiet"]
    if how == "flag":
        args += ["--threads", "1"]
    else:
        monkeypatch.setenv("LIFECYCLE_AGENT_THREADS", "1")
    code, _, _ = cli(*args)
    assert code == 0 and seen == [1]


def test_threads_must_be_at_least_one(cli, tasks_file, db_path):
    code, _, err = cli("eval", "--env", "fact-recall", "--model", "scripted", "--out", db_path + ".ev", "--threads", "0")
    assert code == 2 and "--threads" in err
