"""Plug your own model into the runtime: any ``fn(messages) -> str`` is a model.

Here a tiny rule-based model shows the two episode kinds a model must handle:

- a *solve* episode: the system prompt holds a "Hints" section with the agent's context;
- an *update* episode: the prompt contains the delimiter lines ``CONTEXT_BEGIN`` /
  ``CONTEXT_END`` (a solve prompt never does), and the reply must put the new context
  between them.

Run it:  python examples/custom_model.py
The same function works from the command line:
    lifecycle-agent run --env fact-recall --model py:custom_model:my_model   (with examples/ on PYTHONPATH)
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from lifecycle_agent import CONTEXT_BEGIN, CONTEXT_END, LifecycleAgent, Task


def my_model(messages: list[dict]) -> str:
    """Remember every 'X is Y' fact from feedback; answer from the remembered facts."""
    if any(CONTEXT_BEGIN in m["content"] for m in messages):  # update episode
        prompt = messages[-1]["content"]
        facts = set(re.findall(r"^- .+$", prompt, flags=re.MULTILINE))
        facts.update(f"- {a} is {b}" for a, b in re.findall(r"the (\w+) is (\w+)", prompt))
        return "Noting the facts.\n" + CONTEXT_BEGIN + "\n" + "\n".join(sorted(facts)) + "\n" + CONTEXT_END
    hints = messages[0]["content"]
    question = messages[-1]["content"].lower()
    for name, value in re.findall(r"^- (\w+) is (\w+)$", hints, flags=re.MULTILINE):
        if name in question:
            return f"Answer: {value}"
    return "Answer: unknown"


def main() -> None:
    tasks = [
        Task(prompt="What colour is the door?", check=lambda a: (a == "red", "Wrong: the door is red." if a != "red" else "Right: the door is red."), id="door-1"),
        Task(prompt="Remind me: what colour is the door?", check=lambda a: a == "red", id="door-2"),
        {"prompt": "What is the capital of France?", "answer": "Paris", "id": "capital"},
    ]
    with tempfile.TemporaryDirectory() as tmp:
        agent = LifecycleAgent(model=my_model, db=str(Path(tmp) / "custom.db"), agent_id="custom")
        result = agent.run(tasks)
        for record in result.records:
            print(f"{record.task_id}: {record.answer!r} reward={record.reward} feedback={record.feedback!r}")
        print("context:\n" + agent.context)
        agent.close()
    assert [r.reward for r in result.records] == [0.0, 1.0, 0.0]


if __name__ == "__main__":
    main()
