"""The documentation's code: every Python snippet compiles, and the ones a reader runs first run as written.

Snippets that need a model or an endpoint a test machine lacks (``openai:...``, a GPU, your own
data) are checked for syntax; the serve client snippet runs against a live server.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
_BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def python_blocks(path: Path) -> list[tuple[int, str]]:
    text = path.read_text()
    return [(text[: m.start()].count("\n") + 1, m.group(1)) for m in _BLOCK.finditer(text)]


SNIPPETS = [(path, line, code) for path in DOCS for line, code in python_blocks(path)]


def test_the_docs_have_python_snippets():
    assert len(SNIPPETS) > 20


@pytest.mark.parametrize("path,line,code", SNIPPETS, ids=[f"{p.name}:{n}" for p, n, _ in SNIPPETS])
def test_every_python_snippet_compiles(path, line, code):
    # ``...`` stands for the reader's own code in some snippets; it is valid Python as it is
    compile(code, f"{path.name}:{line}", "exec")


def test_the_serve_client_snippet_runs_as_written(db_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("openai")
    from lifecycle_agent.models.scripted import ScriptedModel
    from lifecycle_agent.server import create_app
    from test_serve_http import KEY, LiveServer

    code = next(code for path, _, code in SNIPPETS if path.name == "serve.md" and "post(\"/v1/agents\"" in code)
    with LiveServer(create_app(db_path, ScriptedModel(), [KEY])) as server:
        runnable = code.replace('BASE = "http://127.0.0.1:8000"', f'BASE = "{server.url}"')  # the test server's port
        assert runnable != code
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(runnable, "serve.md", "exec"), {"KEY": KEY, "__name__": "snippet"})
    printed = out.getvalue()
    assert "1 What is the secret code of the apple?" in printed and "42" in printed


def test_the_own_environment_snippets_run_as_written(tmp_path, monkeypatch):
    from lifecycle_agent import envs

    blocks = [code for path, _, code in SNIPPETS if path.name == "environments.md" and "Colours" in code]
    module, usage = blocks[0], blocks[1]
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "colours.py").write_text(module)
    monkeypatch.syspath_prepend(str(tmp_path))
    namespace: dict = {}
    exec(compile(module, "environments.md", "exec"), namespace)
    try:
        exec(compile(usage, "environments.md", "exec"), {"Colours": namespace["Colours"]})
        env = envs.make("colours", preset="hard", rooms=5)
        assert env.options["rooms"] == 5 and len(env.pack(1, 6).hidden["lamps"]) == 5
        assert all(envs.play_oracle(task).reward == 1.0 for task in env.pack(2, 6).tasks)
        with pytest.raises(Exception, match="rooms"):
            envs.make("colours", rooms=0)
    finally:
        envs.unregister("colours")


#: Snippets a reader can run offline, by file and order in the file (the ones of a file share one namespace,
#: as for a reader following along); ``model`` stands for "your model" in concepts.md.
OFFLINE = {"concepts.md": [0, 1], "environments.md": [0, 1], "evaluation.md": [0], "models.md": [1]}


@pytest.mark.parametrize("name", sorted(OFFLINE))
def test_offline_snippets_run_as_written(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = [code for path, _, code in SNIPPETS if path.name == name]
    namespace: dict = {"__name__": "snippet", "model": "scripted"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for index in OFFLINE[name]:
            exec(compile(blocks[index], f"{name}[{index}]", "exec"), namespace)
