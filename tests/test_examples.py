"""Every example in examples/ runs to completion.

An example may declare the arguments its test passes in a first-lines comment
``# test-args: ...`` (``{tmp}`` becomes a temporary directory).
"""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.py"))


def _test_args(path: Path, tmp: Path) -> list[str]:
    for line in path.read_text().splitlines()[:5]:
        if line.startswith("# test-args:"):
            return shlex.split(line.split(":", 1)[1].replace("{tmp}", str(tmp)))
    return []


def test_there_are_examples():
    assert {p.name for p in EXAMPLES} >= {"quickstart.py", "custom_model.py"}


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(path, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(path.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, str(path), *_test_args(path, tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
